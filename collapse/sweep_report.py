"""What a sweep's arms have computed: the CLI's arm table and the comparison report.

Everything is read from the arms' run folders: stage progress from the manifests, values only
from valid evaluation records (same key, outputs with their recorded sha256), so the report can
be rebuilt at any time, also while the sweep is running. The evaluations' table columns come from
the registry: an evaluation added later shows up here without an edit.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collapse.context import Context
from collapse.evals import Column, Evaluation, evaluation, registry

# PERPLEXITY: the evaluation whose first column is validation perplexity; the generation where it
# doubles and the area under its curve are computed on that column
from collapse.evals.perplexity import NAME as PERPLEXITY
from collapse.pipeline import metrics_table, table_columns
from collapse.plotting import new_figure, png
from collapse.report import CSS, img_tag
from collapse.store import RunStore, atomic_write_bytes
from collapse.sweep import Arm, Sweep
from collapse.sweep_stats import GroupSummary, Spread, Table, band, summarize
from collapse.table import format_cell


def arm_context(arm: Arm) -> Context:
    """The arm's run as a library context (its folder need not exist yet)."""
    return Context(arm.config, RunStore(arm.config.run.artifact_root, arm.run_id))


Tables = dict[Path, list[dict[str, Any]]]  # run folder -> its metrics table (valid records)


def read_tables(sweep: Sweep) -> Tables:
    """Every run's table (`metrics_table` of valid records only), read once."""
    return {
        arm.run_dir.resolve(): metrics_table(arm_context(arm), valid_only=True)
        for arm in sweep.runs
    }


def generations_done(table: Table) -> int:
    """The last generation g such that generations 0..g have every stage recorded (0: none)."""
    done = 0
    for row in table:
        if row["stages_done"] < row["stages_total"]:
            break
        done = row["generation"]
    return done


def _union_columns(configs: Sequence[Any]) -> list[Column]:
    """The table columns of every config, each once, in order."""
    seen: dict[str, Column] = {}
    for config in configs:
        for column in table_columns(config):
            seen.setdefault(column.key, column)
    return list(seen.values())


