"""`downstream`: fine-tune each generation as a classifier on real labelled tasks (paper Fig. 4).

One stage per (generation, task), `eval.downstream/<task>`, with its own key and result file
`gen-NNN/eval/downstream/<task>.json`, so each fine-tune is cached, resumed and scheduled on its
own. Generation 0 has no model of its own: there the same fine-tune starts from the run's
random-init baseline (the model the judge grades at generation 0), computed once per task and
drawn as a line. Tasks are data (`collapse.downstream.tasks`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

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
from collapse.fingerprint import RECORDED, files_digest, key_digest
from collapse.sections import PositiveFloat, PositiveInt, Section

PAPER_TASKS = ["imdb", "sst2", "yelp_polarity", "qqp", "qnli", "mrpc", "rte", "cola"]


class DownstreamConfig(Section):
    """Fine-tuning each generation (and a random-init baseline) on labelled tasks (eval
    `downstream`, the paper's GLUE evaluation)."""

    task_table: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Tasks added to, or fields overriding, the built-in table "
        "(data/downstream/tasks.yaml), e.g. {sst2: {dataset: /data/glue}}.",
    )
    tasks: list[str] = Field(
        default_factory=lambda: list(PAPER_TASKS),
        min_length=1,
        description="Tasks fine-tuned: the paper's 8 hub tasks, or the offline probes "
        "acceptability, word_order and coherence.",
    )
    generations: list[int] | None = Field(
        None,
        description="Generations fine-tuned (plus the gen-0 baseline); null: those judged "
        "(eval.judge.generations).",
    )
    lr: PositiveFloat = Field(5e-5, description="Learning rate (linear decay to 0, no warm-up).")
    train_batch_size: PositiveInt = Field(8, description="Fine-tuning batch size.")
    eval_batch_size: PositiveInt = Field(32, description="Evaluation batch size.")
    max_train_examples: PositiveInt | None = Field(
        None, description="Cap on training examples per task (a seeded subset); null: all."
    )
    max_eval_examples: PositiveInt | None = Field(
        None, description="Cap on evaluation examples per task (a seeded subset); null: all."
    )
    pair_separator: str = Field(
        "\n", min_length=1, description="Text between the two sentences of a pair task."
    )

    @field_validator("task_table")
    @classmethod
    def _valid_entries(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from collapse.downstream.tasks import table_problems

        problems = table_problems(value, "eval.downstream.task_table")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str], info: ValidationInfo) -> list[str]:
        from collapse.downstream.tasks import merged_entries

        known = merged_entries(info.data.get("task_table") or {})
        unknown = [t for t in value if t not in known]
        if unknown:
            raise ValueError(
                f"unknown task(s) {unknown}; known: {', '.join(known)} "
                "(add one under eval.downstream.task_table)"
            )
        if len(set(value)) != len(value):
            raise ValueError("a task is listed twice")
        return value


def _settings(config: Any) -> DownstreamConfig:
    return config.eval.downstream


def _spec(config: Any, task: str) -> Any:
    from collapse.downstream.tasks import task_spec

    return task_spec(task, _settings(config).task_table)


def _applies(config: Any, gen: int) -> bool:
    chosen = _settings(config).generations
    if chosen is None:
        chosen = config.eval.judge.generations
    return gen == 0 or chosen is None or gen in chosen


def _key(ctx: Context, gen: int, task: str) -> list[Any]:
    from collapse.downstream.data import task_files
    from collapse.models import resolve_model_fields

    cfg = ctx.config
    settings = _settings(cfg).model_dump(
        mode="json", exclude={"task_table", "tasks", "generations"}
    )
    if gen == 0:  # the random-init baseline: architecture and seed make the model
        model: Any = [resolve_model_fields(cfg.model), cfg.run.seed]
    else:
        model = stage_record(ctx, gen, "train")["digest"]
    spec = _spec(cfg, task)
    # Generation 0's digest covers the tokenizer (which encodes every task) and the validation
    # stories (which the probes are built from).
    parts = [
        spec.model_dump(mode="json", exclude={"description"}),  # words for tables only
        settings,
        cfg.train.precision,
        cfg.run.seed,
        model,
        corpus_digest(ctx, 0),
    ]
    files = task_files(spec)
    if files is not None:  # local data may be edited in place: its contents count
        parts += key_digest(files, ctx.store.read_record(gen, f"{EVALUATION.stage}/{task}"))
    return parts


