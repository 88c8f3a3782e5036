"""The run report: PNG figures like the paper's and a self-contained HTML page.

`write_report([run_dir])` writes `report.html` and `figures/*.png` into the run directory;
with several runs (model sizes, mitigation arms) the figures overlay them and the report goes to
a directory of its own. Everything is read from the runs' manifests and evaluation results, so a
report can be rebuilt at any time, also while a run is going on.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collapse.config import Config
from collapse.context import Context, RunNotFoundError, open_run, read_result
from collapse.errors import UserError
from collapse.evals import Figure, registry
from collapse.pipeline import metrics_table, table_columns
from collapse.store import atomic_write_bytes
from collapse.table import markdown_table, row_cells, table_note


class ReportError(UserError):
    """A report that cannot be made (e.g. a path that is not a run)."""


@dataclass
class RunData:
    """What the report needs from one run: its context and its per-generation table."""

    context: Context
    rows: list[dict[str, Any]]

    @property
    def run_id(self) -> str:
        """The run folder name."""
        return self.context.store.run_id

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return self.context.store.run_dir

    @property
    def config(self) -> Config:
        """The run's saved config."""
        return self.context.config


def load_run(run_dir: str | Path) -> RunData:
    """Read a run's config and metrics table from its directory (or its URL)."""
    try:
        ctx = open_run(run_dir)
    except RunNotFoundError as exc:
        raise ReportError(str(exc)) from None
    return RunData(ctx, metrics_table(ctx))


def report_figures() -> list[Figure]:
    """Every registered evaluation's figures, in registry order."""
    return [figure for entry in registry().values() for figure in entry.figures]


def img_tag(png: bytes, alt: str) -> str:
    """An <img> with the PNG inlined (the page stays one self-contained file)."""
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table_html(run: RunData) -> str:
    columns = table_columns(run.config)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["gen", *(c.header for c in columns)])
    body = []
    for row in run.rows:
        cells = row_cells(row, columns)
        body.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    note = table_note(run.rows, columns)
    return table + (f"<p>{html.escape(note)}</p>" if note else "")


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
table.excerpts td:nth-child(2){text-align:left;max-width:700px}
img{max-width:100%;margin:0.5em 0}
code{background:#f4f4f4;padding:0 0.2em}
"""


def render_html(runs: Sequence[RunData], figures: dict[str, bytes | None]) -> str:
    """The self-contained report page (figures inlined as base64 PNG)."""
    title = "collapse report: " + ", ".join(run.run_id for run in runs)
    parts = [
        "<!DOCTYPE html>",
        f"<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Generation 0 is the human corpus (for the evaluations of a model, such as the "
        "judge and fine-tuning, a random-init model of the same architecture); generation "
        "<i>g</i> is the model trained from scratch on generation <i>g</i>-1's corpus and the "
        "corpus sampled from it.</p>",
        "<h2>Figures</h2>",
    ]
    for name, png in figures.items():
        if png is None:
            parts.append(f"<p>{html.escape(name)}: skipped (no run has these evaluations)</p>")
        else:
            parts.append(img_tag(png, name))
    for run in runs:
        parts += [
            f"<h2>Run {html.escape(run.run_id)}</h2>",
            f"<p>Artifacts: <code>{html.escape(run.context.store.location)}</code></p>",
            _table_html(run),
        ]
        for name, entry in registry().items():
            if entry.report_section is None:
                continue
            if name in run.config.eval.metrics:
                parts.append(entry.report_section(run) or "")
            else:
                parts.append(f"<p>{html.escape(name)}: skipped: not in eval.metrics</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: Sequence[str | Path], out_dir: Path | None = None) -> Path:
    """Write report.html and figures/*.png; returns the path of report.html.

    Args:
        run_dirs: one or more run directories (or URLs of runs under a URL root).
        out_dir: where to write; default: the run directory for one run (under a URL root:
            its staging copy, and the report is uploaded to the run's URL too), else
            `<artifact root>/reports/<run1>+<run2>...` next to the first run (its staging
            copy, under a URL root).
    """
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ReportError("give at least one run")
    if out_dir is None:
        first = runs[0].run_dir
        out_dir = (
            first
            if len(runs) == 1
            else (first.parent / "reports" / "+".join(run.run_id for run in runs))
        )
    figures = {figure.name: figure.draw(runs) for figure in report_figures()}
    for name, png in figures.items():
        if png is not None:
            atomic_write_bytes(out_dir / "figures" / f"{name}.png", png)
    page = out_dir / "report.html"
    atomic_write_bytes(page, render_html(runs, figures).encode())
    if out_dir == runs[0].run_dir and len(runs) == 1:
        for written in [page, out_dir / "figures"]:
            if written.exists():
                runs[0].context.store.publish(written)
    return page


def summary_markdown(run: RunData) -> str:
    """Markdown summary for the Prefect UI: the table and the last generation's excerpts."""
    lines = [
        f"# Run {run.run_id}",
        "",
        f"Artifacts: `{run.context.store.location}`",
        "",
        markdown_table(run.rows, table_columns(run.config)),
    ]
    for row in reversed(run.rows):
        result = read_result(run.context, row["generation"], "excerpts")
        if result:
            lines += ["", f"## Excerpts of generation {row['generation']}", ""]
            lines += [f"- {item['text']}" for item in result["excerpts"][:5]]
            break
    return "\n".join(lines)
