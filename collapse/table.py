"""The per-generation metrics table as aligned text (terminal) and as markdown (Prefect UI)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collapse.evals.base import Column


def format_cell(value: Any, fmt: str) -> str:
    """A table value: formatted, or "-" where the evaluation has not run or does not apply."""
    return "-" if value is None else format(value, fmt)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Aligned text: generation, each column, stages done/total."""
    headers = ["gen", *(c.header for c in columns), "stages"]
    body = [
        [
            str(r["generation"]),
            *(format_cell(r.get(c.key), c.fmt) for c in columns),
            f"{r['stages_done']}/{r['stages_total']}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table of the same values."""
    headers = ["gen", *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [str(r["generation"]), *(format_cell(r.get(c.key), c.fmt) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
