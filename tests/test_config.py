"""Config loading, validation messages, overrides and hashing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from collapse.config import ConfigError, config_hash, load_config, run_id_for
from collapse.sweep import is_sweep_file, load_sweep

from .conftest import REPO

YAMLS = sorted((REPO / "configs").rglob("*.yaml"))
SWEEPS = [p for p in YAMLS if is_sweep_file(p)]
CONFIGS = [p for p in YAMLS if p not in SWEEPS]


def test_configs_directory_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "paper-1m.yaml", "paper-33m.yaml"} <= names
    assert {p.name for p in SWEEPS} >= {"mitigation-demo.yaml"}
    # sweep files are recognised by their keys; they live in configs/sweeps/
    assert all(p.parent.name == "sweeps" for p in SWEEPS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path):
    config = load_config(path)
    assert config.run.generations >= 1
    assert run_id_for(config).startswith(config.run.name)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_shipped_sweep_validates(path: Path):
    sweep = load_sweep(path)  # every arm's config validated, every problem raised at once
    assert len(sweep.runs) == len(sweep.arms) >= 2
    for arm in sweep.arms:
        assert arm.run_id == run_id_for(arm.config)


def test_paper_configs_follow_the_protocol():
    for name, preset in (("paper-1m", "tinystories-1m"), ("paper-33m", "tinystories-33m")):
        c = load_config(REPO / "configs" / f"{name}.yaml")
        assert c.model.preset == preset
        assert c.run.generations == 40
        assert c.tokenizer.name == "gpt2"
        assert (c.corpus.source, c.corpus.dataset) == ("hub", "roneneldan/TinyStories")
        assert c.sample.num_sequences == 1_000_000 and c.sample.max_new_tokens == 600
        assert c.sample.batch_size == 200 and c.sample.temperature == 1.0
        assert c.sample.top_k == 0 and c.sample.top_p == 1.0
        t = c.train
        assert (t.lr, tuple(t.betas), t.weight_decay, t.lr_schedule) == (
            5e-4,
            (0.9, 0.95),
            0.1,
            "constant",
        )
        assert t.effective_batch == 320 and t.epochs == 3 and t.seq_len == 512


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BAD = {
    "run": {"generations": 0, "artifact_root": "ART"},
    "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "colour": "blue"},
    "corpus": {"source": "local", "path": "does/not/exist.txt"},
    "train": {"lr": -1},
}


def test_every_mistake_is_reported_with_dotted_keys(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, BAD))
    text = "\n".join(info.value.problems)
    assert "run.generations" in text
    assert "model.colour: unknown key" in text
    assert "train.lr" in text and "-1" in text
    assert "corpus.path 'does/not/exist.txt' does not exist" in text


def test_cli_rejects_a_bad_config_with_exit_2_and_writes_nothing(tmp_path: Path):
    data = dict(BAD, run={"generations": 0, "artifact_root": str(tmp_path / "art")})
    path = _write(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for key in ("run.generations", "model.colour", "train.lr", "corpus.path"):
        assert key in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_overrides_are_dotted_and_typed(tiny_config_file: Path):
    c = load_config(tiny_config_file, ["train.lr=0.001", "sample.top_k=5", "run.generations=3"])
    assert c.train.lr == 0.001 and c.sample.top_k == 5 and c.run.generations == 3
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(tiny_config_file, ["train.nope=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(tiny_config_file, ["no-equals-sign"])


def test_hash_ignores_generation_count_and_paths_but_not_settings(tiny_config_file: Path):
    base = load_config(tiny_config_file)
    longer = load_config(
        tiny_config_file,
        ["run.generations=9", "run.artifact_root=/elsewhere", "eval.metrics=[entropy]"],
    )
    other = load_config(tiny_config_file, ["train.lr=0.002"])
    assert config_hash(base) == config_hash(longer)
    assert run_id_for(base) == run_id_for(longer)
    assert config_hash(base) != config_hash(other)


def test_model_needs_a_preset_or_explicit_sizes(tmp_path: Path):
    with pytest.raises(ConfigError, match="model.num_layers, model.hidden_size, model.num_heads"):
        load_config(_write(tmp_path, {"model": {}}))
    with pytest.raises(ConfigError, match="divisible"):
        load_config(
            _write(tmp_path, {"model": {"num_layers": 2, "hidden_size": 30, "num_heads": 4}})
        )


def test_train_batch_consistency(tmp_path: Path):
    data = {
        "model": {"preset": "tinystories-1m"},
        "train": {"batch_size": 3, "effective_batch": 10},
    }
    with pytest.raises(ConfigError, match="multiple of"):
        load_config(_write(tmp_path, data))


def test_judge_settings_are_checked(tiny_config_file: Path):
    with pytest.raises(ConfigError) as err:
        load_config(
            tiny_config_file,
            ["eval.judge.prompts=file", "eval.metrics=[perplexity, judge, tea]"],
        )
    text = str(err.value)
    assert "eval.judge: prompts_path is required when prompts is 'file'" in text
    assert "eval.metrics" in text and "'tea'" in text


def test_a_judge_answer_that_leaves_no_room_for_a_prompt_is_rejected(tiny_config_file: Path):
    # tiny config: model.max_position_embeddings 128
    judged = ["eval.judge.model=test-judge"]
    for max_new in (127, 200):
        with pytest.raises(ConfigError) as err:
            load_config(tiny_config_file, [*judged, f"eval.judge.max_new_tokens={max_new}"])
        text = str(err.value)
        assert "eval.judge.max_new_tokens" in text and "model.max_position_embeddings" in text
    load_config(tiny_config_file, [*judged, "eval.judge.max_new_tokens=126"])  # 1 prompt token
    # an unconfigured judge generates nothing, so its length cap cannot overflow anything
    load_config(tiny_config_file, ["eval.judge.max_new_tokens=500"])


def test_a_perplexity_window_beyond_the_model_is_rejected(tiny_config_file: Path):
    with pytest.raises(ConfigError, match=r"eval.context \(129\) exceeds model.max_position"):
        load_config(tiny_config_file, ["eval.context=129"])
    assert load_config(tiny_config_file, ["eval.context=128"]).eval.context == 128


def test_a_saved_config_loads_without_its_input_files(tiny_config_file: Path, tmp_path: Path):
    from collapse.config import start_problems, validate_config

    config = load_config(tiny_config_file)
    data = config.model_dump(mode="json")
    Path(data["corpus"]["path"]).unlink()
    data["eval"]["judge"].update(prompts="file", prompts_path=str(tmp_path / "gone.yaml"))
    assert validate_config(data).corpus.path == data["corpus"]["path"]
    data["eval"]["metrics"].remove("judge")
    (corpus,) = start_problems(validate_config(data))  # an unused section's file is no input
    assert corpus.startswith(f"corpus.path {data['corpus']['path']!r} does not exist")
    data["eval"]["metrics"].append("judge")
    problems = start_problems(validate_config(data))
    assert problems[0] == corpus and len(problems) == 2
    assert problems[1].startswith(f"eval.judge.prompts_path '{tmp_path / 'gone.yaml'}' does not")


def test_orchestration_mode_and_pipeline_never_change_the_run(tiny_config_file: Path):
    base = load_config(tiny_config_file)
    assert base.orchestration.pipeline and not base.orchestration.distributed
    old = load_config(tiny_config_file, ["orchestration.generation_deployment=generation/gpu"])
    assert old.orchestration.distributed  # configs from before `mode` keep their meaning
    spread = load_config(
        tiny_config_file,
        [
            "orchestration.mode=distributed",
            "orchestration.generation_deployment=generation/gpu",
            "orchestration.pipeline=false",
        ],
    )
    assert spread.orchestration.distributed
    assert run_id_for(spread) == run_id_for(old) == run_id_for(base)
    with pytest.raises(ConfigError, match="mode distributed needs"):
        load_config(tiny_config_file, ["orchestration.mode=distributed"])
    with pytest.raises(ConfigError, match="only used with orchestration.mode distributed"):
        load_config(
            tiny_config_file,
            ["orchestration.mode=local", "orchestration.generation_deployment=generation/gpu"],
        )


def test_compiling_the_trunk_needs_the_fast_model(tiny_config_file: Path):
    with pytest.raises(ConfigError, match="train.compile needs model.implementation: fast"):
        load_config(tiny_config_file, ["train.compile=true", "model.implementation=transformers"])
    assert load_config(tiny_config_file, ["train.compile=true"]).train.compile


@pytest.mark.parametrize("other", ["model.implementation=transformers", "sample.rng=shard"])
def test_cuda_graphs_need_continuous_batching(tiny_config_file: Path, other: str):
    with pytest.raises(ConfigError, match="sample.cuda_graphs needs continuous batching"):
        load_config(tiny_config_file, ["sample.cuda_graphs=true", other])
    assert load_config(tiny_config_file, ["sample.cuda_graphs=true"]).sample.cuda_graphs
