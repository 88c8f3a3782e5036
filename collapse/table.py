"""The per-generation metrics table as aligned text (terminal) and as markdown (Prefect UI)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collapse.evals.base import Column


def format_cell(value: Any, fmt: str) -> str:
    """A table value: formatted, or "-" where the evaluation has not run or does not apply."""
    return "-" if value is None else format(value, fmt)


BASELINE_MARK = "*"
BASELINE_NOTE = (
    f"{BASELINE_MARK} at generation 0: a random-init model of the same architecture "
    "(the baseline), not the human corpus"
)


def _is_baseline(row: dict[str, Any], column: Column) -> bool:
    """Whether the row's value of `column` is a random-init baseline's (marked in tables)."""
    return row["generation"] == 0 and column.baseline_at_zero and row.get(column.key) is not None


def row_cells(row: dict[str, Any], columns: Sequence[Column]) -> list[str]:
    """A table row's cells: the generation, then each column's formatted value, a baseline's
    generation-0 value marked (`BASELINE_MARK`, explained by `table_note`)."""
    cells = [str(row["generation"])]
    for column in columns:
        cell = format_cell(row.get(column.key), column.fmt)
        cells.append(cell + BASELINE_MARK if _is_baseline(row, column) else cell)
    return cells


def table_note(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str | None:
    """The line to print under a table whose cells carry `BASELINE_MARK`, else None."""
    marked = any(_is_baseline(row, column) for row in rows for column in columns)
    return BASELINE_NOTE if marked else None


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Aligned text: generation, each column, stages done/total (and `table_note`)."""
    headers = ["gen", *(c.header for c in columns), "stages"]
    body = [[*row_cells(r, columns), f"{r['stages_done']}/{r['stages_total']}"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in body]
    note = table_note(rows, columns)
    return "\n".join(lines + ([note] if note else []))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table of the same values (and `table_note`)."""
    headers = ["gen", *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        # a markdown `*` starts emphasis: escaped
        cells = [cell.replace("*", "\\*") for cell in row_cells(r, columns)]
        lines.append("| " + " | ".join(cells) + " |")
    note = table_note(rows, columns)
    return "\n".join(lines + (["", note.replace("*", "\\*", 1)] if note else []))
