"""`excerpts`: a seeded handful of stories of each corpus, for reading."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pydantic import Field

from collapse.context import Context, corpus_digest, corpus_shards, read_result
from collapse.evals.base import Evaluation
from collapse.sections import PositiveInt, Section


class ExcerptsEvalConfig(Section):
    """Stories shown per generation (eval `excerpts`)."""

    count: PositiveInt = Field(8, description="Stories per generation (seeded choice).")
    max_words: PositiveInt = Field(40, description="First sentence, or this many words.")


def _key(ctx: Context, gen: int) -> list[Any]:
    exc = ctx.config.eval.excerpts
    return [exc.count, exc.max_words, ctx.config.run.seed, gen, corpus_digest(ctx, gen)]


def _run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.excerpts import sample_excerpts
    from collapse.seeding import derive_seed

    exc = ctx.config.eval.excerpts
    rows = sample_excerpts(
        corpus_shards(ctx, gen),
        exc.count,
        derive_seed(ctx.config.run.seed, "excerpts", gen),
        max_words=exc.max_words,
    )
    return {"excerpts": rows, "count": len(rows)}, []


def excerpts_of(ctx: Context, generations: list[int]) -> dict[int, list[dict[str, Any]]]:
    """The valid excerpts of each generation that has them."""
    found = {}
    for gen in generations:
        result = read_result(ctx, gen, "excerpts")
        if result:
            found[gen] = result["excerpts"]
    return found


def _section(run: Any) -> str:
    excerpts = excerpts_of(run.context, [r["generation"] for r in run.rows])
    if not excerpts:
        return "<h3>Excerpts</h3><p>no excerpts yet</p>"
    rows = []
    for gen, items in sorted(excerpts.items()):
        for item in items[:3]:
            ended = "EOS" if item["finished"] else "cut"
            rows.append(
                f"<tr><td>{gen}</td><td>{html.escape(item['text'])}</td>"
                f"<td>{item['length']}</td><td>{ended}</td></tr>"
            )
    return (
        "<h3>Excerpts</h3><table class='excerpts'><thead><tr><th>gen</th><th>story (opening)</th>"
        f"<th>story tokens</th><th>end</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


EVALUATION = Evaluation(
    name="excerpts",
    description="A seeded handful of stories from the corpus, for reading.",
    version=1,
    needs_gpu=False,
    on_human_corpus=True,
    key_parts=_key,
    run=_run,
    order=50,
    settings=ExcerptsEvalConfig,
    report_section=_section,
)
