"""The artifact store: atomic writes, hashes, validity and invalidation."""

from __future__ import annotations

from pathlib import Path

import pytest

from collapse.store import RunLockedError, RunStore, atomic_path, atomic_write_bytes, sha256_file


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
