"""`oov`: non-words, spaCy words outside a lexicon that span >= 2 tokenizer pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from collapse.context import Context, corpus_digest, corpus_shards, stage_record
from collapse.evals.base import Column, Evaluation
from collapse.sections import PositiveInt, Section

LEXICON_FILE = "lexicon.json"


class OOVEvalConfig(Section):
    """Non-word counts (eval `oov`)."""

    lexicon_min_count: PositiveInt = Field(
        3, description="Words seen this often in the human corpus join the lexicon (names)."
    )
    max_documents: PositiveInt | None = Field(
        None, description="Score only the first N documents of each corpus (cost cap)."
    )
    processes: PositiveInt = Field(
        1, description="Worker processes counting shards in parallel (1: in-process)."
    )


def lexicon_path(ctx: Context) -> Path:
    """The lexicon built from the human corpus by generation 0's OOV stage."""
    return ctx.store.eval_dir(0) / LEXICON_FILE


def _key(ctx: Context, gen: int) -> list[Any]:
    oov = ctx.config.eval.oov
    # Generation 0 builds the lexicon; later generations read it, so they key on its record.
    lexicon = None if gen == 0 else stage_record(ctx, 0, "eval.oov")["digest"]
    return [oov.lexicon_min_count, oov.max_documents, corpus_digest(ctx, gen), lexicon]


def _run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.oov import (
        build_lexicon,
        corpus_texts,
        count_oov_shards,
        load_lexicon,
        save_lexicon,
    )

    oov = ctx.config.eval.oov
    extra: list[Path] = []
    if gen == 0:
        lexicon = build_lexicon(corpus_texts(corpus_shards(ctx, 0)), oov.lexicon_min_count)
        save_lexicon(lexicon, lexicon_path(ctx))
        extra.append(lexicon_path(ctx))
        ctx.log(f"lexicon: {lexicon.name} {lexicon.version}, {lexicon.size:,} words")
    else:
        lexicon = load_lexicon(ctx.store.pull(lexicon_path(ctx)))
    result = count_oov_shards(
        corpus_shards(ctx, gen),
        lexicon,
        ctx.store.pull(ctx.store.tokenizer_dir()),
        processes=oov.processes,
        max_documents=oov.max_documents,
    )
    ctx.log(
        f"gen {gen}: {result['occurrences']:,} non-words ({result['distinct']:,} distinct), "
        f"{result['rate_per_1000_words']:.2f} per 1,000 words"
    )
    return result, extra


EVALUATION = Evaluation(
    name="oov",
    description="Non-words (spaCy words outside the lexicon, >= 2 tokenizer pieces).",
    version=1,
    needs_gpu=False,
    on_human_corpus=True,
    key_parts=_key,
    run=_run,
    order=30,
    settings=OOVEvalConfig,
    columns=(
        Column("oov_occurrences", "occurrences", "OOV", "d", False),
        Column("oov_per_1000_words", "rate_per_1000_words", "OOV/1k", ".2f", False),
    ),
)
