"""`perplexity`: token-weighted perplexity on generation 0's validation set (paper Fig. 1)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collapse.context import (
    Context,
    corpus_digest,
    load_model,
    load_run_tokenizer,
    stage_record,
    validation_path,
)
from collapse.evals.base import Column, Evaluation, Figure

NAME = "perplexity"  # also read by name: source_fit's KL/tok column, the sweep statistics


def context_window(config: Any) -> int:
    """The perplexity window: `eval.context`, else the model's positions or `train.seq_len`."""
    from collapse.models import context_length

    return config.eval.context or min(context_length(config.model), config.train.seq_len)


def _key(ctx: Context, gen: int) -> list[Any]:
    model = stage_record(ctx, gen, "train")["digest"]
    return [ctx.config.eval.context, model, corpus_digest(ctx, 0)]


def _run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.corpus.parquet import documents
    from collapse.device import pick_device
    from collapse.metrics.perplexity import perplexity
    from collapse.tokenizer import special_ids

    cfg = ctx.config
    device = pick_device(cfg.eval.device)
    start_id, end_id = special_ids(load_run_tokenizer(ctx))
    model = load_model(ctx, gen, device)
    result = perplexity(
        model,
        list(documents([validation_path(ctx)])),
        start_id,
        end_id,
        context=context_window(cfg),
        batch_size=cfg.eval.batch_size,
        device=device,
    )
    ctx.log(f"gen {gen}: validation perplexity {result['perplexity']:.3f}")
    return result, []


def _check(config: Any) -> list[str]:
    from collapse.models import context_length

    positions = context_length(config.model)
    if config.eval.context is not None and config.eval.context > positions:
        return [
            f"eval.context ({config.eval.context}) exceeds model.max_position_embeddings "
            f"({positions})"
        ]
    return []


def _figure(runs: Sequence[Any]) -> bytes | None:
    from collapse.plotting import has, label, new_figure, png, series

    if not has(runs, "perplexity"):
        return None
    fig = new_figure(6, 4)
    ax = fig.subplots()
    for run in runs:
        x, y = series(run, "perplexity")
        ax.plot(x, y, marker="o", label=label(run, runs))
    ax.set(xlabel="generation", ylabel="perplexity (validation set)", yscale="log")
    ax.set_title("Perplexity on the human validation set")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


EVALUATION = Evaluation(
    name=NAME,
    description="Perplexity on generation 0's validation set (every token after a BOS).",
    version=1,
    needs_gpu=True,
    on_human_corpus=False,
    key_parts=_key,
    run=_run,
    order=10,
    columns=(Column("perplexity", "perplexity", "perplexity", higher_is_better=False),),
    figures=(Figure("perplexity", _figure),),
    check=_check,
)
