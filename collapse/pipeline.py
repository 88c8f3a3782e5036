"""The stages of a run as plain functions over the artifact store (no Prefect here).

Generation 0 holds the human corpus (train shards, validation set, tokenizer). Generation g >= 1
holds the model trained from scratch on generation g-1's corpus, the corpus sampled from it, and
its evaluations. The chain stages (collapse.stages) and the evaluations (collapse.evals) each
declare their key parts, version and runner; this module turns those into keys, decides what is
done from the manifests, and runs what is not. When a stage of the data chain must be
recomputed, every record downstream of it is dropped first, so nothing computed from a stale
parent survives, even if the run is killed midway.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from collapse.config import config_to_dict
from collapse.context import Context
from collapse.errors import UserError
from collapse.evals import Column, Evaluation, column_value, evaluation, registry, split_stage
from collapse.faults import delay_point
from collapse.regimes import REGIMES
from collapse.stages import CHAIN, ChainStage, chain_stage
from collapse.store import (
    StorageFullError,
    atomic_write_json,
    format_bytes,
    sha256_json,
    storage_full,
)


def stage_entry(stage: str) -> ChainStage | Evaluation:
    """The declaration behind a stage name (`corpus`, `train`, `sample` or `eval.<name>`).

    Raises:
        ValueError: no such stage.
    """
    entry = chain_stage(stage)
    if entry is not None:
        return entry
    if stage.startswith("eval."):
        name, part = split_stage(stage)
        found = registry().get(name)
        if found is not None and (part is None) == (found.parts is None):
            return found
    raise ValueError(f"unknown stage {stage!r}")


def stage_key(ctx: Context, gen: int, stage: str) -> str:
    """The key a valid record of (`gen`, `stage`) must carry, from its inputs' digests.

    Raises:
        RuntimeError: a stage it reads has not finished.
    """
    entry = stage_entry(stage)
    part = split_stage(stage)[1] if isinstance(entry, Evaluation) else None
    parts = entry.key_parts(ctx, gen) if part is None else entry.key_parts(ctx, gen, part)
    return sha256_json({"stage": stage, "version": entry.version, "parts": parts})


def accepted_keys(ctx: Context, gen: int, stage: str) -> list[str]:
    """The keys a record of (`gen`, `stage`) may carry: today's, then `earlier_stage_keys`.

    Raises:
        RuntimeError: a stage it reads has not finished.
    """
    return [stage_key(ctx, gen, stage), *earlier_stage_keys(ctx, gen, stage)]


def earlier_stage_keys(ctx: Context, gen: int, stage: str) -> list[str]:
    """Keys of earlier releases under which a record of (`gen`, `stage`) holds today's result
    (`Evaluation.earlier_key_parts`), newest first; [] for most stages."""
    entry = stage_entry(stage)
    if not isinstance(entry, Evaluation) or entry.earlier_key_parts is None:
        return []
    part = split_stage(stage)[1]
    args = (ctx, gen) if part is None else (ctx, gen, part)
    return [
        sha256_json({"stage": stage, "version": entry.version, "parts": parts})
        for parts in entry.earlier_key_parts(*args)
    ]


def needs_gpu(stage: str) -> bool:
    """Whether a stage runs a model (then it holds the GPU concurrency limit)."""
    return stage_entry(stage).needs_gpu


def stages_of(ctx: Context, gen: int) -> list[str]:
    """Stages of a generation in execution order."""
    chain = [s.name for s in CHAIN if s.applies_to(gen)]
    config = ctx.config
    evals = [evaluation(m) for m in config.eval.metrics]
    return chain + [s for e in evals if e.applies_to(config, gen) for s in e.stages_for(config)]


def valid_record(ctx: Context, gen: int, stage: str) -> dict[str, Any] | None:
    """The stage's record if it is done and its outputs intact, else None."""
    try:
        keys = accepted_keys(ctx, gen, stage)
    except RuntimeError:  # a parent stage is not done
        return None
    for key in keys:
        record = ctx.store.valid_record(gen, stage, key)
        if record is not None:
            return record
    return None


def _drop_downstream(ctx: Context, gen: int, stage: str) -> None:
    """Forget everything computed from (gen, stage), whose output has just changed.

    A chain stage feeds every later stage of its generation and every later generation. Their
    keys chain its digest, so they would not be reused anyway; dropping their records says so
    at once (in `collapse status`, too).
    """
    order = stages_of(ctx, gen)
    for name in order[order.index(stage) + 1 :]:
        ctx.store.drop_stage(gen, name)
    dropped = ctx.store.invalidate_from(gen + 1)
    if dropped:
        ctx.log(f"dropped the records of generations {dropped} (computed from stale inputs)")


