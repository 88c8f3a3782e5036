"""`source_fit`: each corpus measured against the known source of the synthetic human corpus.

Only the built-in synthetic corpus has a source whose probabilities are known
(`collapse.corpus.synthetic`), so the evaluation is offered for `corpus.source: synthetic`
runs, where it measures collapse against the truth: how much of a generation's corpus the
source could have written, how likely the source finds it, and whether its least likely
stories (the tails) survive. See `collapse.metrics.source_fit` for the definitions. Generation
0 scores the human corpus, sets the tail threshold that later generations are read against, and
records the floor of the validation perplexity (the source's own NLL per token).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from collapse.context import (
    Context,
    corpus_digest,
    corpus_shards,
    read_result,
    stage_record,
    validation_path,
)
from collapse.evals.base import Column, Evaluation, Figure
from collapse.evals.perplexity import NAME as PERPLEXITY  # whose NLL `_excess_nll` reads
from collapse.sections import PositiveInt, Section

NAME = "source_fit"


class SourceFitConfig(Section):
    """Fit to the synthetic source (eval `source_fit`; `corpus.source: synthetic` only)."""

    tail_quantile: float = Field(
        0.9,
        gt=0.0,
        lt=1.0,
        description="A story is in the tail when the source finds it less likely than this "
        "quantile of the human stories (the human corpus has 1 - q of them there).",
    )
    max_documents: PositiveInt | None = Field(
        None, description="Score only the first N documents of each corpus (cost cap)."
    )


def _key(ctx: Context, gen: int) -> list[Any]:
    from collapse.corpus.synthetic import grammar_fingerprint

    fit = ctx.config.eval.source_fit
    # Later generations are read against generation 0's tail threshold: they key on its record.
    human = None if gen == 0 else stage_record(ctx, 0, f"eval.{NAME}")["digest"]
    settings = [fit.tail_quantile, fit.max_documents]
    return [settings, grammar_fingerprint(), corpus_digest(ctx, gen), human]


def _run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.corpus.synthetic import load_grammar
    from collapse.metrics.source_fit import (
        fit_summary,
        perplexity_floor,
        source_scores,
        tail_threshold,
    )

    fit = ctx.config.eval.source_fit
    grammar = load_grammar()
    scores = source_scores(corpus_shards(ctx, gen), grammar, fit.max_documents)
    floor: dict[str, float] = {}
    if gen == 0:
        threshold = tail_threshold(scores.log_probs, fit.tail_quantile)
        floor = perplexity_floor([validation_path(ctx)], grammar)
    else:
        human = read_result(ctx, 0, NAME)
        if human is None:  # the pipeline runs generation 0's first: a missing one is a bug
            raise RuntimeError("generation 0 has no source_fit result to read the tails against")
        threshold = human["tail_threshold"]
    result = {
        **fit_summary(scores, threshold),
        "tail_quantile": fit.tail_quantile,
        "grammar": grammar.version,
        **floor,
    }
    line = (
        f"gen {gen}: the source could write {result['valid_documents']} of "
        f"{result['documents']} documents; on average {result['valid_prefix_share']:.1%} of a "
        "story comes before it departs from it"
    )
    departed = {k: v for k, v in result["departures"].items() if v}
    if departed:
        shares = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in departed.items())
        line += f" (where they depart: {shares})"
    if result["source_nll"] is not None:
        line += (
            f"; valid ones: source NLL {result['source_nll']:.1f} nats a story, "
            f"{result['tail_fraction']:.3f} in the human tail"
        )
    if floor:
        line += (
            f"; validation perplexity floor {floor['validation_perplexity_floor']:.3f} (the "
            "source's own)"
        )
    ctx.log(line)
    return result, []


def _excess_nll(results: dict[str, Any], first: dict[str, Any]) -> float | None:
    """The model's validation NLL per token (the perplexity evaluation's) over the source's own
    on the same tokens (generation 0's floor): an estimate of KL(source || model) per token, in
    nats. An upper one: the model's NLL is of the stories' tokenization, the source's of their
    text. None where either is missing (no perplexity at generation 0, or not evaluated)."""
    model = (results.get(PERPLEXITY) or {}).get("nll")
    source = (first.get(NAME) or {}).get("validation_source_nll_per_token")
    return None if model is None or source is None else model - source


def _check(config: Any) -> list[str]:
    if config.corpus.source == "synthetic":
        return []
    return [
        f"eval.metrics: source_fit needs corpus.source: synthetic (the one source whose "
        f"probabilities are known), not {config.corpus.source}; remove source_fit from "
        "eval.metrics"
    ]


def _figure(runs: Sequence[Any]) -> bytes | None:
    """Valid, valid-prefix and tail shares vs generation, and beside them the source NLL per
    word of the valid stories where later generations have any."""
    from collapse.plotting import LINE_STYLES, has, new_figure, png, series, suffix

    if not has(runs, "source_valid"):
        return None
    # generation 0 always has valid stories: the panel is worth drawing only beyond it
    with_nll = any(g > 0 for run in runs for g in series(run, "source_nll_per_word")[0])
    fig = new_figure(11 if with_nll else 6.5, 4)
    axes = fig.subplots(1, 2 if with_nll else 1, squeeze=False)[0]
    shares = axes[0]
    for i, run in enumerate(runs):
        style = LINE_STYLES[i % len(LINE_STYLES)]
        for key, name, color in [
            ("source_valid", "stories the source could write", "tab:blue"),
            ("source_prefix", "per story, share before departing from it (mean)", "tab:purple"),
            ("source_tail", "valid stories in the human tail (share of valid)", "tab:orange"),
        ]:
            x, y = series(run, key)
            shares.plot(x, y, style, color=color, marker="o", label=name + suffix(run, runs))
        if with_nll:
            x, y = series(run, "source_nll_per_word")
            name = "valid stories" + suffix(run, runs)
            axes[1].plot(x, y, style, color="tab:green", marker="o", label=name)
    shares.set(xlabel="generation (0 = human corpus)", ylabel="share", ylim=(0, 1.05))
    shares.set_title("Each corpus against the source of the human corpus")
    if with_nll:
        axes[1].set(xlabel="generation (0 = human corpus)", ylabel="-log p_source per word")
        axes[1].set_title("How likely the source finds the valid stories (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return png(fig)


def _section(run: Any) -> str | None:
    """Per generation: where the stories the source could not write depart from it."""
    from collapse.metrics.source_fit import DEPARTURES

    results = {r["generation"]: read_result(run.context, r["generation"], NAME) for r in run.rows}
    rows = []
    for gen, result in results.items():
        if not result or result.get("valid_documents") == result.get("documents"):
            continue
        shares = result["departures"]
        invalid = result["documents"] - result["valid_documents"]
        cells = [str(gen), f"{invalid} of {result['documents']}"]
        cells += [f"{shares[kind]:.3f}" for kind in DEPARTURES]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    if not rows:
        return None
    head = ["gen", "not the source's", *(kind.replace("_", " ") for kind in DEPARTURES)]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        "<h3>Where stories depart from the source</h3>"
        "<p>Of the stories the source (the grammar that wrote the human corpus) could not have "
        "written, the share by what comes where their valid prefix ends: nothing but the end "
        "(the story stopped early, or was cut at max_new_tokens), a word the source never uses, "
        "a word it uses but not there (grammar, a name that does not go with the hero, a "
        "pronoun that does not agree), or punctuation.</p>"
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


EVALUATION = Evaluation(
    name=NAME,
    description="Fit to the known synthetic source: share of stories it could write, mean share "
    "of a story before it departs from it, source NLL, share in the human corpus's tail "
    "(synthetic corpora only).",
    version=1,
    needs_gpu=False,
    on_human_corpus=True,
    key_parts=_key,
    run=_run,
    order=45,
    default=False,  # needs the synthetic corpus: chosen in the configs that have one
    settings=SourceFitConfig,
    columns=(
        Column("source_valid", "valid_fraction", "src-valid", ".3f", True),
        Column("source_prefix", "valid_prefix_share", "src-prefix", ".3f", True),
        Column("source_tail", "tail_fraction", "src-tail", ".3f"),
        Column("source_nll_per_word", "source_nll_per_word", "src-NLL/w", ".3f"),
        Column("excess_nll", "", "KL/tok", ".3f", False, combine=_excess_nll),
    ),
    figures=(Figure("source-fit", _figure),),
    report_section=_section,
    check=_check,
)
