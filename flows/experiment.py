"""Prefect wiring: the `experiment` flow, one nested `generation` flow each, a task per stage.

The manifests decide what is done (collapse.pipeline); Prefect's cache mirrors that decision so
reused stages show as Cached in the UI: a task's cache key is its stage key (config section,
parent content digests, stage version), and a stage whose outputs are not valid runs with
refresh_cache, so a stale Prefect result can never stand in for a missing artifact.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.blocks.system import Secret
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    TaskRunFilter,
    TaskRunFilterId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateDetails, StateType
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.deployments import run_deployment
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as flow_run_runtime
from prefect.states import Completed, Crashed
from transformers.utils import logging as hf_logging

from collapse.config import Config
from collapse.context import Context
from collapse.device import prepare_deterministic
from collapse.pipeline import (
    freeze_config,
    invalidate_from,
    metrics_table,
    needs_gpu,
    overlaps_evaluations,
    run_stage,
    stage_entry,
    stage_key,
    stages_of,
    valid_record,
)
from collapse.report import load_run, summary_markdown, write_report
from collapse.stages import chain_stage
from collapse.store import RunStore, canonical_root


def artifact_key(run_id: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a run."""
    safe = "".join(c if c.isalnum() else "-" for c in run_id.lower()).strip("-")
    return f"{safe}-{kind}"


def make_context(config: dict[str, Any], run_id: str) -> Context:
    """Rebuild the library context inside a flow or task (inputs are plain JSON)."""
    cfg = Config.model_validate(config)
    if cfg.train.deterministic:
        prepare_deterministic()  # before this process first touches cuBLAS
    logger = get_run_logger()
    load_judge_secret(cfg)
    # transformers' own bars (loading/writing weights, once per stage) only bury the stage bars.
    hf_logging.disable_progress_bar()
    bars = cfg.orchestration.progress_bars
    progress = bars == "on" or (bars == "auto" and sys.stderr.isatty())
    return Context(cfg, RunStore(cfg.run.artifact_root, run_id), progress, logger.info)


def load_judge_secret(cfg: Config) -> None:
    """Put the judge's key from a Prefect Secret block into its environment variable.

    Only in this process's environment: the key never becomes a flow or task parameter, a
    config value or an artifact, so it cannot show in the UI or the run directory.
    """
    judge = cfg.eval.judge
    if judge.api_key_secret and not os.environ.get(judge.api_key_env):
        os.environ[judge.api_key_env] = Secret.load(judge.api_key_secret).get()


def stage_summary(gen: int, name: str, record: dict[str, Any], reused: bool) -> dict[str, Any]:
    """What a stage reports to the flow and the CLI: small, JSON, no models or frames."""
    return {
        "generation": gen,
        "stage": name,
        "key": record["key"],
        "digest": record["digest"],
        "reused": reused,
        "info": record["info"],
    }


def _stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    # The stage key chains the content digests of the stage's inputs; the flow passes
    # refresh_cache whenever the manifest says the outputs are missing or corrupt.
    if parameters.get("cache_key") is not None:
        return parameters["cache_key"]
    # A pipelined evaluation is submitted before its inputs exist, so its key is computed here,
    # once its futures are done (Prefect computes the cache key after wait_for). Only a valid
    # record gets a key: a missing or corrupt output then always runs, never a stale result.
    ctx = make_context(parameters["config"], parameters["run_id"])
    gen, name = parameters["gen"], parameters["name"]
    key = stage_key(ctx, gen, name)
    return f"{name}-{key}" if ctx.store.valid_record(gen, name, key) is not None else None


@task(cache_key_fn=_stage_cache_key, persist_result=True, result_serializer="json")
def stage(config: dict[str, Any], run_id: str, gen: int, name: str, cache_key: str | None) -> dict:
    """Run one stage (or return its valid record) and return a small summary."""
    ctx = make_context(config, run_id)
    limit = ctx.config.orchestration.gpu_concurrency_limit
    holds_gpu = limit is not None and needs_gpu(name)
    with concurrency(limit) if holds_gpu else contextlib.nullcontext():
        record = run_stage(ctx, gen, name)
    return stage_summary(gen, name, record, record["reused"])