def _inputs(config: Any) -> list[str]:
    """The chosen tasks' local data, previewed: a wrong column or label before the run."""
    from collapse.downstream.data import preview_problems

    tasks = _settings(config).tasks
    return [p for task in tasks for p in preview_problems(task, _spec(config, task))]


def _stories(ctx: Context) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(validation_path(ctx), columns=["text"])["text"].to_pylist()


def _run(ctx: Context, gen: int, task: str) -> tuple[dict[str, Any], list[Path]]:
    from collapse.device import pick_device
    from collapse.downstream.data import load_task, task_files
    from collapse.downstream.finetune import SequenceClassifier, encode, fine_tune
    from collapse.models import context_length
    from collapse.seeding import derive_seed
    from collapse.tokenizer import special_ids

    cfg = ctx.config
    settings = _settings(cfg)
    spec = _spec(cfg, task)
    seed = derive_seed(cfg.run.seed, "downstream", task)  # one per task: generations differ
    train, held = load_task(task, spec, lambda: _stories(ctx), seed)  # only in their model
    full = {"train": len(train), "eval": len(held)}
    train = train.subset(settings.max_train_examples, seed + 1)
    held = held.subset(settings.max_eval_examples, seed + 2)
    tokenizer = load_run_tokenizer(ctx)
    start_id, end_id = special_ids(tokenizer)
    max_length = min(spec.max_length, context_length(cfg.model))
    train_ids = encode(tokenizer, train, start_id, settings.pair_separator, max_length)
    held_ids = encode(tokenizer, held, start_id, settings.pair_separator, max_length)
    device = pick_device(cfg.eval.device)
    model = baseline_model(ctx, device) if gen == 0 else load_model(ctx, gen, device)
    who = "random-init baseline" if gen == 0 else f"gen {gen}"
    scores = fine_tune(
        SequenceClassifier(model, spec.num_labels, seed + 3),
        train_ids,
        held_ids,
        epochs=spec.epochs,
        lr=settings.lr,
        batch_size=settings.train_batch_size,
        eval_batch_size=settings.eval_batch_size,
        pad_id=end_id,
        seed=seed + 4,
        device=device,
        precision=cfg.train.precision,
        progress=ctx.progress,
        desc=f"{task} ({who})",
        log=ctx.log,
    )
    result = {
        "task": task,
        "baseline": gen == 0,
        "headline": spec.metric,
        **scores,
        "train_examples": len(train),
        "eval_examples": len(held),
        "available_examples": full,
        "max_train_examples": settings.max_train_examples,
        "max_eval_examples": settings.max_eval_examples,
        "truncated": {"train": train_ids.truncated, "eval": held_ids.truncated},
        "max_length": max_length,
        "eval_split": "probe" if spec.source == "probe" else spec.eval_split,
    }
    files = task_files(spec)
    if files is not None:
        result[RECORDED] = files_digest(files)
    return result, []


def _columns(config: Any) -> tuple[Column, ...]:
    columns = []
    for task in _settings(config).tasks:
        columns.append(Column(f"{task}_acc", f"{task}.accuracy", f"{task} acc", ".3f", True))
        columns.append(Column(f"{task}_f1", f"{task}.f1_weighted", f"{task} F1", ".3f", True))
        if _spec(config, task).metric == "mcc":
            columns.append(Column(f"{task}_mcc", f"{task}.mcc", f"{task} MCC", ".3f", True))
    return tuple(columns)


def _tasks_of(runs: Sequence[Any]) -> list[str]:
    tasks: list[str] = []
    for run in runs:
        if "downstream" in run.config.eval.metrics:
            tasks += [t for t in _settings(run.config).tasks if t not in tasks]
    return tasks


