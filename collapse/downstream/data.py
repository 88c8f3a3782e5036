"""A downstream task's labelled examples, from the hub, local files or the run's own stories.

Hub and local tasks both go through `datasets.load_dataset`: a hub id and a local folder laid
out like the hub repository take the very same call, so the offline tests exercise the hub path.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collapse.corpus.sources import PREVIEW_ROWS
from collapse.downstream.tasks import TaskSpec
from collapse.errors import UserError, cause_text, logger_silenced

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


@contextlib.contextmanager
def _opened(name: str, spec: TaskSpec, split: str, streaming: bool) -> Iterator[Any]:
    """One split of a hub or local task as a `datasets` dataset (iterable when `streaming`).

    Raises:
        DownstreamTaskError: it cannot be loaded; the message says how to point at a copy.
    """
    from datasets import load_dataset

    with contextlib.ExitStack() as stack:
        kwargs: dict[str, Any] = {"streaming": streaming}
        if spec.source == "local":
            pattern = (spec.data_files or {})[split]
            builder = _BUILDERS.get(Path(pattern).suffix.lower())
            key = f"eval.downstream.task_table.{name}.data_files.{split}"
            if builder is None:
                raise DownstreamTaskError(
                    f"{key}: unsupported file type {Path(pattern).suffix!r}; "
                    f"use one of {sorted(_BUILDERS)}"
                )
            if pattern.endswith(".tsv"):
                kwargs["delimiter"] = "\t"
            try:
                ds = load_dataset(builder, data_files=pattern, split="train", **kwargs)
            except Exception as exc:  # missing file, parse errors: all mean "cannot read"
                raise DownstreamTaskError(
                    f"{key}: cannot read {pattern!r} ({cause_text(exc)})"
                ) from None
        else:
            if local_folder(spec) is not None:
                # `datasets` names its cache of a local folder after the folder's name and
                # layout only, so two copies named alike (or a copy edited in place) would read
                # each other's cached rows: a local folder is converted afresh in a private cache.
                kwargs["cache_dir"] = stack.enter_context(tempfile.TemporaryDirectory())
            try:
                ds = load_dataset(
                    spec.dataset, spec.config, split=split, revision=spec.revision, **kwargs
                )
            except Exception as exc:  # the hub and `datasets` raise many types: "cannot load"
                what = f"{spec.dataset}" + (f" ({spec.config})" if spec.config else "")
                raise DownstreamTaskError(
                    f"eval.downstream: task {name!r} cannot load split {split!r} of {what} "
                    f"({cause_text(exc)}). Without hub access, download the dataset and point "
                    f"the task at the copy: eval.downstream.task_table.{name}.dataset="
                    "/path/to/folder (laid out like the hub repository), or source: local with "
                    "data_files per split"
                ) from None
        yield ds  # read before a private cache goes


def local_folder(spec: TaskSpec) -> Path | None:
    """The local folder a hub-source task reads, or None where `dataset` is a hub id."""
    folder = Path(spec.dataset or "").expanduser()
    return folder if spec.dataset and folder.is_dir() else None


def task_files(spec: TaskSpec) -> dict[str, list[Path]] | None:
    """The local files a task reads, by split (a local folder's as one group); None for a hub
    id or a probe, which read none."""
    from collapse.fingerprint import folder_files, matched

    if spec.source == "local":
        splits = dict.fromkeys((spec.train_split, spec.eval_split))
        return {split: matched((spec.data_files or {})[split]) for split in splits}
    folder = local_folder(spec) if spec.source == "hub" else None
    return {"folder": folder_files(folder)} if folder is not None else None


def _column_problem(name: str, spec: TaskSpec, split: str, columns: list[str]) -> str | None:
    missing = [c for c in [*spec.text, spec.label] if c not in columns]
    if not missing:
        return None
    return (
        f"eval.downstream: task {name!r}: split {split!r} has no column(s) {missing} "
        f"(columns: {', '.join(columns)}); set eval.downstream.task_table.{name}.text "
        f"and .label to the columns that hold the text and the class"
    )


def _class_index(value: Any) -> int:
    index = int(value)
    if isinstance(value, float) and value != index:  # int() would truncate a score (STS-B)
        raise ValueError(f"{value!r} is not a whole number")
    return index


def _labels(name: str, spec: TaskSpec, split: str, values: Sequence[Any]) -> list[int]:
    """A split's label column as class indices.

    Raises:
        DownstreamTaskError: a label is not an integer in 0..num_labels-1.
    """
    where = f"eval.downstream: task {name!r}: split {split!r}"
    try:
        labels = [_class_index(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise DownstreamTaskError(
            f"{where}: column {spec.label!r} holds labels that are not integers "
            f"({cause_text(exc)}); map the classes to 0..{spec.num_labels - 1} in the data"
        ) from None
    bad = sorted({v for v in labels if not 0 <= v < spec.num_labels})
    if bad:
        hint = " (-1 is how GLUE hides test labels: evaluate on validation)" if -1 in bad else ""
        raise DownstreamTaskError(
            f"{where} has labels {bad[:5]} outside 0..{spec.num_labels - 1}{hint}; "
            f"check eval.downstream.task_table.{name}.num_labels"
        )
    return labels


def _split(name: str, spec: TaskSpec, split: str) -> Examples:
    with _opened(name, spec, split, streaming=False) as ds:
        problem = _column_problem(name, spec, split, list(ds.column_names))
        if problem:
            raise DownstreamTaskError(problem)
        labels = _labels(name, spec, split, ds[spec.label])
        columns = [["" if v is None else str(v) for v in ds[c]] for c in spec.text]
    return Examples([tuple(row) for row in zip(*columns, strict=True)], labels)


def preview_problems(name: str, spec: TaskSpec, rows: int = PREVIEW_ROWS) -> list[str]:
    """What is wrong with a task's data that its first `rows` rows per split already show.

    Reads only data on this machine (local files and local folders laid out like the hub),
    streamed, so checking a config costs a moment: an unreadable file, a missing column or
    a label out of range is reported before a run starts rather than when the task's first
    fine-tune does. Hub ids are not fetched here (the stage does, with its own message), and
    probe tasks have no data of their own. A `dataset` written as a path that is no folder is
    reported, since the hub would only answer "no such dataset".

    Args:
        name: the task's name (for messages).
        spec: its table entry.
        rows: rows read per split.
    """
    if spec.source == "probe":
        return []
    if spec.source == "hub" and local_folder(spec) is None:
        written = str(spec.dataset)
        if written.startswith(("/", "./", "../", "~")):
            return [
                f"eval.downstream.task_table.{name}.dataset: {written!r} is not a folder "
                "(a local copy must be a folder laid out like the hub repository)"
            ]
        return []
    problems = []
    for split in dict.fromkeys((spec.train_split, spec.eval_split)):
        try:
            with logger_silenced("datasets"), _opened(name, spec, split, streaming=True) as ds:
                first = list(itertools.islice(ds, rows))
        except DownstreamTaskError as exc:
            problems.append(str(exc))
            continue
        except Exception as exc:  # a parse error surfaces while rows are read
            problems.append(
                f"eval.downstream: task {name!r}: split {split!r} cannot be read "
                f"({cause_text(exc)})"
            )
            continue
        if not first:
            problems.append(f"eval.downstream: task {name!r}: split {split!r} has no rows")
            continue
        problem = _column_problem(name, spec, split, list(first[0]))
        if problem:
            problems.append(problem)
            continue
        try:
            _labels(name, spec, split, [row[spec.label] for row in first])
        except DownstreamTaskError as exc:
            problems.append(str(exc))
    return problems


def _probe(spec: TaskSpec, stories: Sequence[str], seed: int) -> tuple[Examples, Examples]:
    from collapse.downstream.probes import PROBE_BUILDERS, split_stories

    build = PROBE_BUILDERS[spec.probe or ""]
    train_stories, eval_stories = split_stories(stories, seed)
    train = Examples(*build(train_stories, seed + 1))
    held = Examples(*build(eval_stories, seed + 2, train_stories))
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
    return _split(name, spec, spec.train_split), _split(name, spec, spec.eval_split)
