"""A downstream task's labelled examples, from the hub, local files or the run's own stories.

Hub and local tasks both go through `datasets.load_dataset`: a hub id and a local folder laid
out like the hub repository take the very same call, so the offline tests exercise the hub path.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collapse.downstream.tasks import TaskSpec
from collapse.errors import UserError, cause_text

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DownstreamTaskError(UserError):
    """A downstream task's data cannot be used; the message names the task and the fix."""


@dataclass(frozen=True)
class Examples:
    """Labelled examples of one split: one text (or a sentence pair) and a class each."""

    texts: list[tuple[str, ...]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, cap: int | None, seed: int) -> Examples:
        """A seeded random subset of at most `cap` examples, in their original order."""
        if cap is None or cap >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), cap))
        return Examples([self.texts[i] for i in keep], [self.labels[i] for i in keep])


def _hub_split(name: str, spec: TaskSpec, split: str) -> Examples:
    from datasets import load_dataset

    folder = Path(spec.dataset or "").expanduser()
    with contextlib.ExitStack() as stack:
        kwargs: dict[str, Any] = {}
        if folder.is_dir():
            # `datasets` names its cache of a local folder after the folder's name and layout
            # only, so two copies named alike (or a copy edited in place) would read each
            # other's cached rows: a local folder is converted afresh in a private cache.
            kwargs["cache_dir"] = stack.enter_context(tempfile.TemporaryDirectory())
        try:
            ds = load_dataset(
                spec.dataset, spec.config, split=split, revision=spec.revision, **kwargs
            )
        except Exception as exc:  # the hub and `datasets` raise many types: "cannot load"
            what = spec.dataset + (f" ({spec.config})" if spec.config else "")
            raise DownstreamTaskError(
                f"eval.downstream: task {name!r} cannot load split {split!r} of {what} "
                f"({cause_text(exc)}). Without hub access, download the dataset and point the "
                f"task at the copy: eval.downstream.task_table.{name}.dataset=/path/to/folder "
                "(laid out like the hub repository), or source: local with data_files per split"
            ) from None
        return _from_dataset(name, spec, split, ds)  # read before the private cache goes


def _local_split(name: str, spec: TaskSpec, split: str) -> Examples:
    from datasets import load_dataset

    pattern = (spec.data_files or {})[split]
    builder = _BUILDERS.get(Path(pattern).suffix.lower())
    key = f"eval.downstream.task_table.{name}.data_files.{split}"
    if builder is None:
        raise DownstreamTaskError(
            f"{key}: unsupported file type {Path(pattern).suffix!r}; use one of {sorted(_BUILDERS)}"
        )
    kwargs = {"delimiter": "\t"} if pattern.endswith(".tsv") else {}
    try:
        ds = load_dataset(builder, data_files=pattern, split="train", **kwargs)
    except Exception as exc:  # missing file, parse errors: all mean "cannot read"
        raise DownstreamTaskError(f"{key}: cannot read {pattern!r} ({cause_text(exc)})") from None
    return _from_dataset(name, spec, split, ds)


def _from_dataset(name: str, spec: TaskSpec, split: str, ds: Any) -> Examples:
    needed = [*spec.text, spec.label]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DownstreamTaskError(
            f"eval.downstream: task {name!r}: split {split!r} has no column(s) {missing} "
            f"(columns: {', '.join(ds.column_names)}); set eval.downstream.task_table.{name}.text "
            f"and .label to the columns that hold the text and the class"
        )
    labels = [int(v) for v in ds[spec.label]]
    bad = sorted({v for v in labels if not 0 <= v < spec.num_labels})
    if bad:
        hint = " (-1 is how GLUE hides test labels: evaluate on validation)" if -1 in bad else ""
        raise DownstreamTaskError(
            f"eval.downstream: task {name!r}: split {split!r} has labels {bad[:5]} outside "
            f"0..{spec.num_labels - 1}{hint}; check eval.downstream.task_table.{name}.num_labels"
        )
    columns = [["" if v is None else str(v) for v in ds[c]] for c in spec.text]
    return Examples([tuple(row) for row in zip(*columns, strict=True)], labels)


def _probe(spec: TaskSpec, stories: Sequence[str], seed: int) -> tuple[Examples, Examples]:
    from collapse.downstream.probes import PROBE_BUILDERS, split_stories

    build = PROBE_BUILDERS[spec.probe or ""]
    train_stories, eval_stories = split_stories(stories, seed)
    train = Examples(*build(train_stories, seed + 1))
    held = Examples(*build(eval_stories, seed + 2))
    return train, held


def load_task(
    name: str, spec: TaskSpec, stories: Callable[[], Sequence[str]], seed: int
) -> tuple[Examples, Examples]:
    """(training examples, evaluation examples) of a task.

    Args:
        name: the task's name (for messages).
        spec: its table entry.
        stories: the run's human validation stories (read only by probe tasks).
        seed: the probes' seed.

    Raises:
        DownstreamTaskError: the data cannot be loaded or lacks a configured column.
    """
    if spec.source == "probe":
        train, held = _probe(spec, stories(), seed)
        if not len(train) or not len(held):
            raise DownstreamTaskError(
                f"eval.downstream: probe task {name!r} found too few validation stories to build "
                "both a training and an evaluation split; use a larger corpus"
            )
        return train, held
    load = _hub_split if spec.source == "hub" else _local_split
    return load(name, spec, spec.train_split), load(name, spec, spec.eval_split)
