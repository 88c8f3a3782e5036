"""Shared fixtures: tiny models, a small corpus file and a tiny run config."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from collapse.config import Config, ModelConfig, config_hash, run_id_for
from collapse.context import Context
from collapse.evals import registry
from collapse.lease import LEASE_ENV
from collapse.models import build_model
from collapse.object_store import STAGING_ENV
from collapse.pipeline import freeze_config, run_stage, stages_of
from collapse.store import RunStore

from .judge_server import JudgeServer
from .object_roots import ROOT_KINDS, Root, make_root, s3_server

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skipped where there is none. On a GPU machine they run
    alone with `-m gpu` (bench/gpu_check.sh)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


_NAMES = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Zoe"]
_THINGS = ["ball", "cat", "dog", "tree", "cake", "kite", "boat", "hat"]


def write_story_file(path: Path, n: int = 300, seed: int = 0) -> Path:
    """A small .txt corpus, one story per blank-line block."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n):
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        stories.append(
            f"Once upon a time, there was a child named {name}. {name} had a {thing}. "
            f"One day, the {thing} was lost. {name} was sad. Then {name} found the {thing} "
            "and was happy. The end."
        )
    path.write_text("\n\n".join(stories) + "\n")
    return path


@pytest.fixture
def story_file(tmp_path: Path) -> Path:
    return write_story_file(tmp_path / "stories.txt")


# The defaults every run had before 2026-12-07, when these three changed.
EARLIER_DEFAULTS = [
    "model.implementation=transformers",
    "sample.rng=shard",
    "sample.precision=fp32",
]


def mark_started(config: Config) -> None:
    """Make the run `config` names look started with it (what `freeze_config` leaves)."""
    store = RunStore(config.run.artifact_root, run_id_for(config))
    store.run_dir.mkdir(parents=True)
    store.config_path.write_text("frozen\n")
    store.config_hash_path.write_text(config_hash(config) + "\n")


def tiny_config_dict(corpus_path: Path, root: Path, generations: int = 2) -> dict:
    """A run that takes a few seconds per generation on a CPU."""
    return {
        "run": {"name": "tiny", "seed": 7, "generations": generations, "artifact_root": str(root)},
        "model": {
            "num_layers": 2,
            "hidden_size": 32,
            "num_heads": 4,
            "max_position_embeddings": 128,
        },
        "tokenizer": {"name": "bpe", "vocab_size": 300},
        "corpus": {"source": "local", "path": str(corpus_path)},
        "train": {
            "batch_size": 8,
            "effective_batch": 16,
            "seq_len": 64,
            "epochs": 1,
            "checkpoint_every": 3,
        },
        "sample": {"num_sequences": 120, "max_new_tokens": 48, "batch_size": 40, "shard_size": 40},
        "eval": {"batch_size": 16},
    }


@pytest.fixture
def tiny_config_file(tmp_path: Path, story_file: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(story_file, tmp_path / "artifacts")))
    return path


@pytest.fixture
def tiny_model():
    """A tiny transformers GPT-Neo: the reference that `generate` and our code are checked on."""
    model_cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        max_position_embeddings=64,
        implementation="transformers",
    )
    return build_model(model_cfg, vocab_size=50, start_id=0, end_id=0, seed=3).eval()


# What torch.save's zip writer raises on a full disk: no errno, no "No space left on device".
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 763328 vs 763216"


def report_no_free_space(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[bool]:
    """Make os.statvfs report 0 free bytes for paths under `root` (a full disk, as it looks
    while a failed write's partial file still fills it).

    Returns:
        One entry per statvfs call under `root`: whether a `*.tmp` file was on disk then.
    """
    real = os.statvfs
    saw_tmp: list[bool] = []

    def statvfs(path: str | os.PathLike) -> os.statvfs_result:
        st = real(path)
        if not Path(path).resolve().is_relative_to(root.resolve()):
            return st
        saw_tmp.append(any(p.name.endswith(".tmp") for p in root.rglob("*")))
        fields = list(st)
        fields[3] = fields[4] = 0  # f_bfree, f_bavail
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)
    return saw_tmp


def run_all(ctx: Context) -> dict[tuple[int, str], dict]:
    """Every stage of every generation through the library (no Prefect), in order."""
    records = {}
    for gen in range(0, ctx.config.run.generations + 1):
        for stage in stages_of(ctx, gen):
            records[(gen, stage)] = run_stage(ctx, gen, stage)
    return records


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """A real S3-compatible server (moto) on 127.0.0.1 for the session; s3fs's env points at it."""
    with s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture(params=ROOT_KINDS)
def artifact_root(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Root:
    """An empty artifact root of each kind: a local path, `file://`, and a bucket on S3."""
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    monkeypatch.setenv(LEASE_ENV, "3")  # a killed holder's lease expires in 3 s, not 60
    return make_root(request.param, tmp_path, endpoint)


PLANTED_KEY = "sk-test-PLANTED-pipeline-4242"
JUDGE_KEY_ENV = "COLLAPSE_TEST_JUDGE_KEY"


@pytest.fixture(scope="session")
def judge_server() -> Iterator[JudgeServer]:
    """A local OpenAI-compatible judge for the whole session (grades from a hash of the text)."""
    with JudgeServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, judge_server: JudgeServer) -> Iterator[Context]:
    """A 2-generation tiny run with every registered evaluation that its local corpus allows
    (`source_fit` needs the synthetic one: `tests/test_source_fit.py`), computed once per
    session.

    The judge is the local test server; its key (planted, to be looked for) is in the env.
    """
    tmp = tmp_path_factory.mktemp("pipeline")
    data = tiny_config_dict(write_story_file(tmp / "stories.txt", n=200), tmp / "artifacts")
    data["eval"] = {
        "metrics": [name for name in registry() if name != "source_fit"],
        "excerpts": {"count": 4},
        "downstream": {"tasks": ["word_order", "coherence"], "max_train_examples": 24},
        "judge": {
            "model": "test-judge",
            "base_url": judge_server.base_url,
            "api_key_env": JUDGE_KEY_ENV,
            "num_prompts": 3,
            "completions_per_prompt": 2,
            "max_new_tokens": 24,
        },
    }
    config = Config.model_validate(data)
    logs: list[str] = []
    ctx = Context(config, RunStore(config.run.artifact_root, "tiny"), log=logs.append)
    previous = os.environ.get(JUDGE_KEY_ENV)
    os.environ[JUDGE_KEY_ENV] = PLANTED_KEY
    try:
        freeze_config(ctx)
        run_all(ctx)
        yield ctx
    finally:
        if previous is None:
            os.environ.pop(JUDGE_KEY_ENV, None)
        else:
            os.environ[JUDGE_KEY_ENV] = previous


@pytest.fixture(scope="session")
def e2e_home(tmp_path_factory) -> Path:
    """The PREFECT_HOME of the end-to-end runs that compare with `reference`."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def e2e_corpus(tmp_path_factory) -> Path:
    return write_story_file(tmp_path_factory.mktemp("corpus") / "stories.txt", n=200)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, e2e_home: Path, e2e_corpus: Path) -> Path:
    """An uninterrupted 2-generation `collapse run` of the tiny config, one generation after
    another (the end-to-end runs are pipelined, the default, so comparing with it compares the
    two orders too); its artifact root. One per session: a CLI run costs tens of seconds."""
    from .test_e2e import collapse, make_config

    tmp = tmp_path_factory.mktemp("reference")
    root = tmp / "artifacts"
    config = make_config(tmp, e2e_corpus, root)
    proc = collapse(e2e_home, "run", str(config), "orchestration.pipeline=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root
