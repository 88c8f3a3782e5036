"""Mistakes and conditions the user must fix stop a run with one line and exit code 2.

A full disk (as torch reports it: no errno), an unreadable corpus file, an unusable tokenizer:
the library raises a user-error type naming what to fix, the pipeline adds which generation and
stage it was in, and `collapse run` prints it without a traceback. The CLI tests are real
`collapse run` subprocesses over a tiny config, as in test_e2e.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from collapse.config import Config
from collapse.context import Context
from collapse.object_store import STAGING_ENV
from collapse.pipeline import run_stage, stage_key
from collapse.store import RunStore, StorageFullError
from collapse.tokenizer import train_bpe_tokenizer

from .conftest import REPO, TORCH_FULL_DISK, report_no_free_space, tiny_config_dict
from .object_roots import make_root


def _small(corpus: Path, root: Path) -> dict:
    """The tiny config cut to what these tests need: generation 0, training of generation 1."""
    data = tiny_config_dict(corpus, root, generations=1)
    data["eval"]["metrics"] = ["entropy"]
    return data


def _context(corpus: Path, root: Path) -> Context:
    config = Config.model_validate(_small(corpus, root))
    return Context(config, RunStore(config.run.artifact_root, "run"), log=lambda _: None)


def _torch_save_on_a_full_disk(obj: object, f: str | os.PathLike, *args, **kwargs) -> None:
    # torch's zip writer writes part of the archive, then fails without an errno
    Path(f).write_bytes(b"PK\x03\x04 partial")
    raise RuntimeError(TORCH_FULL_DISK)


def test_a_full_disk_names_the_generation_and_stage_and_finished_work_stays(
    tmp_path: Path, story_file: Path, monkeypatch: pytest.MonkeyPatch
):
    ctx = _context(story_file, tmp_path / "artifacts")
    run_stage(ctx, 0, "corpus")
    with monkeypatch.context() as patch:
        report_no_free_space(patch, tmp_path / "artifacts")
        patch.setattr(torch, "save", _torch_save_on_a_full_disk)
        with pytest.raises(StorageFullError) as info:
            run_stage(ctx, 1, "train")
    err = info.value
    assert err.stage == "generation 1, stage train"
    assert err.path == ctx.store.gen_dir(1) / "train-state" / "checkpoint.pt"
    assert "in generation 1, stage train" in str(err)
    assert ctx.store.valid_record(0, "corpus", stage_key(ctx, 0, "corpus")) is not None
    assert not list((tmp_path / "artifacts").rglob("*.tmp"))
    # with room again, the same call finishes
    assert run_stage(ctx, 1, "train")["reused"] is False


def test_enospc_outside_the_atomic_writes_is_storage_full_too(
    tmp_path: Path, story_file: Path, monkeypatch: pytest.MonkeyPatch
):
    ctx = _context(story_file, tmp_path / "artifacts")
    log = ctx.store.gen_dir(0) / "some.log"

    def append_fails(cfg: object, seed: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(log))

    monkeypatch.setattr("collapse.corpus.sources.load_documents", append_fails)
    with pytest.raises(StorageFullError) as info:
        run_stage(ctx, 0, "corpus")
    assert info.value.path == log and info.value.stage == "generation 0, stage corpus"

    def denied(cfg: object, seed: int) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(log))

    monkeypatch.setattr("collapse.corpus.sources.load_documents", denied)
    with pytest.raises(PermissionError):  # not every OSError is a full disk
        run_stage(ctx, 0, "corpus")


# --- through the CLI ----------------------------------------------------------------------

# `collapse run` with a full artifact disk: statvfs reports 0 bytes free under the artifact root
# and torch.save fails as torch's zip writer does there.
_FULL_DISK_CLI = f"""
import os, sys
from pathlib import Path
import torch
root = Path(sys.argv.pop(1)).resolve()
real = os.statvfs
def statvfs(path):
    st = real(path)
    if not Path(path).resolve().is_relative_to(root):
        return st
    fields = list(st)
    fields[3] = fields[4] = 0
    return os.statvfs_result(fields)
os.statvfs = statvfs
def save(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"PK partial")
    raise RuntimeError({TORCH_FULL_DISK!r})
torch.save = save
from flows.cli import main
sys.exit(main())
"""


def _collapse(
    home: Path, *args: str, full_disk_under: Path | None = None, unset: tuple[str, ...] = ()
):
    """`collapse ARGS` in a subprocess (optionally on a full disk, or without the environment
    variables `unset`); a CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in unset}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("COLLAPSE_FAULT", None)
    command = [sys.executable, "-m", "flows.cli", *args]
    if full_disk_under is not None:
        command = [sys.executable, "-c", _FULL_DISK_CLI, str(full_disk_under), *args]
    out_path, err_path = home / "last.out", home / "last.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            command, stdout=out, stderr=err, env=env, cwd=home, start_new_session=True
        )
        try:
            code = proc.wait(timeout=300)
        finally:  # the ephemeral Prefect server must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, code, out_path.read_text(), err_path.read_text())


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for this module's runs (a fresh Prefect database costs seconds)."""
    return tmp_path_factory.mktemp("prefect-home")


def _write_config(tmp: Path, data: dict) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_a_rerun_resumes(
    tmp_path: Path, story_file: Path, home: Path
):
    root = tmp_path / "artifacts"
    config = _write_config(tmp_path, _small(story_file, root))
    full = _collapse(home, "run", str(config), full_disk_under=root)
    assert full.returncode == 2, full.stdout + full.stderr
    assert "Traceback" not in full.stderr
    message = _last_line(full.stderr)
    assert message.startswith("collapse: error: storage full: the filesystem mounted at ")
    assert "in generation 1, stage train" in message and "checkpoint.pt" in message
    assert "Finished work is kept" in message and "run the same command again" in message
    (run,) = root.iterdir()
    assert "corpus" in json.loads((run / "gen-000" / "manifest.json").read_text())["stages"]
    again = _collapse(home, "run", str(config))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "generation 0: reused" in again.stdout
    assert "generation 1: computed" in again.stdout


