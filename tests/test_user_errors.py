"""Mistakes and conditions the user must fix stop a run with one line and exit code 2.

A full disk (as torch reports it: no errno): the store raises StorageFullError naming the
filesystem, and the pipeline adds which generation and stage it was in.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from collapse.config import Config
from collapse.context import Context
from collapse.pipeline import run_stage, stage_key
from collapse.store import RunStore, StorageFullError

from .conftest import TORCH_FULL_DISK, report_no_free_space, tiny_config_dict


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