def invalidate_from(ctx: Context, gen: int) -> None:
    """Make generations >= `gen` recompute from scratch (no mid-stage resume either)."""
    ctx.store.invalidate_from(gen)
    for g in ctx.store.generations_on_disk():
        if g >= gen:
            ctx.store.discard_partial(ctx.store.train_state_dir(g))
            ctx.store.discard_partial(ctx.store.sample_progress_path(g))


def run_stage(ctx: Context, gen: int, stage: str) -> dict[str, Any]:
    """Run one stage unless a valid record exists; returns the record (info has the results).

    Raises:
        StorageFullError: the disk filled up; the error names this generation and stage.
    """
    try:
        made = _run_stage(ctx, gen, stage)
    except OSError as exc:  # a write outside the atomic helpers, e.g. an appended log
        full = storage_full(exc, Path(exc.filename or ctx.store.run_dir), errno_only=True)
        if full is None:
            raise
        full.stage = f"generation {gen}, stage {stage}"
        raise full from exc
    except StorageFullError as exc:
        # The failed write knows its filesystem; only here is it known which stage it served.
        exc.stage = f"generation {gen}, stage {stage}"
        raise
    if not made["reused"]:
        release_staged(ctx)
    return made


def release_staged(ctx: Context) -> int:
    """Under a URL root, remove from this machine's staging copy the generations' models and
    corpora that no stage still to run reads; the bytes freed.

    The run lives at the URL, so these are cached copies (`RunStore.release_local`); without
    this, a worker that trains 40 generations of the 33M model keeps ~25 GB. A generation
    g >= 1's model (and training statistics) is read by its own later stages only, so it goes
    once every stage of generation g has a record; its corpus also feeds each later training
    whose regime draws on it (generation g+1's under `replace`, every later one under
    `accumulate`), so it goes once those have records too. Generation 0 (the human corpus,
    validation set and tokenizer, read by every generation) stays. A later stage that does read
    a released file after all (a recomputation, more generations) fetches it again.

    Housekeeping: a failure here is logged, never raised (the stage it follows is done).
    """
    store = ctx.store
    if store.remote is None:
        return 0
    try:
        return _release_staged(ctx)
    except Exception as exc:  # e.g. the store unreachable for a moment: the next stage retries
        ctx.log(f"staging: could not release finished generations' files: {exc}")
        return 0


def _release_staged(ctx: Context) -> int:
    store = ctx.store
    last = ctx.config.run.generations
    reads = REGIMES[ctx.config.train.regime].reads
    manifests: dict[int, dict[str, Any]] = {}

    def recorded(gen: int) -> dict[str, Any]:
        if gen not in manifests:
            manifests[gen] = store.read_manifest(gen)["stages"]
        return manifests[gen]

    staged = [gen for gen in store.generations_here() if gen >= 1]
    freed = 0
    for gen in staged:
        # the chain stages whose main output (model, corpus) this machine holds a copy of
        folders = {"train": store.model_dir(gen), "sample": store.corpus_dir(gen)}
        held = [s for s, f in folders.items() if f.is_dir() and any(f.iterdir())]
        if not held or any(s not in recorded(gen) for s in stages_of(ctx, gen)):
            continue
        readers = [h for h in range(gen + 1, last + 1) if gen in reads(h)]
        corpus_read = any("train" not in recorded(h) for h in readers)
        released = [s for s in held if not (s == "sample" and corpus_read)]
        size = sum(store.release_local(list(recorded(gen)[s]["outputs"])) for s in released)
        if size:
            what = " and ".join({"train": "model", "sample": "corpus"}[s] for s in released)
            ctx.log(f"staging: released generation {gen}'s {what} here ({format_bytes(size)})")
        freed += size
    return freed


