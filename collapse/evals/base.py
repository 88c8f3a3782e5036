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
    from collapse.sections import Section


@dataclass(frozen=True)
class Column:
    """One value of an evaluation shown in the per-generation table.

    Usually a key of the evaluation's result (`source`). A value made from several
    evaluations' results (e.g. the validation NLL per token over the source's own) has
    `combine` instead: (this generation's results, generation 0's results), each by
    evaluation name, -> the value, or None where one it needs is missing.
    """

    key: str  # column name in the metrics table
    source: str  # key in the evaluation's result ("" with `combine`)
    header: str  # short header for the terminal table
    fmt: str = ".3f"
    higher_is_better: bool | None = None  # None: neither (e.g. entropy rises then falls)
    combine: Callable[[dict[str, Any], dict[str, Any]], Any] | None = None
    # Set by `collapse.pipeline.table_columns` for an evaluation with `baseline_at_zero`: its
    # generation-0 value is the random-init baseline's, marked so in tables.
    baseline_at_zero: bool = False


def column_value(result: dict[str, Any], source: str) -> Any:
    """The value a column's `source` names in a result: a key, or `<part>.<key>`."""
    if source in result:
        return result[source]
    part, _, key = source.partition(".")
    inner = result.get(part)
    return inner.get(key) if key and isinstance(inner, dict) else None


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
        baseline_at_zero: its generation 0 is a random-init model of the same architecture (a
            baseline), not the human corpus: comparisons draw it as a line of its own, not as
            the start of the generations' curve.
        key_parts: the stage's inputs (config values, content digests of what it reads).
        earlier_key_parts: the `key_parts` of earlier releases whose records hold the result
            today's would (a setting that left the key because it never changed the result),
            newest first, as a list of key-parts lists. A record under one of them counts as
            done and is rewritten under today's key when a run reaches it, so a key's change
            of formula costs users no finished work.
        run: computes the result dict and returns it with any extra output files.
        order: position among evaluations (default list, tables, figures).
        default: part of `eval.metrics` when a config does not list them.
        settings: its config section `eval.<name>`, or None.
        columns: the table columns, or a function of the config giving them.
        figures: the report figures it draws.
        report_section: HTML for the report's per-run part (e.g. excerpts), or None.
        applies: which generations it runs on, when not "all, or all but 0".
        check: cross-section config problems ("dotted.key: message"), when it is configured.
        inputs: problems with the data on this machine it will read (e.g. a local task file
            without the configured column), found cheaply from a validated config. `collapse
            run`, `submit` and `sweep` report them with the config's before a run first starts,
            not hours in, when the stage gets to read them.
        parts: for an evaluation made of independent jobs (e.g. one fine-tune per downstream
            task), their names under a config. Each part is a stage of its own,
            `eval.<name>/<part>`, with its own key, record and result file
            `gen-NNN/eval/<name>/<part>.json`; `key_parts` and `run` then take the part as a
            third argument, and a column's `source` reads `<part>.<key>`.
    """

    name: str
    description: str
    version: int
    needs_gpu: bool
    on_human_corpus: bool
    key_parts: Callable[..., list[Any]]  # (ctx, gen) or, with parts, (ctx, gen, part)
    run: Callable[..., tuple[dict[str, Any], list[Path]]]  # as key_parts
    order: int = 100
    baseline_at_zero: bool = False
    default: bool = True
    settings: type[Section] | None = None
    columns: tuple[Column, ...] | Callable[[Any], tuple[Column, ...]] = ()
    figures: tuple[Figure, ...] = ()
    report_section: Callable[[Any], str | None] | None = None
    applies: Callable[[Any, int], bool] | None = None
    check: Callable[[Any], list[str]] | None = None
    inputs: Callable[[Any], list[str]] | None = None
    parts: Callable[[Any], list[str]] | None = None
    earlier_key_parts: Callable[..., list[list[Any]]] | None = None  # as key_parts

    @property
    def stage(self) -> str:
        """The stage name in manifests and flows."""
        return f"eval.{self.name}"

    def applies_to(self, config: Any, gen: int) -> bool:
        """Whether this evaluation runs on generation `gen` under `config`."""
        if self.applies is not None:
            return self.applies(config, gen)
        return gen > 0 or self.on_human_corpus

    def stages_for(self, config: Any) -> list[str]:
        """Its stage names under `config`: `eval.<name>`, or one `eval.<name>/<part>` per part."""
        if self.parts is None:
            return [self.stage]
        return [f"{self.stage}/{part}" for part in self.parts(config)]

    def result_of(self, stages: dict[str, Any], config: Any) -> dict[str, Any]:
        """Its result values from a manifest's `stages` ({} where it has not run).

        An evaluation with parts gives `{part: values}`, so a column source `<part>.<key>`
        reads one part's value.
        """
        if self.parts is None:
            return stages.get(self.stage, {}).get("info", {})
        return {
            part: stages.get(f"{self.stage}/{part}", {}).get("info", {})
            for part in self.parts(config)
        }

    def columns_for(self, config: Any) -> tuple[Column, ...]:
        """The table columns under `config`."""
        return self.columns(config) if callable(self.columns) else self.columns
