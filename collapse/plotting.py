"""Helpers the evaluations' report figures share: series from runs' tables, PNG encoding.

Figure objects, not pyplot: no GUI backend, no global figure registry to leak into.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LINE_STYLES = ("-", "--", ":", "-.")


def series(run: Any, key: str) -> tuple[list[int], list[float]]:
    """(generations, values) of a table column of one run, where it has a value."""
    points = [(r["generation"], r.get(key)) for r in run.rows if r.get(key) is not None]
    return [g for g, _ in points], [v for _, v in points]


def has(runs: Sequence[Any], key: str) -> bool:
    """Whether any run has a value in column `key`."""
    return any(series(run, key)[0] for run in runs)


def label(run: Any, runs: Sequence[Any]) -> str:
    """A run's legend label: its name alone, its run id among several."""
    return run.run_id if len(runs) > 1 else run.config.run.name


def suffix(run: Any, runs: Sequence[Any]) -> str:
    """ " (run id)" after a series name when several runs share a figure, else ""."""
    return f" ({label(run, runs)})" if len(runs) > 1 else ""


def new_figure(width: float, height: float) -> Figure:
    """A figure that belongs to no pyplot state."""
    return Figure(figsize=(width, height))


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, generation axes labelled with whole numbers."""
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()
