"""The chain stages in execution order: `corpus` (generation 0), then `train` and `sample`."""

from __future__ import annotations

from collapse.stages.base import ChainStage
from collapse.stages.corpus import STAGE as CORPUS
from collapse.stages.sample import STAGE as SAMPLE
from collapse.stages.train import STAGE as TRAIN

__all__ = ["CHAIN", "ChainStage", "chain_stage"]

CHAIN: tuple[ChainStage, ...] = (CORPUS, TRAIN, SAMPLE)


def chain_stage(name: str) -> ChainStage | None:
    """The chain stage called `name`, or None (an evaluation's stage)."""
    return next((stage for stage in CHAIN if stage.name == name), None)
