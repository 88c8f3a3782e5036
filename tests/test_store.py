"""The artifact store: atomic writes, hashes, validity and invalidation."""

from __future__ import annotations

import errno
import multiprocessing
import os
import pickle
import threading
import time
from pathlib import Path

import pytest

from collapse.store import (
    RunLockedError,
    RunStore,
    StorageFullError,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    sha256_file,
)

from .conftest import TORCH_FULL_DISK, report_no_free_space


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _store_with_stage(tmp_path: Path) -> tuple[RunStore, Path]:
    store = RunStore(tmp_path, "run")
    out = store.gen_dir(1) / "eval" / "x.json"
    atomic_write_bytes(out, b'{"a": 1}')
    store.record_stage(1, "eval.x", "key-1", [out], {"a": 1})
    return store, out


def test_valid_record_needs_same_key_and_intact_outputs(tmp_path: Path):
    store, out = _store_with_stage(tmp_path)
    record = store.valid_record(1, "eval.x", "key-1")
    assert record is not None
    assert record["outputs"] == {"gen-001/eval/x.json": sha256_file(out)}
    assert store.valid_record(1, "eval.x", "key-2") is None
    out.write_bytes(b'{"a": 2}')  # same size, other content
    assert store.valid_record(1, "eval.x", "key-1") is None
    out.write_bytes(b"")  # truncated
    assert store.valid_record(1, "eval.x", "key-1") is None
    out.unlink()
    assert store.valid_record(1, "eval.x", "key-1") is None


def test_invalidate_from_drops_later_manifests(tmp_path: Path):
    store = RunStore(tmp_path, "run")
    for gen in range(4):
        out = store.gen_dir(gen) / "f"
        atomic_write_bytes(out, b"x")
        store.record_stage(gen, "s", "k", [out])
    assert store.invalidate_from(2) == [2, 3]
    assert store.valid_record(1, "s", "k") is not None
    assert store.valid_record(2, "s", "k") is None


def test_a_run_can_be_held_by_one_process_only(tmp_path: Path):
    store = RunStore(tmp_path, "run")
    with (
        store.lock(),
        pytest.raises(RunLockedError, match="in use"),
        RunStore(tmp_path, "run").lock(),
    ):
        pass


def test_a_write_failing_on_a_full_disk_is_a_storage_full_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    target = tmp_path / "gen-001" / "train-state" / "checkpoint.pt"
    atomic_write_bytes(target, b"old")
    saw_tmp = report_no_free_space(monkeypatch, tmp_path)
    with pytest.raises(StorageFullError) as info, atomic_path(target) as tmp:
        tmp.write_bytes(b"PK\x03\x04 partial")  # the zip writer gets this far, then fails
        raise RuntimeError(TORCH_FULL_DISK)
    err = info.value
    assert err.path == target and err.free_bytes == 0
    mount = tmp_path.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    assert err.mount == mount
    assert isinstance(err.__cause__, RuntimeError)
    # free space was looked at while the partial file still filled the disk
    assert saw_tmp and all(saw_tmp)
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.rglob("*.tmp"))
    text = str(err)
    assert f"filesystem mounted at {err.mount}" in text and str(target) in text
    assert "run the same command again to resume" in text and "\n" not in text


def test_enospc_is_storage_full_even_with_free_space_left(tmp_path: Path):
    # e.g. a quota (EDQUOT) or a full inode table: statvfs shows blocks free, the errno says no
    with pytest.raises(StorageFullError) as info, atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "weights"))
    assert info.value.path == tmp_path / "model"
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())


def test_other_failures_with_free_space_stay_what_they_are(tmp_path: Path):
    with pytest.raises(RuntimeError, match="enforce fail"), atomic_path(tmp_path / "f") as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError(TORCH_FULL_DISK)
    with pytest.raises(PermissionError), atomic_dir(tmp_path / "d"):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_storage_full_error_survives_pickling_with_its_stage(tmp_path: Path):
    err = StorageFullError(tmp_path / "f", 512)
    err.stage = "generation 1, stage train"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is StorageFullError and str(again) == str(err)
    assert "512 bytes free" in str(again) and "in generation 1, stage train" in str(again)


def _slow_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widen the read-modify-write window of manifest updates, so unserialised writers lose."""
    real = RunStore.read_manifest

    def slow(self: RunStore, generation: int) -> dict:
        manifest = real(self, generation)
        time.sleep(0.05)
        return manifest

    monkeypatch.setattr(RunStore, "read_manifest", slow)


def _record(root: Path, stage: str) -> None:
    store = RunStore(root, "run")  # a store of its own, as each Prefect task builds one
    out = store.eval_path(1, stage)
    atomic_write_bytes(out, b"{}")
    store.record_stage(1, f"eval.{stage}", "k", [out])


def test_concurrent_stages_of_one_generation_keep_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _slow_reads(monkeypatch)
    names = [f"m{i}" for i in range(6)]
    threads = [threading.Thread(target=_record, args=(tmp_path, n)) for n in names[:3]]
    # and processes (e.g. work-pool workers sharing the artifact root), which see the
    # slowed reads too: fork copies the patched class
    procs = [
        multiprocessing.get_context("fork").Process(target=_record, args=(tmp_path, n))
        for n in names[3:]
    ]
    for worker in [*threads, *procs]:
        worker.start()
    for worker in [*threads, *procs]:
        worker.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    stages = RunStore(tmp_path, "run").read_manifest(1)["stages"]
    assert sorted(stages) == [f"eval.{n}" for n in names]
    RunStore(tmp_path, "run").drop_stage(1, "eval.m0")
    assert "eval.m0" not in RunStore(tmp_path, "run").read_manifest(1)["stages"]


def test_a_process_forked_while_a_thread_holds_the_manifest_lock_does_not_deadlock(
    tmp_path: Path,
):
    store = RunStore(tmp_path, "run")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.manifest_update(1):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    child = multiprocessing.get_context("fork").Process(target=_record, args=(tmp_path, "forked"))
    child.start()  # forked while the thread holds both locks
    release.set()
    holder.join()
    child.join(timeout=20)
    stuck = child.is_alive()
    if stuck:
        child.kill()
        child.join()
    assert not stuck and child.exitcode == 0
    assert "eval.forked" in store.read_manifest(1)["stages"]