def _run_stage(ctx: Context, gen: int, stage: str) -> dict[str, Any]:
    key = stage_key(ctx, gen, stage)
    record = ctx.store.valid_record(gen, stage, key)
    if record is not None:
        return {**record, "reused": True}
    for earlier in earlier_stage_keys(ctx, gen, stage):
        record = ctx.store.valid_record(gen, stage, earlier)
        if record is not None:  # made under an earlier release's key formula: same result
            ctx.log(f"gen {gen} {stage}: kept, recorded under today's key")
            return {**ctx.store.rekey(gen, stage, record, key), "reused": True}
    # What the stage's dependants were computed from: a chain stage recomputed to the same
    # bytes (a lost file, an identical retraining) leaves them valid, since their keys chain
    # its content digest, not the fact that it ran again.
    previous = ctx.store.read_record(gen, stage)
    ctx.store.drop_stage(gen, stage)
    made = None
    if ctx.config.orchestration.share_across_runs:
        made = _copy_from_sibling(ctx, gen, stage, key)
    if made is None:
        made = {**_compute(ctx, gen, stage, key), "reused": False}
    if chain_stage(stage) is not None:
        if previous is None:
            # Its record was dropped before this run (an earlier recomputation killed midway,
            # a damaged output fetched): what it was is unknown, so only the records whose
            # keys its new digest no longer matches go, not every later generation.
            _drop_stale_downstream(ctx, gen, stage)
        elif previous.get("digest") != made["digest"]:
            _drop_downstream(ctx, gen, stage)
    return made


def _drop_stale_downstream(ctx: Context, gen: int, stage: str) -> None:
    """Forget the records after (gen, stage) whose key their inputs no longer give."""
    order = stages_of(ctx, gen)
    later = [(gen, name) for name in order[order.index(stage) + 1 :]]
    later += [
        (g, name) for g in ctx.store.generations_on_disk() if g > gen for name in stages_of(ctx, g)
    ]
    dropped = set()
    for g, name in later:
        record = ctx.store.read_record(g, name)
        if record is None:
            continue
        try:
            stale = record.get("key") != stage_key(ctx, g, name)
        except RuntimeError:  # a stage it reads has no record (dropped just now)
            stale = True
        if stale:
            ctx.store.drop_stage(g, name)
            dropped.add(g)
    if dropped - {gen}:
        ctx.log(
            f"dropped records of generations {sorted(dropped - {gen})} (computed from stale inputs)"
        )


def _compute(ctx: Context, gen: int, stage: str, key: str) -> dict[str, Any]:
    """Run a stage and record its outputs under `key`."""
    entry = stage_entry(stage)
    delay_point(stage, gen)
    if isinstance(entry, ChainStage):
        outputs, info = entry.run(ctx, gen, key)
    else:
        part = split_stage(stage)[1]
        info, extra = entry.run(ctx, gen) if part is None else entry.run(ctx, gen, part)
        name = entry.name if part is None else f"{entry.name}/{part}"
        outputs = [write_result(ctx, gen, name, info), *extra]
    record = ctx.store.record_stage(gen, stage, key, outputs, info)
    if isinstance(entry, ChainStage) and entry.finish is not None:
        entry.finish(ctx, gen)
    return record


def _copy_from_sibling(ctx: Context, gen: int, stage: str, key: str) -> dict[str, Any] | None:
    """Take a stage another run under the same artifact root finished under the same key (or
    an earlier formula of it, `earlier_stage_keys`).

    A key chains the content digests of every input with the stage's settings and version, so
    an equal key means an equal output: e.g. the arms of a sweep that differ only after
    generation 0 compute their human corpus, tokenizer and generation-0 evaluations once. The
    files are hard-linked (copied across filesystems) and hashed again before they count.
    """
    accepted = accepted_keys(ctx, gen, stage)  # [key, ...]: recorded here under today's
    for other in ctx.store.sibling_runs():
        record = next(
            (r for k in accepted if (r := other.valid_record(gen, stage, k)) is not None), None
        )
        if record is None:
            continue
        copied = ctx.store.adopt_outputs(other, record)
        if copied is None:  # changed under us (the other run recomputing): compute instead
            continue
        ctx.log(f"gen {gen} {stage}: taken from run {other.run_id} (same key)")
        made = ctx.store.record_stage(
            gen, stage, key, copied, record["info"], copied_from=other.run_id
        )
        return {**made, "reused": True}
    return None


def write_result(ctx: Context, gen: int, name: str, result: dict[str, Any]) -> Path:
    """Write an evaluation's result to `gen-NNN/eval/<name>.json` atomically.

    `name` is `<evaluation>` or, for an evaluation with parts, `<evaluation>/<part>`.
    """
    path = ctx.store.eval_path(gen, name)
    atomic_write_json(path, {"metric": name, "generation": gen, **result})
    return path


