"""The registry of per-generation evaluations, looked up by name from `eval.metrics`.

Each entry says what it reads (its key parts: config values and the content digests of its
inputs), whether it needs a GPU, whether it also runs on the human corpus (generation 0), which
of its values go into the per-generation table and whether higher is better. Adding an
evaluation means adding an entry here; the pipeline, the flows and the report read the registry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from collapse.context import Context, corpus_digest, load_model, load_run_tokenizer, stage_record
from collapse.corpus.parquet import documents, shard_paths
from collapse.device import pick_device
from collapse.models import gpt_neo_config, init_model, resolve_model_fields
from collapse.seeding import derive_seed
from collapse.store import atomic_path, sha256_file


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
    # Which generations it runs on, when not simply "all, or all but 0" (on_human_corpus).
    applies: Callable[[Any, int], bool] | None = None

    def applies_to(self, config: Any, gen: int) -> bool:
        """Whether this evaluation runs on generation `gen` under `config`."""
        if self.applies is not None:
            return self.applies(config, gen)
        return gen > 0 or self.on_human_corpus


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
        count_oov_shards,
        load_lexicon,
        save_lexicon,
    )

    oov = ctx.config.eval.oov
    extra: list[Path] = []
    if gen == 0:
        lexicon = build_lexicon(corpus_texts(_corpus_paths(ctx, 0)), oov.lexicon_min_count)
        save_lexicon(lexicon, _lexicon_path(ctx))
        extra.append(_lexicon_path(ctx))
        ctx.log(f"lexicon: {lexicon.name} {lexicon.version}, {lexicon.size:,} words")
    else:
        lexicon = load_lexicon(_lexicon_path(ctx))
    result = count_oov_shards(
        _corpus_paths(ctx, gen),
        lexicon,
        ctx.store.gen_dir(0) / "tokenizer",
        processes=oov.processes,
        max_documents=oov.max_documents,
    )
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


# --- judge (GPT-Eval) ----------------------------------------------------------------------


def judge_api_key(config: Any) -> str | None:
    """The judge's API key from its environment variable (the flows put a Prefect Secret there).

    A local OpenAI-compatible server (judge.base_url set) usually needs no key: "EMPTY" is sent.
    """
    judge = config.eval.judge
    key = os.environ.get(judge.api_key_env)
    if key:
        return key
    return "EMPTY" if judge.base_url else None


def judge_skip_reason(config: Any) -> str | None:
    """Why the judge stage cannot run, or None when it can."""
    judge = config.eval.judge
    if judge.model is None:
        return (
            "no judge configured (set eval.judge.model, and eval.judge.base_url for a local server)"
        )
    if judge_api_key(config) is None:
        return (
            f"no API key: environment variable {judge.api_key_env} is not set "
            "(or set eval.judge.api_key_secret to a Prefect Secret block)"
        )
    return None


def _judge_applies(config: Any, gen: int) -> bool:
    chosen = config.eval.judge.generations
    return gen == 0 or chosen is None or gen in chosen


def _judge_key(ctx: Context, gen: int) -> list[Any]:
    from collapse.judge.instruction import INSTRUCTION_VERSION

    judge = ctx.config.eval.judge
    # Where and how the judge is reached does not change its grades (same model, same cache).
    operational = {"api_key_env", "api_key_secret", "base_url", "max_concurrency", "timeout_s"}
    operational |= {"max_attempts", "token_limit_param"}
    settings = judge.model_dump(mode="json", exclude=operational)
    skip = judge_skip_reason(ctx.config)
    if gen == 0:  # the random-init baseline: architecture, tokenizer and seed make the model
        model = [resolve_model_fields(ctx.config.model), ctx.config.run.seed]
    else:
        model = [stage_record(ctx, gen, "train")["digest"]]
    prompts: Any = judge.prompts
    if judge.prompts == "file" and judge.prompts_path:
        prompts = sha256_file(Path(judge.prompts_path))
    return [settings, INSTRUCTION_VERSION, skip, prompts, corpus_digest(ctx, 0), *model]


def _judge_prompts(ctx: Context) -> list[str]:
    from collapse.judge.prompts import load_prompts
    from collapse.metrics.oov import corpus_texts

    judge = ctx.config.eval.judge
    validation = None
    if judge.prompts == "validation":
        validation = corpus_texts([ctx.store.gen_dir(0) / "validation.parquet"])
    return load_prompts(
        judge.prompts,
        path=Path(judge.prompts_path) if judge.prompts_path else None,
        validation_texts=list(validation) if validation is not None else None,
        count=judge.num_prompts,
        seed=derive_seed(ctx.config.run.seed, "judge-prompts"),
        cache_dir=ctx.store.run_dir / "judge-prompts",
    )


def _judge_model(ctx: Context, gen: int, device: Any) -> Any:
    if gen > 0:
        return load_model(ctx, gen, device)
    tok = load_run_tokenizer(ctx)
    config = gpt_neo_config(ctx.config.model, len(tok), tok.bos_token_id, tok.eos_token_id)
    return init_model(config, derive_seed(ctx.config.run.seed, "judge-baseline")).to(device)


def _judge_completions(ctx: Context, gen: int, prompts: list[str]) -> pa.Table:
    """`completions_per_prompt` seeded completions of every prompt (temperature 1, no top-k/p)."""
    import torch

    from collapse.sample import sample_batch

    judge = ctx.config.eval.judge
    device = pick_device(ctx.config.sample.device)
    tok = load_run_tokenizer(ctx)
    model = _judge_model(ctx, gen, device).eval()
    room = model.config.max_position_embeddings - judge.max_new_tokens - 1
    rows: dict[str, list[Any]] = {k: [] for k in ("prompt_index", "completion_index", "prompt")}
    rows.update(completion=[], tokens=[], finished=[])
    for index, prompt in enumerate(prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"][-room:]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(ctx.config.run.seed, "judge-completions", gen, index))
            seqs, ended = sample_batch(
                model,
                judge.completions_per_prompt,
                judge.max_new_tokens,
                tok.bos_token_id,
                tok.eos_token_id,
                device=device,
                prefix=ids,
            )
        for j, (seq, fin) in enumerate(zip(seqs, ended, strict=True)):
            rows["prompt_index"].append(index)
            rows["completion_index"].append(j)
            rows["prompt"].append(prompt)
            rows["completion"].append(tok.decode(seq))
            rows["tokens"].append(len(seq))
            rows["finished"].append(fin)
    return pa.table(rows)


def _judge_run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.judge.client import JudgeSettings, aggregate, grade_completions
    from collapse.judge.instruction import CRITERIA, INSTRUCTION_VERSION
    from collapse.table import format_cell

    judge = ctx.config.eval.judge
    who = "the random-init baseline" if gen == 0 else f"generation {gen}"
    skip = judge_skip_reason(ctx.config)
    if skip:
        ctx.log(f"gen {gen}: judge skipped: {skip}")
        return {"skipped": skip, "baseline": gen == 0}, []
    prompts = _judge_prompts(ctx)
    n = judge.completions_per_prompt
    ctx.log(f"gen {gen}: {len(prompts)} prompts x {n} completions by {who}")
    table = _judge_completions(ctx, gen, prompts)
    eval_dir = ctx.store.gen_dir(gen) / "eval"
    completions_path = eval_dir / "judge-completions.parquet"
    with atomic_path(completions_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    settings = JudgeSettings(
        base_url=judge.base_url,
        model=judge.model,
        api_key=judge_api_key(ctx.config) or "",
        temperature=judge.temperature,
        max_tokens=judge.max_tokens,
        token_limit_param=judge.token_limit_param,
        max_concurrency=judge.max_concurrency,
        timeout_s=judge.timeout_s,
        max_attempts=judge.max_attempts,
    )
    items = list(
        zip(
            table.column("prompt_index").to_pylist(),
            table.column("completion_index").to_pylist(),
            table.column("prompt").to_pylist(),
            table.column("completion").to_pylist(),
            strict=True,
        )
    )
    results = grade_completions(
        items,
        settings,
        cache_dir=ctx.store.run_dir / "judge-cache",
        log_path=eval_dir / "judge-log.jsonl",
        log=ctx.log,
    )
    grades_path = eval_dir / "judge-grades.parquet"
    grades = {
        "prompt_index": [r.prompt_index for r in results],
        "completion_index": [r.completion_index for r in results],
        **{
            name: [getattr(r.grades, name) if r.grades else None for r in results]
            for name in CRITERIA
        },
        "failure": [r.failure for r in results],
    }
    with atomic_path(grades_path) as tmp:
        pq.write_table(pa.table(grades), tmp, compression="zstd")
    summary = aggregate(results)
    result = {
        **summary,
        # flat copies of the means, for the per-generation table
        **{f"{name}_mean": _mean(summary, name) for name in CRITERIA},
        "baseline": gen == 0,
        "judge": {
            "model": judge.model,
            "base_url": judge.base_url,
            "instruction_version": INSTRUCTION_VERSION,
        },
        "prompts": len(prompts),
        "completions": len(items),
    }
    means = ", ".join(f"{name} {format_cell(result[f'{name}_mean'], '.2f')}" for name in CRITERIA)
    ctx.log(f"gen {gen}: judge {means} ({summary.get('failures', 0)} failures)")
    return result, [completions_path, grades_path]


def _mean(summary: dict[str, Any], name: str) -> float | None:
    return (summary.get(name) or {}).get("mean")


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
        Evaluation(
            name="judge",
            description="LLM-judge grades (0-9) of completions of story beginnings (GPT-Eval); "
            "generation 0: the random-init baseline.",
            version=1,
            needs_gpu=True,
            on_human_corpus=True,
            columns=(
                Column("judge_grammar", "grammar_mean", "grammar", ".2f", True),
                Column("judge_consistency", "consistency_mean", "consist.", ".2f", True),
                Column("judge_creativity", "creativity_mean", "creat.", ".2f", True),
            ),
            key_parts=_judge_key,
            run=_judge_run,
            applies=_judge_applies,
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