@task(task_run_name="report")
def report(run_dir: str) -> str:
    """Rewrite the run's report.html and figures (cheap; never cached).

    Args:
        run_dir: the run's folder, or its URL under a URL root (then the report is uploaded
            there too).
    """
    return str(write_report([run_dir]))


def _generation_run_name() -> str:
    """The flow run name of a generation flow run: `job_name` of its parameters.

    The flow's own name template wins over the name `run_deployment` gives a flow run, so a
    job run on a worker gets its name (with its stage key) from here too.
    """
    parameters = flow_run_runtime.parameters
    run_id, gen, stages = parameters["run_id"], parameters["gen"], parameters.get("stages")
    if not stages or chain_stage(stages[0]) is not None:
        return f"{run_id}-gen-{gen}"
    cfg = Config.model_validate(parameters["config"])
    ctx = Context(cfg, RunStore(cfg.run.artifact_root, run_id))
    return job_name(run_id, gen, stages, stage_key(ctx, gen, stages[0]))


@flow(name="generation", flow_run_name=_generation_run_name, log_prints=True)
def generation(
    config: dict[str, Any], run_id: str, gen: int, stages: list[str] | None = None
) -> list[dict]:
    """Stages of one generation in order: all of them ((corpus | train, sample), then the
    evaluations), or only `stages` (one job of a pipelined or distributed run)."""
    ctx = make_context(config, run_id)
    results = []
    for name in stages_of(ctx, gen) if stages is None else stages:
        key = stage_key(ctx, gen, name)  # parents are done: this generation runs in order
        record = ctx.store.valid_record(gen, name, key)
        runner = stage.with_options(task_run_name=f"{name}-gen-{gen}", refresh_cache=record is None)
        result = runner(config, run_id, gen, name, f"{name}-{key}")
        # A Prefect cache hit does not run the task body; it still reflects a valid record.
        results.append({**result, "reused": result["reused"] or record is not None})
    return results


def dispatch_job(
    ctx: Context,
    config: dict[str, Any],
    run_id: str,
    gen: int,
    deployment: str,
    stages: list[str] | None = None,
) -> tuple[list[dict], FlowRun]:
    """Run one generation (or its `stages`) on a deployment's work pool; read the outcome from
    the manifest.

    The worker writes to the same artifact root, so the manifest (not a Prefect result, which
    would live in the worker's result storage) is where the stages' records come from. The
    child flow run's name and idempotency key come from the run id and the first stage's key,
    so a retried parent flow run gets its existing child back instead of starting another.

    Args:
        ctx: the run's context.
        config: the config as a plain dict (the child flow's parameter).
        run_id: the run folder name.
        gen: the generation.
        deployment: 'flow/deployment' of a deployed `generation` flow.
        stages: the stages to run, in order; None: all of the generation's (the parameter is
            then left out, so deployments made before it existed still accept the run).

    Returns:
        One stage summary per stage run, and the child flow run.
    """
    names = stages_of(ctx, gen) if stages is None else stages
    before = {name: valid_record(ctx, gen, name) is not None for name in names}
    key = stage_key(ctx, gen, names[0])  # its parents are done: the caller waited for them
    parameters: dict[str, Any] = {"config": config, "run_id": run_id, "gen": gen}
    if stages is not None:
        parameters["stages"] = stages
    name = job_name(run_id, gen, names, key)
    flow_run = run_deployment(
        deployment,
        parameters=parameters,
        flow_run_name=name,
        idempotency_key=job_idempotency_key(name, key),
        timeout=None,  # wait however long the generation takes
        as_subflow=True,
    )
    if flow_run.state is None or not flow_run.state.is_completed():
        state = flow_run.state.name if flow_run.state else "unknown"
        raise RuntimeError(
            f"generation {gen} ({', '.join(names)}) ended {state} on deployment "
            f"{deployment!r} (flow run {flow_run.id})"
        )
    results = []
    for name in names:
        record = valid_record(ctx, gen, name)
        if record is None:
            raise RuntimeError(
                f"deployment {deployment!r} finished generation {gen} but its {name!r} stage has "
                f"no valid record under {ctx.store.location}: do the workers share "
                "run.artifact_root with this process?"
            )
        results.append(stage_summary(gen, name, record, before[name]))
    return results, flow_run


