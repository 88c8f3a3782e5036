"""A run's lock on S3: a lease one process holds, that a killed holder's successor takes over."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from collapse.store import RunLockedError, RunStore

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
