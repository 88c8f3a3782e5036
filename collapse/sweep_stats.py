"""Numbers that compare sweep groups over their seeds: mean and min-max spread, the generation
where perplexity doubles, the area under the perplexity curve.

Plain functions over per-generation tables (one list of `{"generation": g, column: value}` rows
per seed, as `collapse.pipeline.metrics_table` gives them); None is a value that is missing
(not computed, not valid, or not applicable), never a zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Table = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class Spread:
    """A quantity over the seeds of a group: mean and range of the seeds that have it."""

    mean: float
    lo: float
    hi: float
    count: int  # seeds with a value
    total: int  # seeds in the group

    def format(self, fmt: str = ".3f") -> str:
        """`mean [min-max]`, with `(k/n seeds)` when only some seeds have a value.

        Integer formats (`d`) keep the bounds whole and give the mean one decimal.
        """
        mean_fmt = ".1f" if fmt == "d" and self.mean != int(self.mean) else fmt
        mean = format(int(self.mean) if mean_fmt == "d" else self.mean, mean_fmt)
        text = mean
        if self.count > 1:
            lo, hi = (int(v) if fmt == "d" else v for v in (self.lo, self.hi))
            text += f" [{format(lo, fmt)}-{format(hi, fmt)}]"
        if self.count < self.total:
            text += f" ({self.count}/{self.total} seeds)"
        return text


def spread(values: Sequence[float | None]) -> Spread | None:
    """Mean, min and max of the values that are not None; None when there are none."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return Spread(
        sum(present) / len(present), min(present), max(present), len(present), len(values)
    )


def curve(table: Table, key: str) -> dict[int, float]:
    """{generation: value} of column `key`, where it has a value."""
    return {row["generation"]: row[key] for row in table if row.get(key) is not None}


def first_exceeding(
    values: dict[int, float], factor: float = 2.0, reference: int = 1
) -> int | None:
    """The first generation after `reference` whose value exceeds `factor` x the reference's.

    None when the reference generation has no value or no later generation exceeds it.
    """
    if reference not in values:
        return None
    limit = factor * values[reference]
    later = sorted(g for g in values if g > reference and values[g] > limit)
    return later[0] if later else None


def trapezoid_area(values: dict[int, float], first: int, last: int) -> float | None:
    """Area under the curve over generations first..last (trapezoid rule, unit steps).

    None unless every generation first..last has a value and there are at least two of them:
    an area over missing generations would be an area over a different curve.
    """
    gens = range(first, last + 1)
    if last <= first or any(g not in values for g in gens):
        return None
    return sum((values[g] + values[g + 1]) / 2 for g in range(first, last))


def band(tables: Sequence[Table], key: str) -> list[tuple[int, Spread]]:
    """Per generation, the spread of column `key` over the tables (seeds) that have it."""
    curves = [curve(t, key) for t in tables]
    gens = sorted({g for c in curves for g in c})
    return [(g, spread([c.get(g) for c in curves])) for g in gens]  # type: ignore[misc]


@dataclass(frozen=True)
class GroupSummary:
    """A group's row of the comparison table."""

    seeds: int
    doubling: Spread | None  # first generation whose perplexity > 2x generation 1's
    # seeds whose perplexity never doubled by N (left out of `doubling`, which would otherwise
    # read as if they lacked the values): how many
    not_doubled: int
    perplexity_area: Spread | None  # trapezoid over generations 1..N
    last: dict[str, Spread | None]  # each column's value at `last_at[column]`
    # N, or for an evaluation of some generations only (the paper judges and fine-tunes 1, 6,
    # ..., 36 of 40) the last of them
    last_at: dict[str, int]


def summarize(
    tables: Sequence[Table],
    keys: Sequence[str],
    perplexity_key: str | None,
    last: int,
    read_at: dict[str, int] | None = None,
) -> GroupSummary:
    """Summarise one group from its seeds' tables.

    Args:
        tables: one per-generation table per seed.
        keys: the table columns to summarise at generation `last`.
        perplexity_key: the column of validation perplexity, None when not evaluated.
        last: the last generation N (run.generations).
        read_at: columns to summarise at another generation instead (those of an evaluation
            that does not run on N).
    """
    doubling: Spread | None = None
    area: Spread | None = None
    not_doubled = 0
    if perplexity_key is not None:
        ppl = [curve(t, perplexity_key) for t in tables]
        crossings = [first_exceeding(c) for c in ppl]
        doubling = spread(crossings)  # type: ignore[arg-type]
        area = spread([trapezoid_area(c, 1, last) for c in ppl])
        not_doubled = sum(
            crossed is None and 1 in c and last in c
            for crossed, c in zip(crossings, ppl, strict=True)
        )
    at = {key: (read_at or {}).get(key, last) for key in keys}
    values = {key: spread([curve(t, key).get(at[key]) for t in tables]) for key in keys}
    return GroupSummary(len(tables), doubling, not_doubled, area, values, at)