def job_name(run_id: str, gen: int, stages: list[str], key: str) -> str:
    """The flow run name of a job: `<run>-gen-<g>` for a generation's chain (or all of it),
    `<run>-gen-<g>-<stage>-<key prefix>` for one evaluation."""
    if chain_stage(stages[0]) is not None:
        return f"{run_id}-gen-{gen}"
    return f"{run_id}-gen-{gen}-{'+'.join(stages)}-{key[:8]}"


def job_idempotency_key(name: str, key: str) -> str:
    """The idempotency key of a job flow run: the parent flow run, the job's name and stage key.

    With the same parent (a retry of it, or of the task dispatching the job) Prefect returns
    the child flow run it already made. A later `collapse run` is a new parent: a child of a
    killed run that ended Crashed must not be handed back to it (it would fail forever), and
    its new child finds the finished stages in the manifest and reuses them.
    """
    context = FlowRunContext.get()
    parent = context.flow_run.id if context is not None and context.flow_run else "none"
    return f"{parent}:{name}:{key}"


@task
def remote_stage(config: dict[str, Any], run_id: str, gen: int, name: str, deployment: str) -> dict:
    """Run one evaluation as its own flow run on the deployment's work pool (a GPU job)."""
    ctx = make_context(config, run_id)
    (summary,) = dispatch_job(ctx, config, run_id, gen, deployment, [name])[0]
    return summary


UNFINISHED = [StateType.RUNNING, StateType.PENDING]


def _descendants(client: SyncPrefectClient, root: UUID) -> set[UUID]:
    """Ids of every subflow run below flow run `root`."""
    found: set[UUID] = set()
    frontier = [root]
    while frontier:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
            )
        )
        frontier = [child.id for child in children if child.id not in found]
        found.update(frontier)
    return found


def _artifact_root(flow_run: FlowRun) -> str | None:
    """The artifact root a flow run of ours was started with (from its `config` parameter)."""
    try:
        return canonical_root(flow_run.parameters["config"]["run"]["artifact_root"])
    except (KeyError, TypeError):
        return None


