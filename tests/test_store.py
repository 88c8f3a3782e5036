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

from collapse import store as store_module
from collapse.object_store import ObjectRoot
from collapse.store import (
    CorruptArtifactError,
    RunLockedError,
    RunStore,
    StorageFullError,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    sha256_file,
)

from .conftest import TORCH_FULL_DISK, report_no_free_space
from .object_roots import Root


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _store_with_stage(root: Root) -> tuple[RunStore, Path]:
    store = root.store()
    out = store.gen_dir(1) / "eval" / "x.json"
    atomic_write_bytes(out, b'{"a": 1}')
    store.record_stage(1, "eval.x", "key-1", [out], {"a": 1})
    return store, out


def _usable(root: Root, stage: str, key: str, reader: Path) -> bool:
    """Whether a reader elsewhere (staging of its own) finds the stage done and gets its files."""
    store = RunStore(root.root, "run", staging=reader)
    record = store.valid_record(1, stage, key)
    if record is None:
        return False
    try:
        for rel in record["outputs"]:
            store.pull(store.run_dir / rel)
    except CorruptArtifactError:
        return False
    return all((store.run_dir / rel).is_file() for rel in record["outputs"])


def test_valid_record_needs_same_key_and_intact_outputs(artifact_root: Root, tmp_path: Path):
    store, out = _store_with_stage(artifact_root)
    rel = "gen-001/eval/x.json"
    record = store.valid_record(1, "eval.x", "key-1")
    assert record is not None
    assert record["outputs"] == {rel: sha256_file(out)}
    assert _usable(artifact_root, "eval.x", "key-1", tmp_path / "reader-0")
    assert not _usable(artifact_root, "eval.x", "key-2", tmp_path / "reader-1")
    for i, damage in enumerate([b'{"a": 2}', b"", None]):  # same size, truncated, gone
        atomic_write_bytes(out, b'{"a": 1}')
        store.record_stage(1, "eval.x", "key-1", [out], {"a": 1})
        if damage is None:
            artifact_root.delete(store, rel)
        else:
            artifact_root.overwrite(store, rel, damage)
        assert not _usable(artifact_root, "eval.x", "key-1", tmp_path / f"reader-{i + 2}")


def test_a_damaged_published_output_drops_its_record_when_fetched(
    artifact_root: Root, tmp_path: Path
):
    if artifact_root.kind == "path":
        pytest.skip("a local root has no published copy: its valid_record hashes the file")
    store, _ = _store_with_stage(artifact_root)
    artifact_root.overwrite(store, "gen-001/eval/x.json", b'{"a": 2}')  # same size
    reader = RunStore(artifact_root.root, "run", staging=tmp_path / "reader")
    with pytest.raises(CorruptArtifactError, match="differs from what stage eval.x"):
        reader.pull(reader.eval_path(1, "x"))
    assert not reader.eval_path(1, "x").exists()
    assert store.valid_record(1, "eval.x", "key-1") is None  # recomputed on the next attempt


def test_one_bad_file_among_many_fetched_at_once_fails_the_pull_and_keeps_the_others_out(
    artifact_root: Root, tmp_path: Path
):
    if artifact_root.kind == "path":
        pytest.skip("a local root has no published copy: nothing is fetched")
    store = artifact_root.store()
    folder = store.corpus_dir(1)
    for i in range(40):  # more than the transfers run at once
        atomic_write_bytes(folder / f"part-{i:05d}.parquet", bytes([i]) * 1000)
    store.record_stage(1, "sample", "k", [folder])
    artifact_root.overwrite(store, "gen-001/corpus/part-00017.parquet", b"x" * 1000)
    reader = RunStore(artifact_root.root, "run", staging=tmp_path / "reader")
    with pytest.raises(CorruptArtifactError, match=r"part-00017\.parquet differs"):
        reader.pull(reader.corpus_dir(1))
    assert not (reader.corpus_dir(1) / "part-00017.parquet").exists()
    assert store.valid_record(1, "sample", "k") is None  # recomputed on the next attempt
    fine = reader.corpus_dir(1) / "part-00016.parquet"
    assert not fine.exists() or fine.read_bytes() == bytes([16]) * 1000