def _figure(runs: Sequence[Any], metric: str, column: str, title: str) -> bytes | None:
    """Per task: `metric` vs generation, the gen-0 random-init baseline as a dashed line."""
    from collapse.plotting import LINE_STYLES, has, label, new_figure, png, series

    tasks = [t for t in _tasks_of(runs) if has(runs, f"{t}_{column}")]
    if not tasks:
        return None
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig = new_figure(3.4 * cols, 2.8 * rows)
    fig.set_layout_engine("constrained")  # room for the suptitle above the task titles
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, task in zip(axes, tasks, strict=False):
        for k, run in enumerate(runs):
            x, y = series(run, f"{task}_{column}")
            points = [(g, v) for g, v in zip(x, y, strict=True) if g > 0]
            line = ax.plot(
                [g for g, _ in points], [v for _, v in points], marker="o", label=label(run, runs)
            )
            if x and x[0] == 0:  # generation 0 holds the random-init baseline
                ax.axhline(
                    y[0],
                    color=line[0].get_color(),
                    linestyle=LINE_STYLES[(k + 1) % len(LINE_STYLES)],
                    label=f"random init{'' if len(runs) == 1 else f' ({label(run, runs)})'}",
                )
        ax.set(title=task, xlabel="generation", ylabel=metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return png(fig)


def _accuracy_figure(runs: Sequence[Any]) -> bytes | None:
    return _figure(runs, "accuracy", "acc", "Downstream accuracy after fine-tuning")


def _f1_figure(runs: Sequence[Any]) -> bytes | None:
    return _figure(runs, "weighted F1", "f1", "Downstream weighted F1 after fine-tuning")


def _section(run: Any) -> str | None:
    """Per task: examples, majority rate and the headline metric of each generation."""
    settings = _settings(run.config)
    head = ["task", "train / eval examples", "majority rate"]
    gens = [r["generation"] for r in run.rows]
    results = {
        (g, t): read_result(run.context, g, f"downstream/{t}") for g in gens for t in settings.tasks
    }
    gens = [g for g in gens if any(results[(g, t)] for t in settings.tasks)]
    if not gens:
        return "<h3>Downstream fine-tuning</h3><p>No generation fine-tuned yet.</p>"
    head += ["random init" if g == 0 else f"gen {g}" for g in gens]
    body = []
    for task in settings.tasks:
        first = next((results[(g, task)] for g in gens if results[(g, task)]), None)
        if first is None:
            continue
        cells = [
            f"{task} ({first['headline']})",
            f"{first['train_examples']} / {first['eval_examples']}",
            f"{first['majority_rate']:.3f}",
        ]
        for g in gens:
            result = results[(g, task)]
            cells.append("" if result is None else f"{result[result['headline']]:.3f}")
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    caps = [f"max_train_examples={settings.max_train_examples}"] * bool(
        settings.max_train_examples
    ) + [f"max_eval_examples={settings.max_eval_examples}"] * bool(settings.max_eval_examples)
    note = f" Capped: {', '.join(caps)}." if caps else ""
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        "<h3>Downstream fine-tuning</h3>"
        "<p>Each task's headline metric after fine-tuning every weight (lr "
        f"{settings.lr:g}, batch {settings.train_batch_size}); the majority rate is what "
        f"always answering the training split's most frequent class scores.{note}</p>"
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


EVALUATION = Evaluation(
    name="downstream",
    description="Fine-tune each judged generation and a random-init baseline on labelled tasks.",
    version=2,  # 2: probe evaluation splits leave out what their train splits hold
    needs_gpu=True,
    on_human_corpus=True,
    baseline_at_zero=True,  # generation 0: the random-init model
    key_parts=_key,
    run=_run,
    order=70,
    default=False,  # hub downloads and hours of GPU at paper scale: chosen, never implied
    settings=DownstreamConfig,
    columns=_columns,
    figures=(
        Figure("downstream_accuracy", _accuracy_figure),
        Figure("downstream_f1", _f1_figure),
    ),
    report_section=_section,
    applies=_applies,
    inputs=_inputs,
    parts=lambda config: list(_settings(config).tasks),
)
