"""Fault injection for crash tests: `COLLAPSE_FAULT=train:2` SIGKILLs the process right after
training checkpoint 2 is on disk, `COLLAPSE_FAULT=sample:1` right after sampling shard 1.

A real `kill -9` at a well-defined point makes resume tests deterministic instead of racing a
timer against the machine's speed. Unset (the normal case), this does nothing.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "COLLAPSE_FAULT"


def crash_point(stage: str, count: int) -> None:
    """SIGKILL this process if COLLAPSE_FAULT names (`stage`, `count`)."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{stage}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


DELAY_ENV = "COLLAPSE_DELAY"


def delay_point(stage: str, gen: int) -> None:
    """Sleep if COLLAPSE_DELAY names (`stage`, `gen`): `eval.oov:0:8` makes generation 0's OOV
    take 8 s longer, so a test sees it overlap generation 1's training whatever the machine's
    speed (without pipelining it never does). Unset (the normal case), this does nothing."""
    spec = os.environ.get(DELAY_ENV, "")
    name, _, rest = spec.rpartition(":")
    stage_name, _, generation = name.rpartition(":")
    if spec and stage_name == stage and generation == str(gen):
        time.sleep(float(rest))
