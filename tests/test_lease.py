"""A run's lock on S3: a lease one process holds, that a killed holder's successor takes over."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from collapse.store import LeaseLostError, RunLockedError, RunStore, atomic_write_bytes

from .object_roots import Root


def _hold(root: str, ready: multiprocessing.synchronize.Event) -> None:
    with RunStore(root, "run").lock():
        ready.set()
        time.sleep(600)  # until killed


def test_a_killed_holder_s_lease_is_taken_over_and_a_live_one_is_not(
    artifact_root: Root, tmp_path: Path
):
    if artifact_root.kind != "s3":
        pytest.skip("a path or file:// root is locked with flock, which a killed process drops")
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(
        target=_hold, args=(artifact_root.root, ready)
    )
    holder.start()
    try:
        assert ready.wait(30)
        elsewhere = RunStore(artifact_root.root, "run", staging=tmp_path / "elsewhere")
        assert elsewhere.locked()  # what `collapse submit` asks of a Running flow run
        started = time.monotonic()
        with pytest.raises(RunLockedError, match=r"in use by .* pid \d+"), elsewhere.lock():
            pass
        assert time.monotonic() - started < 3  # a renewal seen: no waiting for the expiry
        os.kill(holder.pid, signal.SIGKILL)  # no chance to release the lease
        holder.join()
        started = time.monotonic()
        with elsewhere.lock():
            took = time.monotonic() - started
            assert (tmp_path / "elsewhere").is_dir()
        assert 0.5 < took < 10  # waited for the lease to expire, then took it over
        assert not [n for n in artifact_root.stored(elsewhere) if n.endswith(".lease")]
        assert elsewhere.locked() is False
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()


def test_a_process_that_lost_its_lease_stops_before_publishing(artifact_root: Root):
    """Stalled past the lease's time to live, a holder may have been replaced: it must not
    publish beside its successor, so recording a stage or saving mid-stage state stops it."""
    if artifact_root.kind != "s3":
        pytest.skip("a path or file:// root is locked with flock, which cannot be lost")
    store = artifact_root.store()
    folder = store.model_dir(1)
    atomic_write_bytes(folder / "weights", b"w" * 100)
    logs: list[str] = []
    with store.lock(logs.append):
        store.record_stage(1, "eval.entropy", "k", [folder])  # held: published
        # another process takes the run over (its successor, once this one had stalled)
        store.remote.fs.pipe_file(
            store.remote.path(store._object(".lease")),
            json.dumps({"holder": "elsewhere pid 1", "expires": time.time() + 60}).encode(),
        )
        deadline = time.monotonic() + 10
        while not logs and time.monotonic() < deadline:  # the next renewal finds out
            time.sleep(0.1)
        assert logs and "lost the run's lease" in logs[0]
        with pytest.raises(LeaseLostError, match="before publishing generation 1, stage train"):
            store.record_stage(1, "train", "k", [folder])
        with pytest.raises(LeaseLostError, match="before publishing gen-001/model/weights"):
            store.save_partial(folder / "weights")
        # a store of the run opened by one of its tasks (each builds its own) stops too
        task = artifact_root.store()
        with pytest.raises(LeaseLostError, match="before publishing generation 1, stage train"):
            task.record_stage(1, "train", "k", [folder])
        with pytest.raises(LeaseLostError, match="removal of generation 1's eval.entropy record"):
            task.drop_stage(1, "eval.entropy")
    assert store.read_record(1, "train") is None
    assert store.read_record(1, "eval.entropy") is not None
    assert json.loads(artifact_root.stored(store)[".lease"])["holder"] == "elsewhere pid 1"


def test_a_holder_cut_off_from_the_store_for_a_whole_lease_stops_before_publishing(
    artifact_root: Root,
):
    if artifact_root.kind != "s3":
        pytest.skip("a path or file:// root is locked with flock, which cannot be lost")
    store = artifact_root.store()
    folder = store.model_dir(1)
    atomic_write_bytes(folder / "weights", b"w" * 100)
    with store.lock():
        # as if every renewal since the last one had failed on the network for a whole ttl
        lease = store.held_lease()
        lease._renewed_at -= lease.ttl
        with pytest.raises(LeaseLostError, match="not renewed for 3 s"):
            store.record_stage(1, "train", "k", [folder])
