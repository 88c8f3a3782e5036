"""The registry of per-generation evaluations, looked up by name from `eval.metrics`.

Each entry says what it reads (its key parts: config values and the content digests of its
inputs), whether it needs a GPU, whether it also runs on the human corpus (generation 0), which
of its values go into the per-generation table and whether higher is better. Adding an
evaluation means adding an entry here; the pipeline, the flows and the report read the registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collapse.context import Context, corpus_digest, load_model, load_run_tokenizer, stage_record
from collapse.corpus.parquet import documents, shard_paths
from collapse.device import pick_device
from collapse.seeding import derive_seed


@dataclass(frozen=True)
class Column:
    """One value of an evaluation shown in the per-generation table."""

    key: str  # column name in the metrics table
    source: str  # key in the evaluation's result
    header: str  # short header for the terminal table
    fmt: str = ".3f"
    higher_is_better: bool | None = None  # None: neither (e.g. entropy rises then falls)


@dataclass(frozen=True)
class Evaluation:
    """A registered evaluation: stage `eval.<name>`, result in `gen-NNN/eval/<name>.json`."""

    name: str
    description: str
    version: int  # bump when a code change alters the result: only this stage is recomputed
    needs_gpu: bool
    on_human_corpus: bool  # also evaluated on generation 0
    columns: tuple[Column, ...]
    key_parts: Callable[[Context, int], list[Any]]
    run: Callable[[Context, int], tuple[dict[str, Any], list[Path]]]


def _corpus_paths(ctx: Context, gen: int) -> list[Path]:
    return shard_paths(ctx.store.gen_dir(gen) / "corpus")


# --- perplexity ---------------------------------------------------------------------------


def _perplexity_key(ctx: Context, gen: int) -> list[Any]:
    model = stage_record(ctx, gen, "train")["digest"]
    return [ctx.config.eval.context, model, corpus_digest(ctx, 0)]


def _perplexity_run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.perplexity import perplexity

    cfg = ctx.config
    device = pick_device(cfg.eval.device)
    tok = load_run_tokenizer(ctx)
    model = load_model(ctx, gen, device)
    context = cfg.eval.context or min(model.config.max_position_embeddings, cfg.train.seq_len)
    docs = list(documents([ctx.store.gen_dir(0) / "validation.parquet"]))
    result = perplexity(
        model,
        docs,
        tok.bos_token_id,
        tok.eos_token_id,
        context=context,
        batch_size=cfg.eval.batch_size,
        device=device,
    )
    ctx.log(f"gen {gen}: validation perplexity {result['perplexity']:.3f}")
    return result, []


# --- entropy ------------------------------------------------------------------------------


def _entropy_key(ctx: Context, gen: int) -> list[Any]:
    return [corpus_digest(ctx, gen)]


def _entropy_run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.entropy import corpus_entropy

    tok = load_run_tokenizer(ctx)
    result = corpus_entropy(_corpus_paths(ctx, gen), len(tok))
    ctx.log(f"gen {gen}: corpus entropy {result['entropy_bits']:.3f} bits")
    return result, []


# --- OOV (non-words) ----------------------------------------------------------------------

LEXICON_FILE = "lexicon.json"


def _lexicon_path(ctx: Context) -> Path:
    return ctx.store.gen_dir(0) / "eval" / LEXICON_FILE


def _oov_key(ctx: Context, gen: int) -> list[Any]:
    oov = ctx.config.eval.oov
    # Generation 0 builds the lexicon; later generations read it, so they key on its record.
    lexicon = None if gen == 0 else stage_record(ctx, 0, "eval.oov")["digest"]
    return [oov.lexicon_min_count, oov.max_documents, corpus_digest(ctx, gen), lexicon]


def _oov_run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.oov import (
        build_lexicon,
        corpus_texts,
        count_oov,
        load_lexicon,
        save_lexicon,
    )

    oov = ctx.config.eval.oov
    extra: list[Path] = []
    if gen == 0:
        texts = corpus_texts(_corpus_paths(ctx, 0))
        lexicon = build_lexicon(texts, oov.lexicon_min_count, n_process=oov.n_process)
        save_lexicon(lexicon, _lexicon_path(ctx))
        extra.append(_lexicon_path(ctx))
        ctx.log(f"lexicon: {lexicon.name} {lexicon.version}, {lexicon.size:,} words")
    else:
        lexicon = load_lexicon(_lexicon_path(ctx))
    texts = corpus_texts(_corpus_paths(ctx, gen))
    if oov.max_documents is not None:
        texts = (t for i, t in zip(range(oov.max_documents), texts, strict=False))
    result = count_oov(texts, lexicon, load_run_tokenizer(ctx), n_process=oov.n_process)
    ctx.log(
        f"gen {gen}: {result['occurrences']:,} non-words ({result['distinct']:,} distinct), "
        f"{result['rate_per_1000_words']:.2f} per 1,000 words"
    )
    return result, extra


# --- diversity ----------------------------------------------------------------------------


def _diversity_key(ctx: Context, gen: int) -> list[Any]:
    div = ctx.config.eval.diversity
    return [div.n_max, div.self_bleu_samples, ctx.config.run.seed, gen, corpus_digest(ctx, gen)]


def _diversity_run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.diversity import corpus_diversity

    div = ctx.config.eval.diversity
    result = corpus_diversity(
        _corpus_paths(ctx, gen),
        n_max=div.n_max,
        self_bleu_samples=div.self_bleu_samples,
        seed=derive_seed(ctx.config.run.seed, "self-bleu", gen),
    )
    ctx.log(
        f"gen {gen}: distinct-{div.n_max} {result[f'distinct_{div.n_max}']:.3f}, "
        f"rep-{div.n_max} {result[f'rep_{div.n_max}']:.3f}, self-BLEU {result['self_bleu']:.3f}"
    )
    return result, []


# --- excerpts -----------------------------------------------------------------------------


def _excerpts_key(ctx: Context, gen: int) -> list[Any]:
    exc = ctx.config.eval.excerpts
    return [exc.count, exc.max_words, ctx.config.run.seed, gen, corpus_digest(ctx, gen)]


def _excerpts_run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.excerpts import sample_excerpts

    exc = ctx.config.eval.excerpts
    rows = sample_excerpts(
        _corpus_paths(ctx, gen),
        exc.count,
        derive_seed(ctx.config.run.seed, "excerpts", gen),
        max_words=exc.max_words,
    )
    return {"excerpts": rows, "count": len(rows)}, []


REGISTRY: dict[str, Evaluation] = {
    e.name: e
    for e in (
        Evaluation(
            name="perplexity",
            description="Perplexity on generation 0's validation set (every token after a BOS).",
            version=1,
            needs_gpu=True,
            on_human_corpus=False,
            columns=(Column("perplexity", "perplexity", "perplexity", higher_is_better=False),),
            key_parts=_perplexity_key,
            run=_perplexity_run,
        ),
        Evaluation(
            name="entropy",
            description="Unigram token entropy (bits) of the corpus; distinct tokens; EOS share.",
            version=1,
            needs_gpu=False,
            on_human_corpus=True,
            columns=(
                Column("entropy_bits", "entropy_bits", "entropy"),
                Column("distinct_tokens", "distinct_tokens", "distinct", "d", True),
                Column("finished_fraction", "finished_fraction", "EOS-ended", ".3f", True),
                Column("mean_length", "mean_length", "length", ".1f"),
            ),
            key_parts=_entropy_key,
            run=_entropy_run,
        ),
        Evaluation(
            name="oov",
            description="Non-words (spaCy words outside the lexicon, >= 2 tokenizer pieces).",
            version=1,
            needs_gpu=False,
            on_human_corpus=True,
            columns=(
                Column("oov_occurrences", "occurrences", "OOV", "d", False),
                Column("oov_per_1000_words", "rate_per_1000_words", "OOV/1k", ".2f", False),
            ),
            key_parts=_oov_key,
            run=_oov_run,
        ),
        Evaluation(
            name="diversity",
            description="distinct-n, rep-n, Zipf coefficient and self-BLEU of the corpus.",
            version=1,
            needs_gpu=False,
            on_human_corpus=True,
            columns=(
                Column("distinct_4", "distinct_4", "dist-4", ".3f", True),
                Column("rep_4", "rep_4", "rep-4", ".3f", False),
                Column("zipf_coefficient", "zipf_coefficient", "zipf", ".3f"),
                Column("self_bleu", "self_bleu", "self-BLEU", ".3f", False),
            ),
            key_parts=_diversity_key,
            run=_diversity_run,
        ),
        Evaluation(
            name="excerpts",
            description="A seeded handful of stories from the corpus, for reading.",
            version=1,
            needs_gpu=False,
            on_human_corpus=True,
            columns=(),
            key_parts=_excerpts_key,
            run=_excerpts_run,
        ),
    )
}


def evaluation(stage: str) -> Evaluation:
    """The registry entry of an `eval.<name>` stage."""
    return REGISTRY[stage.removeprefix("eval.")]


def write_result(ctx: Context, gen: int, name: str, result: dict[str, Any]) -> Path:
    """Write `gen-NNN/eval/<name>.json` atomically."""
    from collapse.store import atomic_write_json

    path = ctx.store.gen_dir(gen) / "eval" / f"{name}.json"
    atomic_write_json(path, {"metric": name, "generation": gen, **result})
    return path


def read_result(ctx: Context, gen: int, name: str) -> dict[str, Any] | None:
    """An evaluation's stored result, or None if it has not run."""
    path = ctx.store.gen_dir(gen) / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