def crash_stale_flow_runs(run_id: str, artifact_root: str) -> list[str]:
    """Mark the flow runs of `run_id` that a killed process left Running or Pending as Crashed.

    A process killed with SIGKILL cannot report its end, so its experiment and generation flow
    runs (and the task running then) would show Running in the UI forever beside the resumed
    run's. Call this from the experiment flow while it holds the run folder's lock: then no other
    orchestrating process can be running this run, so any other unfinished flow run of it is dead.
    Only flow runs of the same run folder count: the run id is a hash of the config without its
    artifact root, so the same config run under another root (another lock) has the same names.
    A relative root is taken as relative to this directory, where this PREFECT_HOME's runs start.
    Generation flow runs from a deployment are left alone: a worker may still be running them
    while no process holds the lock, and the worker's own crash detection is the one that knows.
    Experiment flow runs from a deployment (`collapse submit`) hold the lock, so they count. So
    do unfinished subflow runs of this very flow run: nothing of this attempt has started yet,
    so they are an earlier attempt's (a flow run retried after its worker was lost); their
    tracking task runs are closed too, so this attempt starts fresh generation flow runs.

    Args:
        run_id: the run whose stale flow runs to close.
        artifact_root: the run's artifact root (run.artifact_root).

    Returns:
        The names of the flow runs marked Crashed.
    """
    flow_run_context = FlowRunContext.get()
    if flow_run_context is None or flow_run_context.flow_run is None:
        return []
    current = flow_run_context.flow_run.id
    root = canonical_root(artifact_root)
    ours = re.compile(rf"{re.escape(run_id)}(-gen-\d+)?")
    with get_client(sync_client=True) as client:
        candidates = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[experiment.name, generation.name])),
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(like_=run_id),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)),
            ),
        )
        candidates = [
            run
            for run in candidates
            if ours.fullmatch(run.name)
            and run.id != current
            and (run.deployment_id is None or run.flow_id == flow_run_context.flow_run.flow_id)
            and _artifact_root(run) == root
        ]
        if not candidates:
            return []
        stale = candidates
        message = f"superseded: the run was killed and resumed by flow run {current}"
        for run in stale:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
        unfinished = TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED))
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in stale])),
            task_run_filter=TaskRunFilter(state=unfinished),
        )
        trackers = [r.parent_task_run_id for r in stale if r.parent_task_run_id is not None]
        if trackers:
            tasks += client.read_task_runs(
                task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=trackers), state=unfinished)
            )
        for task_run in tasks:
            client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    return sorted(run.name for run in stale)


def run_pipelined(
    ctx: Context, config: dict[str, Any], run_id: str, publish: Callable[[int], None]
) -> list[dict[str, Any]]:
    """Every generation, with each generation's evaluations beside the next one's chain.

    Generation n+1's training reads only generation n's corpus, so the critical path is the
    chain (corpus, train, sample, train, sample, ...), run here one generation after another
    (a `generation` subflow, or a job on the deployment). Each evaluation is a task future
    waiting for its generation's chain and for the same evaluation of the previous generation:
    an evaluation may read its own earlier result (OOV reads generation 0's lexicon) or share
    per-run state (the judge's cache), and this keeps one of each kind running at a time.

    Args:
        ctx: the run's context.
        config: the config as a plain dict.
        run_id: the run folder name.
        publish: called with the last generation whose stages are all done (-1: none).

    Returns:
        Per generation: {"generation", "stages": summaries in `stages_of` order}.

    Raises:
        Exception: the first failed stage's error; a failed evaluation is raised at the next
            generation boundary (the chain running then finishes first) or at the end.
    """
    orchestration = ctx.config.orchestration
    deployment = orchestration.generation_deployment
    previous: dict[str, PrefectFuture] = {}
    generations: list[tuple[int, list[dict], list[tuple[str, PrefectFuture]]]] = []

    def finished() -> int:
        """Generations whose evaluations are all done (raising a failed one's error)."""
        done = 0
        for _, _, evals in generations:
            if not all(future.state.is_final() for _, future in evals):
                break
            for _, future in evals:
                if not future.state.is_completed():
                    future.result()  # raises the evaluation's error
            done += 1
        return done

    for gen in range(0, ctx.config.run.generations + 1):
        names = stages_of(ctx, gen)
        chain = [name for name in names if chain_stage(name) is not None]
        if deployment:
            chain_results, child = dispatch_job(ctx, config, run_id, gen, deployment, chain)
        else:
            state = generation(config, run_id, gen, chain, return_state=True)
            chain_results = state.result()
            with get_client(sync_client=True) as client:
                child = client.read_flow_run(state.state_details.flow_run_id)
        # The edge chain -> evaluation in the UI's graph: a subflow run is drawn in place of
        # its parent task run, so the evaluations wait for a Completed state naming that task
        # run. (Passing the subflow's returned list would draw it too, but Prefect matches
        # results by id(), and its fresh items can take the id of a freed earlier result,
        # which drew false edges.)
        chain_done = Completed(
            data=gen,  # what waiting resolves it to (without data, waiting raises MissingResult)
            state_details=StateDetails(task_run_id=child.parent_task_run_id),
        )
        evals = []
        for name in names[len(chain) :]:
            wait_for: list[Any] = [chain_done]
            if name in previous:
                wait_for.append(previous[name])
            options = {"task_run_name": f"{name}-gen-{gen}"}
            if deployment and stage_entry(name).needs_gpu:
                future = remote_stage.with_options(**options).submit(
                    config, run_id, gen, name, deployment, wait_for=wait_for
                )
            else:
                future = stage.with_options(**options).submit(
                    config, run_id, gen, name, None, wait_for=wait_for
                )
            previous[name] = future
            evals.append((name, future))
        generations.append((gen, chain_results, evals))
        publish(finished() - 1)
    summaries = []
    for gen, chain_results, evals in generations:
        stages = list(chain_results)
        for _, future in evals:
            result = future.result()
            # A cache hit is only possible on a valid record (see _stage_cache_key).
            stages.append({**result, "reused": result["reused"] or future.state.name == "Cached"})
        summaries.append({"generation": gen, "stages": stages})
    publish(finished() - 1)
    return summaries


