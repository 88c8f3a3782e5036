"""The downstream task table: what each fine-tuning task reads, as data.

The built-in table is `data/downstream/tasks.yaml` (the paper's GLUE tasks, IMDB, Yelp polarity,
and two offline probes built from the run's own validation stories). A config adds tasks or
overrides fields of built-in ones with `eval.downstream.task_table`, merged field by field, so
e.g. `eval.downstream.task_table.sst2.dataset=/data/glue` points SST-2 at a local copy.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from collapse import yaml_strict
from collapse.sections import PositiveFloat, PositiveInt, Section

TASK_TABLE_PATH = Path(__file__).resolve().parents[2] / "data" / "downstream" / "tasks.yaml"
PROBES = ("acceptability", "word_order", "coherence")
METRICS = ("accuracy", "f1_weighted", "f1_macro", "mcc")


class TaskSpec(Section):
    """One downstream task: where its labelled examples come from and how it is fine-tuned."""

    description: str = Field("", description="One line for tables and the report.")
    source: Literal["hub", "local", "probe"] = Field(
        description="hub: load_dataset(dataset, config) (a hub id or a local folder laid out "
        "like the hub repository); local: data_files; probe: built from the run's validation "
        "stories."
    )
    dataset: str | None = Field(None, description="source hub: hub id or local folder.")
    config: str | None = Field(None, description="source hub: the dataset's config name.")
    revision: str | None = Field(None, description="source hub: a pinned revision (commit/tag).")
    data_files: dict[str, str] | None = Field(
        None, description="source local: split name -> file or glob (.csv, .jsonl, .parquet)."
    )
    probe: Literal[PROBES] | None = Field(  # type: ignore[valid-type]
        None, description="source probe: which probe (acceptability | coherence)."
    )
    text: list[str] = Field(
        min_length=1, max_length=2, description="Text column(s); two are a sentence pair."
    )
    label: str = Field("label", description="Label column (integers 0..num_labels-1).")
    train_split: str = Field("train", description="Split fine-tuned on.")
    eval_split: str = Field("validation", description="Split evaluated on.")
    num_labels: PositiveInt = Field(2, description="Number of classes.")
    max_length: PositiveInt = Field(128, description="Tokens kept per example (then cut).")
    epochs: PositiveFloat = Field(1.0, description="Passes over the training split (may be < 1).")
    metric: Literal[METRICS] = Field(  # type: ignore[valid-type]
        "accuracy", description="The task's headline metric (CoLA: mcc)."
    )

    @model_validator(mode="after")
    def _source_fields(self) -> TaskSpec:
        if self.source == "hub" and not self.dataset:
            raise ValueError("source hub needs `dataset` (a hub id or a local folder)")
        if self.source == "local":
            missing = [
                s for s in (self.train_split, self.eval_split) if s not in (self.data_files or {})
            ]
            if missing:
                raise ValueError(
                    f"source local needs `data_files` with the splits {missing} "
                    "(e.g. data_files: {train: train.csv, validation: dev.csv})"
                )
        if self.source == "probe" and self.probe is None:
            raise ValueError(f"source probe needs `probe` ({' | '.join(PROBES)})")
        return self


@functools.cache
def builtin_table() -> dict[str, dict[str, Any]]:
    """The shipped task table (raw YAML entries, validated by `task_table`)."""
    return yaml_strict.safe_load(TASK_TABLE_PATH.read_text())


def merged_entries(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The built-in entries with `overrides` merged field by field (new names are added)."""
    table = {name: dict(entry) for name, entry in builtin_table().items()}
    for name, fields in overrides.items():
        table[name] = {**table.get(name, {}), **fields}
    return table


def table_problems(overrides: dict[str, dict[str, Any]], where: str) -> list[str]:
    """Problems ("dotted.key: message") of the task entries an override touches."""
    problems = []
    entries = merged_entries(overrides)
    for name in overrides:
        try:
            TaskSpec.model_validate(entries[name])
        except ValidationError as exc:
            for error in exc.errors():
                loc = ".".join(str(p) for p in error["loc"])
                key = f"{where}.{name}" + (f".{loc}" if loc else "")
                problems.append(f"{key}: {error['msg'].removeprefix('Value error, ')}")
    return problems


def task_spec(name: str, overrides: dict[str, dict[str, Any]]) -> TaskSpec:
    """The spec of task `name` under a config's `task_table` overrides.

    Raises:
        KeyError: no such task (config validation reports this before a run starts).
    """
    return TaskSpec.model_validate(merged_entries(overrides)[name])