def test_a_pull_finishing_beside_another_leaves_its_download_in_flight_alone(
    artifact_root: Root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Two evaluations of a generation pull its corpus into one staging copy at once (a
    pipelined run): the one that finishes first must not take the other's download for a
    stale file, or the other finds its file gone and drops a valid record."""
    if artifact_root.kind == "path":
        pytest.skip("a local root has no published copy: nothing is fetched")
    store = artifact_root.store()
    folder = store.corpus_dir(1)
    for i in range(3):
        atomic_write_bytes(folder / f"part-{i:05d}.parquet", bytes([i]) * 1000)
    store.record_stage(1, "sample", "k", [folder])
    first = RunStore(artifact_root.root, "run", staging=tmp_path / "machine")
    second = RunStore(artifact_root.root, "run", staging=tmp_path / "machine")
    get = ObjectRoot.get
    overtaken = []

    def get_then_overtaken(self: ObjectRoot, rel: str, local: Path) -> None:
        get(self, rel, local)
        if not overtaken:  # the second pull runs whole while the first has one file in flight
            overtaken.append(rel)
            second.pull(second.corpus_dir(1))

    monkeypatch.setattr(ObjectRoot, "get", get_then_overtaken)
    first.pull(first.corpus_dir(1))
    assert overtaken and store.valid_record(1, "sample", "k") is not None
    got = sorted(p.name for p in first.corpus_dir(1).iterdir())
    assert got == [f"part-{i:05d}.parquet" for i in range(3)]


def test_a_reader_elsewhere_gets_exactly_the_published_folder(artifact_root: Root, tmp_path: Path):
    store = artifact_root.store()
    folder = store.model_dir(1)
    for name, data in [("config.json", b"{}"), ("weights", b"w" * 100), ("sub/extra", b"x")]:
        atomic_write_bytes(folder / name, data)
    store.record_stage(1, "train", "k", [folder])
    reader = RunStore(artifact_root.root, "run", staging=tmp_path / "reader")
    atomic_write_bytes(reader.model_dir(1) / "stale", b"from an earlier computation")
    got = reader.pull(reader.model_dir(1))
    files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    if artifact_root.kind == "path":  # the same folder: nothing to fetch or prune
        assert got == folder
    else:
        assert files == ["config.json", "sub/extra", "weights"]
        assert (got / "weights").read_bytes() == b"w" * 100


def test_a_temporary_left_by_a_killed_writer_is_no_output(artifact_root: Root):
    """kill -9 during a shard's write leaves `atomic_path`'s temporary in the folder; the
    resumed stage's record must be that of an uninterrupted one (same digest, nothing extra
    published), and the leftover goes."""
    store = artifact_root.store()
    folder = store.corpus_dir(1)
    atomic_write_bytes(folder / "part-00000.parquet", b"shard")
    clean = store.record_stage(1, "sample", "k", [folder])
    leftover = folder / ".part-00001.parquet.999999.0a1b2c3d.tmp"  # a dead process's pid
    leftover.write_bytes(b"half a shard")
    record = store.record_stage(1, "sample", "k", [folder])
    assert record["digest"] == clean["digest"] and record["outputs"] == clean["outputs"]
    assert not leftover.exists()
    if artifact_root.kind != "path":
        assert not [n for n in artifact_root.stored(store) if n.endswith(".tmp")]


def test_an_interrupted_publish_leaves_no_valid_record(
    artifact_root: Root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = artifact_root.store()
    outs = [store.gen_dir(1) / "corpus" / f"part-{i}.parquet" for i in range(3)]
    for i, out in enumerate(outs):
        atomic_write_bytes(out, bytes([i]) * 1000)
    calls = []

    def killed(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # a write after the first output: the process dies here
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    if store.remote is None:  # outputs are in place already: it dies writing the manifest
        real = store_module.atomic_write_json
        calls.append(None)
        monkeypatch.setattr(store_module, "atomic_write_json", killed)
    else:
        real = ObjectRoot.put
        monkeypatch.setattr(ObjectRoot, "put", killed)
    with pytest.raises(KeyboardInterrupt):
        store.record_stage(1, "sample", "k", [store.gen_dir(1) / "corpus"])
    monkeypatch.undo()
    assert not _usable(artifact_root, "sample", "k", tmp_path / "reader-0")
    assert not [n for n in artifact_root.stored(store) if n.endswith(".tmp")]
    store.record_stage(1, "sample", "k", [store.gen_dir(1) / "corpus"])  # the retry
    assert _usable(artifact_root, "sample", "k", tmp_path / "reader-1")


def test_an_interrupted_upload_leaves_the_old_file(
    artifact_root: Root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    if artifact_root.kind != "file":
        pytest.skip("a path is written by atomic_path (tested above); an S3 PUT is atomic")
    remote = ObjectRoot(artifact_root.root)
    remote.put_bytes(b"old", "run/f")
    source = tmp_path / "new"
    source.write_bytes(b"new content")

    def half(lpath: str, rpath: str, **kwargs) -> None:
        Path(rpath).write_bytes(Path(lpath).read_bytes()[:3])
        raise OSError("connection lost")

    monkeypatch.setattr(remote.fs, "put_file", half)
    with pytest.raises(OSError, match="connection lost"):
        remote.put(source, "run/f")
    assert artifact_root.stored(RunStore(artifact_root.root, "run")) == {"f": b"old"}


def test_invalidate_from_drops_later_manifests(artifact_root: Root):
    store = artifact_root.store()
    for gen in range(4):
        out = store.gen_dir(gen) / "f"
        atomic_write_bytes(out, b"x")
        store.record_stage(gen, "s", "k", [out])
    assert store.invalidate_from(2) == [2, 3]
    assert store.valid_record(1, "s", "k") is not None
    assert store.valid_record(2, "s", "k") is None
    assert store.generations_on_disk() == [0, 1, 2, 3]


def test_a_run_can_be_held_by_one_process_only(artifact_root: Root, tmp_path: Path):
    store = artifact_root.store()
    elsewhere = RunStore(artifact_root.root, "run", staging=tmp_path / "elsewhere")
    with (
        store.lock(),
        pytest.raises(RunLockedError, match="in use"),
        artifact_root.store().lock(),
    ):
        pass
    with store.lock(), pytest.raises(RunLockedError, match="in use"), elsewhere.lock():
        pass  # another machine: its own staging copy, the same run
    with store.lock():
        assert elsewhere.locked()
    assert elsewhere.locked() is False


def test_run_files_and_siblings_are_found_where_the_root_is(artifact_root: Root, tmp_path: Path):
    first, second = artifact_root.store("first"), artifact_root.store("second")
    assert not first.started()
    first.write_run_file(first.config_path, b"run: {}\n")
    second.write_run_file(second.config_path, b"run: {}\n")
    reader = RunStore(artifact_root.root, "first", staging=tmp_path / "reader")
    assert reader.started() and reader.read_run_file(reader.config_path) == b"run: {}\n"
    assert reader.read_run_file(reader.config_hash_path) is None
    assert [s.run_id for s in reader.sibling_runs()] == ["second"]
    assert RunStore.at(first.location).location == first.location


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


def _record(root: str | Path, stage: str) -> None:
    store = RunStore(root, "run")  # a store of its own, as each Prefect task builds one
    out = store.eval_path(1, stage)
    atomic_write_bytes(out, b"{}")
    store.record_stage(1, f"eval.{stage}", "k", [out])


def test_concurrent_stages_of_one_generation_keep_every_record(
    artifact_root: Root, monkeypatch: pytest.MonkeyPatch
):
    _slow_reads(monkeypatch)
    root = artifact_root.root
    names = [f"m{i}" for i in range(6)]
    threads = [threading.Thread(target=_record, args=(root, n)) for n in names[:3]]
    # and processes (e.g. work-pool workers sharing the artifact root), which see the
    # slowed reads too: fork copies the patched class
    procs = [
        multiprocessing.get_context("fork").Process(target=_record, args=(root, n))
        for n in names[3:]
    ]
    for worker in [*threads, *procs]:
        worker.start()
    for worker in [*threads, *procs]:
        worker.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    stages = RunStore(root, "run").read_manifest(1)["stages"]
    assert sorted(stages) == [f"eval.{n}" for n in names]
    RunStore(root, "run").drop_stage(1, "eval.m0")
    assert "eval.m0" not in RunStore(root, "run").read_manifest(1)["stages"]


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


def test_a_machine_back_on_a_stage_takes_the_newer_checkpoint_another_saved_meanwhile(
    artifact_root: Root, tmp_path: Path
):
    """Machine a trains to step 2 and is killed; b goes on to step 10 and is killed; a runs
    the stage again with its step-2 checkpoint still on disk: it must resume from step 10. A
    checkpoint written here after the last one saved (the kill came before its upload) is
    the newest and stays."""
    if artifact_root.kind == "path":
        pytest.skip("a local root has one copy: nothing to choose between")
    a = RunStore(artifact_root.root, "run", staging=tmp_path / "a")
    mine = a.train_state_dir(1) / "checkpoint.pt"
    atomic_write_bytes(mine, b"step 2")
    a.save_partial(mine)
    assert a.restore_partial(mine) and mine.read_bytes() == b"step 2"  # as new: kept
    b = RunStore(artifact_root.root, "run", staging=tmp_path / "b")
    theirs = b.train_state_dir(1) / "checkpoint.pt"
    assert b.restore_partial(theirs)
    time.sleep(1.1)  # an object store stamps its objects to the second
    atomic_write_bytes(theirs, b"step 10")
    b.save_partial(theirs)
    again = RunStore(artifact_root.root, "run", staging=tmp_path / "a")
    assert again.restore_partial(mine) and mine.read_bytes() == b"step 10"
    time.sleep(1.1)
    atomic_write_bytes(mine, b"step 12, not saved yet")
    assert again.restore_partial(mine) and mine.read_bytes() == b"step 12, not saved yet"


def test_mid_stage_files_saved_here_are_restored_elsewhere_until_discarded(
    artifact_root: Root, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store = artifact_root.store()
    checkpoint = store.train_state_dir(1) / "checkpoint.pt"
    atomic_write_bytes(checkpoint, b"optimizer state")
    store.save_partial(checkpoint)
    elsewhere = RunStore(artifact_root.root, "run", staging=tmp_path / "elsewhere")
    copy = elsewhere.train_state_dir(1) / "checkpoint.pt"
    assert elsewhere.restore_partial(copy) and copy.read_bytes() == b"optimizer state"
    store.discard_partial(store.train_state_dir(1))
    again = RunStore(artifact_root.root, "run", staging=tmp_path / "again")
    assert not again.restore_partial(again.train_state_dir(1) / "checkpoint.pt")
    assert not [n for n in artifact_root.stored(store) if "train-state" in n]

    # a shard saved as it was written is not uploaded a second time when its stage is recorded
    shard = store.corpus_dir(1) / "part-00000.parquet"
    atomic_write_bytes(shard, b"rows")
    store.save_partial(shard)
    puts = []
    real = ObjectRoot.put
    monkeypatch.setattr(ObjectRoot, "put", lambda self, *a: puts.append(a[1]) or real(self, *a))
    store.record_stage(1, "sample", "k", [store.corpus_dir(1)])
    assert puts == []  # (its record is written with put_bytes)
    assert _usable(artifact_root, "sample", "k", tmp_path / "reader")


def test_a_local_root_is_checked_by_writing_there_and_the_check_leaves_nothing(tmp_path: Path):
    from collapse.store import root_problem

    assert root_problem(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []  # the folders it made to probe are gone
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    problem = root_problem(locked / "runs")
    if os.geteuid() != 0:  # root writes through permissions
        assert problem is not None and "cannot be written" in problem
    assert root_problem(locked / "runs", write=False) is None
    problem = root_problem("/proc/collapse-test/runs")
    assert problem is not None and "cannot be written" in problem
    assert not Path("/proc/collapse-test").exists()
