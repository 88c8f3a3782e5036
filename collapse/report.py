"""The run report: PNG figures like the paper's and a self-contained HTML page.

`write_report([run_dir])` writes `report.html` and `figures/*.png` into the run directory;
with several runs (model sizes, mitigation arms) the figures overlay them and the report goes to
a directory of its own. Everything is read from the runs' manifests and evaluation results, so a
report can be rebuilt at any time, also while a run is going on.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

# Figure objects, not pyplot: no GUI backend, no global figure registry to leak into.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from collapse.config import Config
from collapse.context import Context
from collapse.evals import read_result
from collapse.pipeline import metrics_table, table_columns
from collapse.store import RunStore, atomic_write_bytes
from collapse.table import format_cell, markdown_table


class ReportError(Exception):
    """A report that cannot be made (e.g. a path that is not a run)."""


@dataclass
class RunData:
    """What the report needs from one run."""

    run_id: str
    run_dir: Path
    config: Config
    rows: list[dict[str, Any]]
    excerpts: dict[int, list[dict[str, Any]]]
    judged: dict[int, list[dict[str, Any]]]  # sample completions with their grades


def load_run(run_dir: Path) -> RunData:
    """Read a run's config, metrics table and excerpts from its directory."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ReportError(f"{run_dir} is not a run directory (no config.yaml)")
    config = Config.model_validate(yaml.safe_load(config_path.read_text()))
    ctx = Context(config, RunStore(run_dir.parent, run_dir.name), log=lambda _: None)
    rows = metrics_table(ctx)
    excerpts, judged = {}, {}
    for row in rows:
        result = read_result(ctx, row["generation"], "excerpts")
        if result:
            excerpts[row["generation"]] = result["excerpts"]
        samples = _judged_samples(ctx.store.gen_dir(row["generation"]) / "eval")
        if samples:
            judged[row["generation"]] = samples
    return RunData(run_dir.name, run_dir, config, rows, excerpts, judged)


def _judged_samples(eval_dir: Path, count: int = 2) -> list[dict[str, Any]]:
    """The first completions of the first prompt with their grades (Extended Data Table 2)."""
    completions, grades = eval_dir / "judge-completions.parquet", eval_dir / "judge-grades.parquet"
    if not (completions.is_file() and grades.is_file()):
        return []
    texts = pq.read_table(completions).slice(0, count).to_pylist()
    scores = pq.read_table(grades).slice(0, count).to_pylist()
    return [{**t, **g} for t, g in zip(texts, scores, strict=False)]


def _series(run: RunData, key: str) -> tuple[list[int], list[float]]:
    points = [(r["generation"], r.get(key)) for r in run.rows if r.get(key) is not None]
    return [g for g, _ in points], [v for _, v in points]


def _has(runs: Sequence[RunData], key: str) -> bool:
    return any(_series(run, key)[0] for run in runs)


def _png(fig: Figure) -> bytes:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # generations are whole numbers
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _label(run: RunData, runs: Sequence[RunData]) -> str:
    return run.run_id if len(runs) > 1 else run.config.run.name


