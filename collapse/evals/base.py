"""What an evaluation declares: its stage, config section, table columns, figures and report part.

An evaluation is one module of `collapse.evals` (or of another package, through the entry-point
group `collapse.evaluations`) that defines `EVALUATION = Evaluation(...)`. The config (its
`eval.metrics` choices and `eval.<name>` section), the pipeline and flows (its stage), the CLI
and Prefect tables (its columns) and the report (its figures and section) all read that entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collapse.context import Context
    from collapse.sections import Section


@dataclass(frozen=True)
class Column:
    """One value of an evaluation shown in the per-generation table."""

    key: str  # column name in the metrics table
    source: str  # key in the evaluation's result
    header: str  # short header for the terminal table
    fmt: str = ".3f"
    higher_is_better: bool | None = None  # None: neither (e.g. entropy rises then falls)


@dataclass(frozen=True)
class Figure:
    """A report figure: `draw(runs)` returns PNG bytes, or None when no run has its values."""

    name: str  # file name: figures/<name>.png
    draw: Callable[[Sequence[Any]], bytes | None]


@dataclass(frozen=True)
class Evaluation:
    """A registered evaluation: stage `eval.<name>`, result in `gen-NNN/eval/<name>.json`.

    Attributes:
        name: registry name, used in `eval.metrics` and as the config section `eval.<name>`.
        description: one line for the docs.
        version: bump when a code change alters the result: only this stage is recomputed.
        needs_gpu: runs a model (holds the GPU concurrency limit).
        on_human_corpus: also evaluated on generation 0.
        key_parts: the stage's inputs (config values, content digests of what it reads).
        run: computes the result dict and returns it with any extra output files.
        order: position among evaluations (default list, tables, figures).
        default: part of `eval.metrics` when a config does not list them.
        settings: its config section `eval.<name>`, or None.
        columns: the table columns, or a function of the config giving them.
        figures: the report figures it draws.
        report_section: HTML for the report's per-run part (e.g. excerpts), or None.
        applies: which generations it runs on, when not "all, or all but 0".
        check: cross-section config problems ("dotted.key: message"), when it is configured.
    """

    name: str
    description: str
    version: int
    needs_gpu: bool
    on_human_corpus: bool
    key_parts: Callable[[Context, int], list[Any]]
    run: Callable[[Context, int], tuple[dict[str, Any], list[Path]]]
    order: int = 100
    default: bool = True
    settings: type[Section] | None = None
    columns: tuple[Column, ...] | Callable[[Any], tuple[Column, ...]] = ()
    figures: tuple[Figure, ...] = ()
    report_section: Callable[[Any], str | None] | None = None
    applies: Callable[[Any, int], bool] | None = None
    check: Callable[[Any], list[str]] | None = None

    @property
    def stage(self) -> str:
        """The stage name in manifests and flows."""
        return f"eval.{self.name}"

    def applies_to(self, config: Any, gen: int) -> bool:
        """Whether this evaluation runs on generation `gen` under `config`."""
        if self.applies is not None:
            return self.applies(config, gen)
        return gen > 0 or self.on_human_corpus

    def columns_for(self, config: Any) -> tuple[Column, ...]:
        """The table columns under `config`."""
        return self.columns(config) if callable(self.columns) else self.columns
