"""`judge`: LLM-judge grades (0-9) of story completions, the paper's GPT-Eval (Fig. 3).

Generation 0 has no model of its own: its judge stage grades a randomly initialised model of
the run's architecture, the paper's baseline.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from collapse.context import (
    Context,
    baseline_model,
    corpus_digest,
    load_model,
    load_run_tokenizer,
    read_result,
    stage_record,
    validation_path,
)
from collapse.evals.base import Column, Evaluation, Figure
from collapse.sections import PositiveFloat, PositiveInt, Section
from collapse.store import atomic_path, sha256_file


class JudgeConfig(Section):
    """LLM-judge grades of story completions (eval `judge`, the paper's GPT-Eval).

    Generation 0 has no model of its own: its judge stage grades a randomly initialised model of
    the run's architecture, the paper's baseline.
    """

    model: str | None = Field(
        None, description="Judge model name; null: the judge stage is skipped (and says so)."
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama); null: OpenAI."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the key (never stored)."
    )
    api_key_secret: str | None = Field(
        None, description="Prefect Secret block holding the key; read at run time, never stored."
    )
    prompts: Literal["tinystories", "file", "validation"] = Field(
        "validation",
        description="tinystories: the 44 prompts from the hub; file: prompts_path; validation: "
        "validation stories cut mid-sentence (offline).",
    )
    prompts_path: str | None = Field(None, description="prompts: file (.yaml, .json, .txt).")
    num_prompts: PositiveInt = Field(44, description="At most this many prompts.")
    completions_per_prompt: PositiveInt = Field(10, description="Completions per prompt.")
    max_new_tokens: PositiveInt = Field(210, description="Length cap of a completion.")
    generations: list[int] | None = Field(
        None, description="Generations judged (paper: [1, 6, ..., 36]); null: all. Plus gen 0."
    )
    temperature: float | None = Field(
        0.0, ge=0, description="Judge temperature; null: not sent (for reasoning models)."
    )
    max_tokens: PositiveInt = Field(
        100, description="Reply length cap (reasoning models need room to think: ~2000)."
    )
    token_limit_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="How the cap is sent; OpenAI reasoning models: the latter."
    )
    max_concurrency: PositiveInt = Field(4, description="Judge requests in flight.")
    timeout_s: PositiveFloat = Field(60.0, description="Per-request timeout (seconds).")
    max_attempts: PositiveInt = Field(6, description="Tries per request (errors, 429, 5xx).")

    @model_validator(mode="after")
    def _prompt_file(self) -> JudgeConfig:
        # Only the setting is checked here; whether the file exists is the judge stage's check
        # (a saved run must open on a machine that lacks the file).
        if self.prompts == "file" and not self.prompts_path:
            raise ValueError("prompts_path is required when prompts is 'file'")
        return self


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


def _applies(config: Any, gen: int) -> bool:
    chosen = config.eval.judge.generations
    return gen == 0 or chosen is None or gen in chosen


def _prompts_file(config: Any) -> Path:
    from collapse.judge.prompts import PromptsUnavailable

    path = Path(config.eval.judge.prompts_path)
    if not path.is_file():
        raise PromptsUnavailable(
            f"eval.judge.prompts_path {str(path)!r} does not exist (give a .yaml, .json or .txt "
            "file of story beginnings, or set eval.judge.prompts: validation)"
        )
    return path


def _inputs(config: Any) -> list[str]:
    from collapse.judge.prompts import PromptsUnavailable

    if config.eval.judge.prompts != "file":
        return []
    try:
        _prompts_file(config)
    except PromptsUnavailable as exc:
        return [str(exc)]
    return []


def _key(ctx: Context, gen: int) -> list[Any]:
    # Which generations are judged does not change one generation's grades.
    return _key_of(ctx, gen, exclude={"generations"})


def _earlier_keys(ctx: Context, gen: int) -> list[list[Any]]:
    # Until 2026-12-07 the key held eval.judge.generations: judging one more generation
    # recomputed every judged one.
    return [_key_of(ctx, gen, exclude=set())]


def _key_of(ctx: Context, gen: int, exclude: set[str]) -> list[Any]:
    from collapse.judge.instruction import INSTRUCTION_VERSION
    from collapse.models import resolve_model_fields

    judge = ctx.config.eval.judge
    # Where and how the judge is reached does not change its grades (same model, same cache).
    operational = {"api_key_env", "api_key_secret", "base_url", "max_concurrency", "timeout_s"}
    operational |= {"max_attempts", "token_limit_param"}
    settings = judge.model_dump(mode="json", exclude=operational | exclude)
    skip = judge_skip_reason(ctx.config)
    if gen == 0:  # the random-init baseline: architecture, tokenizer and seed make the model
        model = [resolve_model_fields(ctx.config.model), ctx.config.run.seed]
    else:
        model = [stage_record(ctx, gen, "train")["digest"]]
    prompts: Any = judge.prompts
    if judge.prompts == "file" and judge.prompts_path:
        path = Path(judge.prompts_path)
        if path.is_file():
            prompts = sha256_file(path)
        elif skip is None:  # it will be read: say which key names the missing file
            _prompts_file(ctx.config)
    return [settings, INSTRUCTION_VERSION, skip, prompts, corpus_digest(ctx, 0), *model]


def _prompts(ctx: Context) -> list[str]:
    from collapse.judge.prompts import load_prompts
    from collapse.metrics.oov import corpus_texts

    judge = ctx.config.eval.judge
    validation = None
    if judge.prompts == "validation":
        validation = list(corpus_texts([validation_path(ctx)]))
    return load_prompts(
        judge.prompts,
        path=_prompts_file(ctx.config) if judge.prompts == "file" else None,
        validation_texts=validation,
        count=judge.num_prompts,
        seed=_seed(ctx, "judge-prompts"),
        cache_dir=ctx.store.shared_dir("judge-prompts"),
    )


def _seed(ctx: Context, *parts: Any) -> int:
    from collapse.seeding import derive_seed

    return derive_seed(ctx.config.run.seed, *parts)


def _model(ctx: Context, gen: int, device: Any) -> Any:
    return load_model(ctx, gen, device) if gen > 0 else baseline_model(ctx, device)


def prompt_room(config: Any) -> int:
    """Prompt tokens a completion can read: the model's positions less start token and answer."""
    from collapse.models import context_length

    return context_length(config.model) - config.eval.judge.max_new_tokens - 1


def _completions(ctx: Context, gen: int, prompts: list[str]) -> pa.Table:
    """`completions_per_prompt` seeded completions of every prompt (temperature 1, no top-k/p)."""

    from collapse.device import pick_device
    from collapse.sample import sample_batch
    from collapse.seeding import seeded_torch
    from collapse.tokenizer import special_ids

    judge = ctx.config.eval.judge
    device = pick_device(ctx.config.eval.device)
    tok = load_run_tokenizer(ctx)
    start_id, end_id = special_ids(tok)
    model = _model(ctx, gen, device).eval()
    room = prompt_room(ctx.config)  # > 0: the config rejects settings that leave none
    rows: dict[str, list[Any]] = {k: [] for k in ("prompt_index", "completion_index", "prompt")}
    rows.update(completion=[], tokens=[], finished=[])
    for index, prompt in enumerate(prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"][-room:]
        with seeded_torch(_seed(ctx, "judge-completions", gen, index), device):
            seqs, ended = sample_batch(
                model,
                judge.completions_per_prompt,
                judge.max_new_tokens,
                start_id,
                end_id,
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


def _run(ctx: Context, gen: int) -> tuple[dict[str, Any], list[Path]]:
    from collapse.judge.client import JudgeSettings, aggregate, grade_completions
    from collapse.judge.instruction import CRITERIA, INSTRUCTION_VERSION
    from collapse.table import format_cell

    judge = ctx.config.eval.judge
    who = "the random-init baseline" if gen == 0 else f"generation {gen}"
    skip = judge_skip_reason(ctx.config)
    if skip:
        ctx.log(f"gen {gen}: judge skipped: {skip}")
        return {"skipped": skip, "baseline": gen == 0}, []
    prompts = _prompts(ctx)
    n = judge.completions_per_prompt
    ctx.log(f"gen {gen}: {len(prompts)} prompts x {n} completions by {who}")
    table = _completions(ctx, gen, prompts)
    eval_dir = ctx.store.eval_dir(gen)
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
        cache_dir=ctx.store.shared_dir("judge-cache"),
        log_path=eval_dir / "judge-log.jsonl",
        log=ctx.log,
    )
    if results and not any(r.grades for r in results):
        # Nothing graded (the endpoint unreachable, every reply unusable): a result of no
        # grades would be recorded as done, and the endpoint settings are in no key, so a run
        # with a working endpoint would reuse it. Stop instead: the next run asks again.
        from collapse.judge.client import JudgeStopped

        first = next((r.failure for r in results if r.failure), "no reply")
        raise JudgeStopped(
            f"eval.judge: none of the {len(results)} completions of generation {gen} was graded "
            f"(e.g. {first}); check eval.judge.base_url and eval.judge.model (log: "
            f"{eval_dir / 'judge-log.jsonl'}), then run again: what is finished is kept"
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
        **{f"{name}_mean": (summary.get(name) or {}).get("mean") for name in CRITERIA},
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


def _check(config: Any) -> list[str]:
    from collapse.models import context_length

    judge = config.eval.judge
    if judge.model is None or prompt_room(config) > 0:
        return []
    return [
        f"eval.judge.max_new_tokens ({judge.max_new_tokens}) + the start token leaves no room "
        f"for a prompt within model.max_position_embeddings ({context_length(config.model)}); "
        "lower eval.judge.max_new_tokens"
    ]


def _figure(runs: Sequence[Any]) -> bytes | None:
    """Judge grammar and consistency vs generation, the random-init baseline as lines (Fig. 3)."""
    from collapse.plotting import LINE_STYLES, has, new_figure, png, series, suffix

    if not has(runs, "judge_grammar"):
        return None
    fig = new_figure(6.5, 4)
    ax = fig.subplots()
    colors = {"judge_grammar": "tab:green", "judge_consistency": "tab:purple"}
    for i, run in enumerate(runs):
        style = LINE_STYLES[i % len(LINE_STYLES)]
        for key, color in colors.items():
            name = key.removeprefix("judge_")
            x, y = series(run, key)
            points = [(g, v) for g, v in zip(x, y, strict=True) if g > 0]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    style,
                    color=color,
                    marker="o",
                    label=name + suffix(run, runs),
                )
            if x and x[0] == 0:  # generation 0 holds the random-init baseline
                ax.axhline(
                    y[0],
                    color=color,
                    linestyle=style,
                    alpha=0.5,
                    label=f"{name}, random init{suffix(run, runs)}",
                )
    ax.set(xlabel="generation", ylabel="judge grade (0-9)", ylim=(0, 9))
    ax.set_title("LLM-judge grades of story completions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return png(fig)


def _judged_samples(ctx: Context, gen: int, count: int = 2) -> list[dict[str, Any]]:
    """The first completions of the first prompt with their grades (Extended Data Table 2)."""
    if read_result(ctx, gen, "judge") is None:  # only what the manifest holds as valid
        return []
    eval_dir = ctx.store.eval_dir(gen)
    completions, grades = eval_dir / "judge-completions.parquet", eval_dir / "judge-grades.parquet"
    if not (completions.is_file() and grades.is_file()):
        return []  # a skipped judge writes neither
    texts = pq.read_table(completions).slice(0, count).to_pylist()
    scores = pq.read_table(grades).slice(0, count).to_pylist()
    return [{**t, **g} for t, g in zip(texts, scores, strict=False)]


def _section(run: Any) -> str:
    ctx = run.context
    rows = []
    for gen in (r["generation"] for r in run.rows):
        who = "random init" if gen == 0 else str(gen)
        for item in _judged_samples(ctx, gen):
            grades = (
                "failed: " + str(item["failure"])
                if item.get("failure")
                else (f"{item['grammar']} / {item['creativity']} / {item['consistency']}")
            )
            rows.append(
                f"<tr><td>{who}</td><td>{html.escape(item['prompt'][-120:])}</td>"
                f"<td>{html.escape(item['completion'][:300])}</td><td>{html.escape(grades)}</td></tr>"
            )
    if not rows:
        status = (read_result(ctx, 0, "judge") or {}).get("skipped") or "no judged generation yet"
        return f"<p>Judge: {html.escape(status)}</p>"
    return (
        "<h3>Judged completions</h3>"
        "<table class='excerpts'><thead><tr><th>model</th><th>prompt (end)</th>"
        "<th>completion</th><th>grammar / creativity / consistency</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


EVALUATION = Evaluation(
    name="judge",
    description="LLM-judge grades (0-9) of completions of story beginnings (GPT-Eval); "
    "generation 0: the random-init baseline.",
    version=1,
    needs_gpu=True,
    on_human_corpus=True,
    baseline_at_zero=True,  # generation 0: the random-init model
    key_parts=_key,
    earlier_key_parts=_earlier_keys,
    run=_run,
    order=60,
    settings=JudgeConfig,
    columns=(
        Column("judge_grammar", "grammar_mean", "grammar", ".2f", True),
        Column("judge_consistency", "consistency_mean", "consist.", ".2f", True),
        Column("judge_creativity", "creativity_mean", "creat.", ".2f", True),
    ),
    figures=(Figure("judge", _figure),),
    report_section=_section,
    applies=_applies,
    check=_check,
    inputs=_inputs,
)
