"""`diversity`: distinct-n, rep-n, Zipf coefficient and self-BLEU of each corpus."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from collapse.context import Context, corpus_digest, corpus_shards
from collapse.evals.base import Column, Evaluation, Figure
from collapse.sections import Section
from collapse.table import format_cell


class DiversityEvalConfig(Section):
    """Repetition and diversity (eval `diversity`)."""

    n_max: int = Field(4, ge=1, le=8, description="distinct-n and rep-n for n = 1..n_max.")
    self_bleu_samples: int = Field(
        200, ge=2, description="Documents in the seeded self-BLEU sample."
    )


def _key(ctx: Context, gen: int) -> list[Any]:
    div = ctx.config.eval.diversity
    return [div.n_max, div.self_bleu_samples, ctx.config.run.seed, gen, corpus_digest(ctx, gen)]


def _run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.metrics.diversity import corpus_diversity
    from collapse.seeding import derive_seed

    div = ctx.config.eval.diversity
    result = corpus_diversity(
        corpus_shards(ctx, gen),
        n_max=div.n_max,
        self_bleu_samples=div.self_bleu_samples,
        seed=derive_seed(ctx.config.run.seed, "self-bleu", gen),
    )
    ctx.log(
        f"gen {gen}: distinct-{div.n_max} {format_cell(result[f'distinct_{div.n_max}'], '.3f')}, "
        f"rep-{div.n_max} {format_cell(result[f'rep_{div.n_max}'], '.3f')}, "
        f"self-BLEU {format_cell(result['self_bleu'], '.3f')}"
    )
    return result, []


def _columns(config: Any) -> tuple[Column, ...]:
    """distinct-n and rep-n at the configured n_max, Zipf and self-BLEU."""
    n = config.eval.diversity.n_max
    return (
        Column(f"distinct_{n}", f"distinct_{n}", f"dist-{n}", ".3f", True),
        Column(f"rep_{n}", f"rep_{n}", f"rep-{n}", ".3f", False),
        Column("zipf_coefficient", "zipf_coefficient", "zipf", ".3f"),
        Column("self_bleu", "self_bleu", "self-BLEU", ".3f", False),
    )


def _figure(runs: Sequence[Any]) -> bytes | None:
    """distinct-n, rep-n (n = each run's n_max), self-BLEU and Zipf coefficient vs generation."""
    from collapse.plotting import has, label, new_figure, png, series

    ns = {run.config.eval.diversity.n_max for run in runs}
    n = str(ns.pop()) if len(ns) == 1 else "n"
    panels = [
        ("distinct", f"distinct-{n} (higher: more diverse)"),
        ("rep", f"rep-{n} (higher: more repetition)"),
        ("self_bleu", "self-BLEU (higher: more alike)"),
        ("zipf_coefficient", "Zipf coefficient"),
    ]

    def key(run: Any, panel: str) -> str:
        if panel in ("distinct", "rep"):
            return f"{panel}_{run.config.eval.diversity.n_max}"
        return panel

    panels = [(p, t) for p, t in panels if any(has([run], key(run, p)) for run in runs)]
    if not panels:
        return None
    fig = new_figure(3.6 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (panel, title) in zip(axes[0], panels, strict=True):
        for run in runs:
            x, y = series(run, key(run, panel))
            ax.plot(x, y, marker="o", label=label(run, runs))
        ax.set(title=title, xlabel="generation")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return png(fig)


EVALUATION = Evaluation(
    name="diversity",
    description="distinct-n, rep-n, Zipf coefficient and self-BLEU of the corpus.",
    version=1,
    needs_gpu=False,
    on_human_corpus=True,
    key_parts=_key,
    run=_run,
    order=40,
    settings=DiversityEvalConfig,
    columns=_columns,
    figures=(Figure("diversity", _figure),),
)
