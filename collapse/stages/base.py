"""What a chain stage declares: the data chain (corpus -> train -> sample) as typed entries.

Like an evaluation, a chain stage names its inputs (key parts: config values and the content
digests of what it reads), carries a version bumped when its output would change, and has a
runner. Unlike an evaluation, what it writes feeds every later stage and generation, so
recomputing it drops everything downstream first (collapse.pipeline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collapse.context import Context


@dataclass(frozen=True)
class ChainStage:
    """A stage of the data chain.

    Attributes:
        name: the stage name in manifests and flows.
        description: one line for the docs.
        version: bump when a code change alters the output: this stage and everything after it
            are recomputed (the git SHA is deliberately not part of any key).
        needs_gpu: runs a model (holds the GPU concurrency limit).
        human: runs on generation 0 only (the human corpus) instead of on every g >= 1.
        key_parts: the stage's inputs.
        run: `run(ctx, gen, key)` writes the outputs and returns (output paths, info); `key`
            guards mid-stage resume state (checkpoints, finished shards) made from other inputs.
        finish: `finish(ctx, gen)` removes the mid-stage resume state once the stage's record
            is written (before it, a kill still resumes from that state: under a URL root,
            publishing a model takes a while), or None.
    """

    name: str
    description: str
    version: int
    needs_gpu: bool
    human: bool
    key_parts: Callable[[Context, int], list[Any]]
    run: Callable[[Context, int, str], tuple[list[Path], dict[str, Any]]]
    finish: Callable[[Context, int], None] | None = None

    def applies_to(self, gen: int) -> bool:
        """Whether this stage runs on generation `gen`."""
        return (gen == 0) == self.human