def arm_table(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """The CLI's table: arm, run id, generations done, the last done generation's values.

    Returns:
        (headers, rows of cells).
    """
    columns = _union_columns([arm.config for arm in sweep.arms])
    headers = ["arm", "run id", "gens", *(c.header for c in columns)]
    tables = read_tables(sweep)
    rows = []
    for arm in sweep.arms:
        table = tables[arm.run_dir.resolve()]
        done = generations_done(table)
        last = table[done] if done else {}
        values = [format_cell(last.get(c.key), c.fmt) for c in columns]
        rows.append([arm.label, arm.run_id, f"{done}/{arm.config.run.generations}", *values])
    return headers, rows


def text_grid(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """Aligned text: the first `left` columns (names) left-aligned, the rest right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    head = line(headers)
    return "\n".join(
        [head, "-" * max([len(head), *(len(line(r)) for r in rows)]), *(line(r) for r in rows)]
    )


# --- the comparison report ------------------------------------------------------------------


class Group:
    """A group: its label, config, and its seeds' arms and tables (one per distinct run)."""

    def __init__(self, label: str, arms: list[Arm], tables: Tables):
        self.label = label
        self.arms = list({arm.run_dir.resolve(): arm for arm in arms}.values())
        self.config = self.arms[0].config
        self.tables = [tables[arm.run_dir.resolve()] for arm in self.arms]

    def summary(self) -> GroupSummary:
        """The group's row of numbers (see `collapse.sweep_stats.summarize`)."""
        perplexity = None
        if PERPLEXITY in self.config.eval.metrics:
            perplexity = evaluation(PERPLEXITY).columns_for(self.config)[0].key
        last = self.config.run.generations
        keys = [c.key for c in table_columns(self.config)]
        # an evaluation that does not run on N (the paper judges 1, 6, ..., 36 of 40) is read
        # at the last generation it runs on; one that runs on N but has no value there (no
        # valid story to score) stays empty there
        read_at = {}
        for name in self.config.eval.metrics:
            entry = evaluation(name)
            if not entry.applies_to(self.config, last):
                runs_on = [g for g in range(1, last) if entry.applies_to(self.config, g)]
                for column in entry.columns_for(self.config):
                    read_at[column.key] = max(runs_on, default=last)
        return summarize(self.tables, keys, perplexity, last, read_at)


def _columns_of(entry: Evaluation, groups: Sequence[Group]) -> list[Column]:
    seen: dict[str, Column] = {}
    for group in groups:
        if entry.name in group.config.eval.metrics:
            for column in entry.columns_for(group.config):
                seen.setdefault(column.key, column)
    return list(seen.values())


def _log_scale(values: list[float]) -> bool:
    """Whether a panel reads better on a log axis (positive values spanning > 20x)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def draw_evaluation(entry: Evaluation, groups: Sequence[Group]) -> bytes | None:
    """One panel per table column of `entry`: each group's mean over seeds, band min-max.

    Returns:
        PNG bytes, or None when no group has a value in any of its columns.
    """
    columns = [c for c in _columns_of(entry, groups) if any(band(g.tables, c.key) for g in groups)]
    if not columns:
        return None
    ncols = min(2, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig = new_figure(5.2 * ncols, 3.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, column in zip(axes, columns, strict=False):
        plotted: list[float] = []
        for i, group in enumerate(groups):
            points = band(group.tables, column.key)
            if entry.baseline_at_zero:  # generation 0 is the random-init model: a line
                baseline = dict(points).get(0)
                points = [(g, s) for g, s in points if g > 0]
                if baseline is not None:
                    ax.axhline(baseline.mean, color=f"C{i}", linestyle="--", linewidth=1)
                    plotted += [baseline.lo, baseline.hi]
            if not points:
                continue
            x = [g for g, _ in points]
            ax.plot(x, [s.mean for _, s in points], marker="o", color=f"C{i}", label=group.label)
            lo, hi = [s.lo for _, s in points], [s.hi for _, s in points]
            ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
            plotted += lo + hi
        better = {True: " (higher is better)", False: " (lower is better)"}
        ax.set(title=column.header + better.get(column.higher_is_better, ""), xlabel="generation")
        if _log_scale(plotted):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    title = f"{entry.name}: mean over seeds, band from min to max"
    if entry.baseline_at_zero:
        title += "; dashed: the random-init model (generation 0)"
    fig.suptitle(title)
    fig.tight_layout()
    return png(fig)


def _cell(value: Spread | None, fmt: str) -> str:
    return "-" if value is None else value.format(fmt)


def _doubling_cell(summary: GroupSummary, last: int) -> str:
    """The doubling generation's cell; seeds that never doubled by N are said, not dropped."""
    if not summary.not_doubled:
        return _cell(summary.doubling, "d")
    never = f"{summary.not_doubled}/{summary.seeds} seeds not by generation {last}"
    if summary.doubling is None:
        return never
    return f"{_cell(summary.doubling, 'd')}; {never}"


def groups_of(sweep: Sweep, tables: Tables) -> list[Group]:
    """The sweep's groups with their seeds' tables."""
    return [Group(label, arms, tables) for label, arms in sweep.groups.items()]


def group_table(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one column per group, one row per quantity.

    Quantities: seeds, N, the first generation whose perplexity exceeds 2x generation 1's, the
    area under the perplexity curve over generations 1..N, and each table column at generation
    N (or, for an evaluation that does not run on N, at the last generation it runs on, said
    in the cell);
    each as mean [min-max] over the group's seeds.
    """
    summaries = [g.summary() for g in groups]
    doubling = [
        _doubling_cell(s, g.config.run.generations) for s, g in zip(summaries, groups, strict=True)
    ]
    seeds = [f"{len(g.arms)} ({', '.join(str(a.seed) for a in g.arms)})" for g in groups]
    rows = [
        ["seeds", *seeds],
        ["last generation N"] + [str(g.config.run.generations) for g in groups],
        ["first generation with perplexity > 2x generation 1's"] + doubling,
        ["area under the perplexity curve, generations 1..N"]
        + [_cell(s.perplexity_area, ".1f") for s in summaries],
    ]
    for column in _union_columns([g.config for g in groups]):
        cells = []
        for group, summary in zip(groups, summaries, strict=True):
            cell = _cell(summary.last.get(column.key), column.fmt)
            at = summary.last_at.get(column.key, group.config.run.generations)
            if at != group.config.run.generations:
                cell += f" (generation {at})"  # not evaluated on N
            cells.append(cell)
        rows.append([f"{column.header} at generation N", *cells])
    return ["", *(g.label for g in groups)], rows


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _arms_rows(sweep: Sweep, tables: Tables) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "group", "seed", "run id", "generations done", "run folder"]
    rows = []
    for arm in sweep.arms:
        done = generations_done(tables[arm.run_dir.resolve()])
        rows.append(
            [
                arm.label,
                arm.group,
                str(arm.seed),
                arm.run_id,
                f"{done}/{arm.config.run.generations}",
                str(arm.run_dir.resolve()),
            ]
        )
    return headers, rows


def render_sweep_html(
    sweep: Sweep, groups: Sequence[Group], tables: Tables, figures: dict[str, bytes]
) -> str:
    """The self-contained comparison page (figures inlined)."""
    title = f"collapse sweep: {sweep.name}"
    parts = [
        "<!DOCTYPE html>",
        f"<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Sweep <code>{html.escape(str(sweep.path))}</code> over "
        f"<code>{html.escape(str(sweep.base))}</code>: {len(sweep.arms)} arms in "
        f"{len(groups)} groups. A group is the arms that differ only in <code>run.seed</code>; "
        "each curve is its mean over those seeds and the band spans their minimum and maximum. "
        "Values are read from the runs' manifests, valid evaluation results only; a missing "
        "value is shown as -.</p>",
        "<h2>Groups</h2>",
        _html_table(*group_table(groups)),
        "<p>Each cell: mean [min-max] over the group's seeds; (k/n seeds) where only k of "
        "them have the value. Areas need every generation 1..N.</p>",
        "<h2>Figures</h2>",
    ]
    parts += [img_tag(data, name) for name, data in figures.items()]
    if not figures:
        parts.append("<p>No evaluation has a valid result yet.</p>")
    parts += ["<h2>Arms</h2>", _html_table(*_arms_rows(sweep, tables)), "</body></html>"]
    return "\n".join(parts)


def write_sweep_report(sweep: Sweep) -> Path:
    """Write `report.html` and `figures/<evaluation>.png` into `sweep.report_dir` (under a
    URL root, also uploaded to `<artifact_root>/reports/sweep-<name>`).

    Returns:
        The path of report.html.
    """
    tables = read_tables(sweep)
    groups = groups_of(sweep, tables)
    figures: dict[str, bytes] = {}
    for name, entry in registry().items():
        data = draw_evaluation(entry, groups)
        if data is not None:
            figures[name] = data
            atomic_write_bytes(sweep.report_dir / "figures" / f"{name}.png", data)
    page = sweep.report_dir / "report.html"
    atomic_write_bytes(page, render_sweep_html(sweep, groups, tables, figures).encode())
    for written in (page, sweep.report_dir / "figures"):
        if written.exists():
            sweep.report_store.publish(written)
    return page