# --- run-level ----------------------------------------------------------------------------


def freeze_config(ctx: Context) -> None:
    """Write config.yaml at first start; later starts must match it (except run.generations)."""
    import yaml

    from collapse.config import ConfigError, config_hash
    from collapse.started import run_id_clash

    store = ctx.store
    clash = run_id_clash(store, ctx.config)
    if clash:
        raise ConfigError([clash])
    current = config_hash(ctx.config)
    data = config_to_dict(ctx.config)
    store.write_run_file(store.config_path, yaml.safe_dump(data, sort_keys=False).encode())
    store.write_run_file(store.config_hash_path, (current + "\n").encode())


def overlaps_evaluations(config: Any) -> bool:
    """Whether generation n's evaluations run beside generation n+1's chain.

    As `orchestration.pipeline` says, except when `train.deterministic` trains in this process
    (no `generation_deployment`): torch's deterministic mode is process-wide, so evaluations in
    other threads would run under it, slower, and fail in kernels without a deterministic
    version (`torch.cumsum` of floats on CUDA, which drawing the judge's completions uses).
    """
    orchestration = config.orchestration
    in_process = not orchestration.generation_deployment
    return orchestration.pipeline and not (config.train.deterministic and in_process)


def table_columns(config: Any) -> list[Column]:
    """The per-generation table's value columns: those of the configured evaluations (marked
    `baseline_at_zero` where the evaluation's generation 0 is the random-init baseline)."""
    columns = []
    for name in config.eval.metrics:
        entry = evaluation(name)
        for column in entry.columns_for(config):
            if entry.baseline_at_zero:
                column = dataclasses.replace(column, baseline_at_zero=True)
            columns.append(column)
    return columns


def record_is_current(ctx: Context, gen: int, stage: str, record: dict[str, Any]) -> bool:
    """Whether `record` carries a key today's code gives (gen, `stage`), or an earlier formula
    of it (`earlier_stage_keys`); its outputs are not checked.

    False when a stage it reads has no record (it was dropped: this one goes with it). True
    when the key cannot be computed on this machine (an input file it lacks, e.g. the judge's
    prompts): only a run there can tell, and it will.
    """
    try:
        keys = accepted_keys(ctx, gen, stage)
    except RuntimeError:  # a parent stage has no record
        return False
    except UserError:
        return True
    return record.get("key") in keys


def metrics_table(
    ctx: Context, generations: int | None = None, valid_only: bool = False
) -> list[dict[str, Any]]:
    """One row per generation from the manifests: each evaluation's table values, and status.

    A value is None where its evaluation has not run (or does not apply, e.g. perplexity of
    the human corpus), and where its record is stale: made under another key (an earlier
    version of the evaluation, inputs that have changed), so the next run recomputes it.
    `stages_done`/`stages_total` count the current records (as `collapse status` does).

    Args:
        ctx: the run's context.
        generations: the last generation (default: run.generations).
        valid_only: also check that every output still has its recorded sha256 (hashes
            every output: for comparing runs, e.g. a sweep's, not for every update).
    """
    with ctx.store.manifests_read_once():
        return _metrics_table(ctx, generations, valid_only)


def _metrics_table(ctx: Context, generations: int | None, valid_only: bool) -> list[dict[str, Any]]:
    last = ctx.config.run.generations if generations is None else generations
    rows = []
    first: dict[str, Any] = {}  # generation 0's results, which combined columns may read
    for gen in range(0, last + 1):
        recorded = ctx.store.read_manifest(gen)["stages"]
        expected = stages_of(ctx, gen)
        current = {}
        for stage in expected:
            record = recorded.get(stage)
            if record is None:
                continue
            if valid_only:
                record = valid_record(ctx, gen, stage)
            elif not record_is_current(ctx, gen, stage, record):
                record = None
            if record is not None:
                current[stage] = record
        row: dict[str, Any] = {"generation": gen}
        results = {m: evaluation(m).result_of(current, ctx.config) for m in ctx.config.eval.metrics}
        first = first or results
        for m in ctx.config.eval.metrics:
            for column in evaluation(m).columns_for(ctx.config):
                if column.combine is not None:
                    row[column.key] = column.combine(results, first)
                else:
                    row[column.key] = column_value(results[m], column.source)
        row["stages_done"] = len(current)
        row["stages_total"] = len(expected)
        rows.append(row)
    return rows