@flow(name="experiment", flow_run_name="{run_id}", log_prints=True)
def experiment(
    config: dict[str, Any], run_id: str, from_generation: int | None = None
) -> dict[str, Any]:
    """A whole recursive-training run: generation 0 (human corpus), then 1..N.

    Args:
        config: the validated config as a plain dict.
        run_id: the run folder name.
        from_generation: recompute this generation and every later one.

    Returns:
        {"generations": per-generation stage summaries, "table": the metrics table}.
    """
    ctx = make_context(config, run_id)
    logger = get_run_logger()
    total = ctx.config.run.generations
    with ctx.store.lock(logger.warning):
        try:
            superseded = crash_stale_flow_runs(run_id, ctx.config.run.artifact_root)
        except Exception as exc:  # housekeeping in the UI must never stop a run
            logger.warning(f"could not mark the flow runs of a killed earlier run Crashed: {exc}")
        else:
            if superseded:
                logger.info(f"marked Crashed (killed earlier): {', '.join(superseded)}")
        freeze_config(ctx)
        if from_generation is not None:
            invalidate_from(ctx, from_generation)
            logger.info(f"recomputing from generation {from_generation}")
        progress_id = create_progress_artifact(
            0.0, key=artifact_key(run_id, "progress"), description=f"{run_id}: generations done"
        )
        deployment = ctx.config.orchestration.generation_deployment

        def publish(last: int) -> None:
            """Update the UI's table and progress; `last`: the last generation all done."""
            create_table_artifact(
                metrics_table(ctx),
                key=artifact_key(run_id, "metrics"),
                description=f"Per-generation metrics of run {run_id} (gen 0: the human "
                "corpus; for the judge and downstream columns, the random-init baseline)",
            )
            update_progress_artifact(progress_id, 100.0 * max(last, 0) / total)

        overlap = overlaps_evaluations(ctx.config)
        if ctx.config.orchestration.pipeline and not overlap:
            logger.info(
                "train.deterministic: each generation's evaluations run after its chain, not "
                "beside the next training (torch's deterministic mode is process-wide)"
            )
        if overlap:
            summaries = run_pipelined(ctx, config, run_id, publish)
        else:
            summaries = []
            for gen in range(0, total + 1):
                if deployment:
                    stages = dispatch_job(ctx, config, run_id, gen, deployment)[0]
                else:
                    stages = generation(config, run_id, gen)
                summaries.append({"generation": gen, "stages": stages})
                publish(gen)
        rows = metrics_table(ctx)
        report_path = report(ctx.store.location)
        create_markdown_artifact(
            summary_markdown(load_run(ctx.store.location)),
            key=artifact_key(run_id, "summary"),
            description=f"Summary of run {run_id}; report: {report_path}",
        )
    return {"generations": summaries, "table": rows, "report": report_path}