def figure_perplexity(runs: Sequence[RunData]) -> bytes | None:
    """Perplexity on the original validation set vs generation (paper Fig. 1)."""
    if not _has(runs, "perplexity"):
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for run in runs:
        x, y = _series(run, "perplexity")
        ax.plot(x, y, marker="o", label=_label(run, runs))
    ax.set(xlabel="generation", ylabel="perplexity (validation set)", yscale="log")
    ax.set_title("Perplexity on the human validation set")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def figure_entropy_oov(runs: Sequence[RunData]) -> bytes | None:
    """Corpus entropy (left axis) and OOV count (right axis) vs generation (paper Fig. 2)."""
    has_entropy, has_oov = _has(runs, "entropy_bits"), _has(runs, "oov_occurrences")
    if not (has_entropy or has_oov):
        return None
    fig = Figure(figsize=(6.5, 4))
    left = fig.subplots()
    right = left.twinx()
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        style = styles[i % len(styles)]
        suffix = f" ({_label(run, runs)})" if len(runs) > 1 else ""
        if has_entropy:
            x, y = _series(run, "entropy_bits")
            left.plot(x, y, style, color="tab:blue", marker="o", label="entropy" + suffix)
        if has_oov:
            x, y = _series(run, "oov_occurrences")
            right.plot(x, y, style, color="tab:red", marker="s", label="OOV words" + suffix)
    left.set_xlabel("generation (0 = human corpus)")
    left.set_ylabel("unigram token entropy (bits)", color="tab:blue")
    right.set_ylabel("non-word occurrences", color="tab:red")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="best", fontsize="small")
    left.set_title("Entropy and OOV words of each generated corpus")
    left.grid(alpha=0.3)
    return _png(fig)