def _tokenizer_without_eos(path: Path) -> Path:
    tok = train_bpe_tokenizer(["a tiny corpus"] * 4, vocab_size=280)
    tok.eos_token = tok.bos_token = tok.pad_token = tok.unk_token = None
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("mistake", ["missing bucket", "no credentials", "credentials in the URL"])
def test_an_unusable_artifact_url_is_one_line_and_exit_2_before_anything_starts(
    tmp_path: Path,
    story_file: Path,
    home: Path,
    s3_endpoint: str,
    mistake: str,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    root = make_root("s3", tmp_path, s3_endpoint).root
    unset: tuple[str, ...] = ()
    if mistake == "missing bucket":
        root, said = "s3://no-such-bucket/artifacts", "The specified bucket does not exist"
    elif mistake == "no credentials":
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
        unset, said = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), "no credentials found"
    else:
        root = root.replace("s3://", "s3://AKIAPLANTED:sEcReTpLaNtEd@")
        said = "the URL carries credentials"
    data = _small(story_file, tmp_path / "artifacts")
    data["run"]["artifact_root"] = root
    proc = _collapse(home, "run", str(_write_config(tmp_path, data)), unset=unset)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "sEcReTpLaNtEd" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("collapse: error: ")  # a config error lists its problems
    message = _last_line(proc.stderr)
    assert "run.artifact_root: " in message and said in message, message
    assert not (tmp_path / "staging").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "{config}", "train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML"),
        (["run", "{binary}"], "cannot be read as text (UnicodeDecodeError"),
        (["run", "{folder}"], "is a folder; name a YAML file in it"),
        (["status", "--root", "{config}"], "is a file, not a folder"),
        (["status", "--root", "s3://KEYID:s3cr3tv4lue@bucket/x"], "the URL carries credentials"),
        (["status", "--root", "foo://x/y"], "fsspec knows no 'foo' storage"),
        (["report", "{run}", "--out", "{config}"], "cannot write the report to"),
        (["ui", "--port", "99999"], "99999 is no port: use 1-65535"),
        (["deploy", "--pool-limit", "-1"], "a pool runs 0 or more flow runs at once"),
        (["submit", "{config}", "--deployment", "nodash"], "is not 'flow/deployment'"),
        (["submit", "{config}"], "no Prefect server: this command needs"),
        (["run", "{config}", "run.artifact_root=/proc/collapse-test/x"], "cannot be written"),
        (["run", "{twice}"], "line 3: duplicate key 'run' (first on line 1)"),
        (["run", "{config}", "corpus.path={jsonl}"], "cannot read '{jsonl}' as .jsonl (ArrowI"),
        (["run", "{config}", "corpus.text_column=story", "corpus.path={good}"], "no column 'st"),
        (["run", "{config}", "run.run_id=run"], "run 'run' was started with a different config"),
        (["status", "--sweep", "{sweep}", "--root", "{folder}"], "--root does not go with"),
        (["report", "--sweep", "{sweep}", "--root", "{folder}"], "--root does not go with"),
        (["report", "--sweep", "{sweep}"], "has started, so there is nothing to report"),
        # an override after an option is still an override (here: the 3 it sets is checked)
        (["run", "{config}", "--from-generation", "9", "run.generations=3"], "generations (3)"),
        (["run", "{config}", "--from-generation", "1", "stray"], "unrecognized arguments: stray"),
        (
            ["run", "{config}", "tokenizer.name=hub:{no_eos}"],
            "has no EOS token; choose a tokenizer",
        ),
    ],
)
def test_bad_command_lines_are_one_message_and_exit_2_before_anything_starts(
    args: list[str],
    expected: str,
    tmp_path: Path,
    story_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
):
    from flows.cli import main

    # A Prefect home would be made here (the working directory) if a refusal came too late.
    monkeypatch.chdir(tmp_path)
    for name in ("PREFECT_HOME", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(story_file, tmp_path / "artifacts")))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe")
    (tmp_path / "twice.yaml").write_text("run:\n  seed: 1\nrun:\n  seed: 2\n")
    (tmp_path / "stories.jsonl").write_text('{"text": "Once upon a time."}\n{"text": \n')
    (tmp_path / "good.jsonl").write_text('{"text": "Once upon a time."}\n')
    (tmp_path / "sweep.yaml").write_text("name: s\nbase: tiny.yaml\ngrid:\n  run.seed: [1, 2]\n")
    if "no_eos" in " ".join(args):
        _tokenizer_without_eos(tmp_path / "no-eos")
    run = tmp_path / "artifacts" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config.read_text())
    (run / "config.sha256").write_text("another config\n")
    names = {
        "config": config,
        "binary": tmp_path / "binary.yaml",
        "twice": tmp_path / "twice.yaml",
        "jsonl": tmp_path / "stories.jsonl",
        "good": tmp_path / "good.jsonl",
        "sweep": tmp_path / "sweep.yaml",
        "folder": tmp_path,
        "run": run,
        "no_eos": tmp_path / "no-eos",
    }
    expected = expected.format(**names)
    before = sorted(p for p in tmp_path.rglob("*"))
    try:
        code = main([a.format(**names) for a in args])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert "s3cr3tv4lue" not in err
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written
