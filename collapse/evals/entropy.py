"""`entropy`: unigram token entropy of each corpus, with the OOV count beside it (paper Fig. 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collapse.context import Context, corpus_digest, corpus_shards, load_run_tokenizer
from collapse.evals.base import Column, Evaluation, Figure
from collapse.table import format_cell


def _key(ctx: Context, gen: int) -> list[Any]:
    return [corpus_digest(ctx, gen)]


def _run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.entropy import corpus_entropy

    result = corpus_entropy(corpus_shards(ctx, gen), len(load_run_tokenizer(ctx)))
    ctx.log(f"gen {gen}: corpus entropy {format_cell(result['entropy_bits'], '.3f')} bits")
    return result, []


def _figure(runs: Sequence[Any]) -> bytes | None:
    """Corpus entropy (left axis) and OOV count (right axis) vs generation (paper Fig. 2)."""
    from collapse.plotting import LINE_STYLES, has, new_figure, png, series, suffix

    has_entropy, has_oov = has(runs, "entropy_bits"), has(runs, "oov_occurrences")
    if not (has_entropy or has_oov):
        return None
    fig = new_figure(6.5, 4)
    left = fig.subplots()
    right = left.twinx()
    for i, run in enumerate(runs):
        style = LINE_STYLES[i % len(LINE_STYLES)]
        if has_entropy:
            x, y = series(run, "entropy_bits")
            left.plot(
                x, y, style, color="tab:blue", marker="o", label="entropy" + suffix(run, runs)
            )
        if has_oov:
            x, y = series(run, "oov_occurrences")
            right.plot(
                x, y, style, color="tab:red", marker="s", label="OOV words" + suffix(run, runs)
            )
    left.set_xlabel("generation (0 = human corpus)")
    left.set_ylabel("unigram token entropy (bits)", color="tab:blue")
    right.set_ylabel("non-word occurrences", color="tab:red")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="best", fontsize="small")
    left.set_title("Entropy and OOV words of each generated corpus")
    left.grid(alpha=0.3)
    return png(fig)


EVALUATION = Evaluation(
    name="entropy",
    description="Unigram token entropy (bits) of the corpus; distinct tokens; EOS share.",
    version=1,
    needs_gpu=False,
    on_human_corpus=True,
    key_parts=_key,
    run=_run,
    order=20,
    columns=(
        Column("entropy_bits", "entropy_bits", "entropy"),
        Column("distinct_tokens", "distinct_tokens", "distinct", "d", True),
        Column("finished_fraction", "finished_fraction", "EOS-ended", ".3f", True),
        Column("mean_length", "mean_length", "length", ".1f"),
    ),
    # Drawn here (not by `oov`) so the paper's two-axis figure keeps one name and one place.
    figures=(Figure("entropy-oov", _figure),),
)