def figure_diversity(runs: Sequence[RunData]) -> bytes | None:
    """distinct-4, rep-4, self-BLEU and Zipf coefficient vs generation."""
    panels = [
        ("distinct_4", "distinct-4 (higher: more diverse)"),
        ("rep_4", "rep-4 (higher: more repetition)"),
        ("self_bleu", "self-BLEU (higher: more alike)"),
        ("zipf_coefficient", "Zipf coefficient"),
    ]
    panels = [(k, t) for k, t in panels if _has(runs, k)]
    if not panels:
        return None
    fig = Figure(figsize=(3.6 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for run in runs:
            x, y = _series(run, key)
            ax.plot(x, y, marker="o", label=_label(run, runs))
        ax.set(title=title, xlabel="generation")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return _png(fig)


def figure_judge(runs: Sequence[RunData]) -> bytes | None:
    """Judge grammar and consistency vs generation, the random-init baseline as lines (Fig. 3)."""
    if not _has(runs, "judge_grammar"):
        return None
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    colors = {"judge_grammar": "tab:green", "judge_consistency": "tab:purple"}
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        suffix = f" ({_label(run, runs)})" if len(runs) > 1 else ""
        for key, color in colors.items():
            name = key.removeprefix("judge_")
            x, y = _series(run, key)
            points = [(g, v) for g, v in zip(x, y, strict=True) if g > 0]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    styles[i % 4],
                    color=color,
                    marker="o",
                    label=name + suffix,
                )
            if x and x[0] == 0:  # generation 0 holds the random-init baseline
                ax.axhline(
                    y[0],
                    color=color,
                    linestyle=styles[i % 4],
                    alpha=0.5,
                    label=f"{name}, random init{suffix}",
                )
    ax.set(xlabel="generation", ylabel="judge grade (0-9)", ylim=(0, 9))
    ax.set_title("LLM-judge grades of story completions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


FIGURES = {
    "perplexity": figure_perplexity,
    "entropy-oov": figure_entropy_oov,
    "diversity": figure_diversity,
    "judge": figure_judge,
}


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table_html(run: RunData) -> str:
    columns = table_columns(run.config)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["gen", *(c.header for c in columns)])
    body = []
    for row in run.rows:
        cells = [str(row["generation"]), *(format_cell(row.get(c.key), c.fmt) for c in columns)]
        body.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _judged_html(run: RunData) -> str:
    rows = []
    for gen, items in sorted(run.judged.items()):
        who = "random init" if gen == 0 else str(gen)
        for item in items:
            grades = (
                "failed: " + str(item["failure"])
                if item.get("failure")
                else (f"{item['grammar']} / {item['creativity']} / {item['consistency']}")
            )
            rows.append(
                f"<tr><td>{who}</td><td>{html.escape(item['prompt'][-120:])}</td>"
                f"<td>{html.escape(item['completion'][:300])}</td><td>{html.escape(grades)}</td></tr>"
            )
    return (
        "<table class='excerpts'><thead><tr><th>model</th><th>prompt (end)</th>"
        "<th>completion</th><th>grammar / creativity / consistency</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _excerpts_html(run: RunData) -> str:
    if not run.excerpts:
        return "<p>skipped: the <code>excerpts</code> evaluation is not in eval.metrics</p>"
    rows = []
    for gen, items in sorted(run.excerpts.items()):
        for item in items[:3]:
            ended = "EOS" if item["finished"] else "cut"
            rows.append(
                f"<tr><td>{gen}</td><td>{html.escape(item['text'])}</td>"
                f"<td>{item['length']}</td><td>{ended}</td></tr>"
            )
    return (
        "<table class='excerpts'><thead><tr><th>gen</th><th>story (opening)</th><th>tokens</th>"
        f"<th>end</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
table.excerpts td:nth-child(2){text-align:left;max-width:700px}
img{max-width:100%;margin:0.5em 0}
code{background:#f4f4f4;padding:0 0.2em}
"""


def _judge_status(run: RunData) -> str:
    if "judge" not in run.config.eval.metrics:
        return "skipped: not in eval.metrics"
    result = read_result(
        Context(run.config, RunStore(run.run_dir.parent, run.run_id), log=lambda _: None),
        0,
        "judge",
    )
    return (result or {}).get("skipped") or "no judged generation yet"


def render_html(runs: Sequence[RunData], figures: dict[str, bytes | None]) -> str:
    """The self-contained report page (figures inlined as base64 PNG)."""
    title = "collapse report: " + ", ".join(run.run_id for run in runs)
    parts = [
        "<!DOCTYPE html>",
        f"<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Generation 0 is the human corpus; generation <i>g</i> is the model trained from "
        "scratch on generation <i>g</i>-1's corpus and the corpus sampled from it.</p>",
        "<h2>Figures</h2>",
    ]
    for name, png in figures.items():
        if png is None:
            parts.append(f"<p>{html.escape(name)}: skipped (no run has these evaluations)</p>")
        else:
            parts.append(_img(png, name))
    for run in runs:
        parts += [
            f"<h2>Run {html.escape(run.run_id)}</h2>",
            f"<p>Artifacts: <code>{html.escape(str(run.run_dir.resolve()))}</code></p>",
            _table_html(run),
            "<h3>Excerpts</h3>",
            _excerpts_html(run),
        ]
        if run.judged:
            parts += ["<h3>Judged completions</h3>", _judged_html(run)]
        else:
            parts.append(f"<p>Judge: {html.escape(_judge_status(run))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: Sequence[Path], out_dir: Path | None = None) -> Path:
    """Write report.html and figures/*.png; returns the path of report.html.

    Args:
        run_dirs: one or more run directories.
        out_dir: where to write; default: the run directory for one run, else
            `<artifact root>/reports/<run1>+<run2>...` next to the first run.
    """
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ReportError("give at least one run")
    if out_dir is None:
        first = runs[0].run_dir
        out_dir = (
            first
            if len(runs) == 1
            else (first.parent / "reports" / "+".join(run.run_id for run in runs))
        )
    figures = {name: make(runs) for name, make in FIGURES.items()}
    for name, png in figures.items():
        if png is not None:
            atomic_write_bytes(out_dir / "figures" / f"{name}.png", png)
    page = out_dir / "report.html"
    atomic_write_bytes(page, render_html(runs, figures).encode())
    return page


def summary_markdown(run: RunData) -> str:
    """Markdown summary for the Prefect UI: the table and the last generation's excerpts."""
    lines = [
        f"# Run {run.run_id}",
        "",
        f"Artifacts: `{run.run_dir.resolve()}`",
        "",
        markdown_table(run.rows, table_columns(run.config)),
    ]
    if run.excerpts:
        gen = max(run.excerpts)
        lines += ["", f"## Excerpts of generation {gen}", ""]
        lines += [f"- {item['text']}" for item in run.excerpts[gen][:5]]
    return "\n".join(lines)
