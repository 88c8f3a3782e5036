"""The `sweep` flow: every run of a sweep as an `experiment` subflow, a bounded number at once.

Each arm runs in a process of its own, never in a thread of this one: the library seeds torch's
global generator around model init and sampling (`fork_rng` + `manual_seed`), and two arms in one
process would draw from each other's streams, so an arm's corpus would depend on its neighbours.
The arm's process hydrates this flow run's serialized context and calls `experiment`, so the
experiment (and its generation subflows, or its `run_deployment` calls when
`orchestration.generation_deployment` is set) is a subflow of the sweep in the UI, as Prefect's
own runner runs flows in subprocesses. A thread per running arm waits for its process; the
threads' pool bounds how many run at once (`max_concurrent`).

The same run never runs twice at once: the sweep runs each distinct run folder once (arms with
equal configs are one run), and the experiment flow holds the run folder's lock, so a run that
another process (a `collapse run`, another sweep) is running fails this arm with RunLockedError
while the other arms go on. A lock on the sweep's report folder keeps two processes from running
the same sweep. An arm's process dies with the sweep's (a watchdog SIGKILLs it when it is
orphaned), so a killed sweep leaves no arm running on, holding its run's lock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.context import FlowRunContext, hydrated_context, serialize_context
from prefect.settings import get_current_settings
from prefect.states import Crashed

from collapse.errors import UserError
from collapse.store import RunLockedError, canonical_root
from collapse.sweep import load_sweep, sweep_report_store
from collapse.sweep_report import arm_table, write_sweep_report
from flows.experiment import UNFINISHED, artifact_key, experiment


class SweepFailed(Exception):
    """Some arms of a sweep failed; `outcomes` has every run's outcome (see `run_arm`)."""

    def __init__(self, outcomes: list[dict[str, Any]]):
        super().__init__(outcomes)
        self.outcomes = outcomes

    def __str__(self) -> str:
        failed = [o for o in self.outcomes if o["status"] != "done"]
        return "; ".join(f"arm {o['label']}: {o['message']}" for o in failed)

    def __repr__(self) -> str:
        # Prefect logs failures with repr(): the failed arms, not every outcome's dict.
        return f"{type(self).__name__}({str(self)!r})"


class SweepFailedByUser(SweepFailed, UserError):
    """Every failed arm failed with an error the user can fix (e.g. its run is in use)."""


class SweepLockedError(UserError):
    """Another process is running this sweep."""


def _exit_with_parent(parent: int) -> None:
    """SIGKILL this process once `parent` (the sweep's process) is gone.

    As if killed together with it: atomic writes leave nothing half-written, the manifests keep
    what finished, and the rerun resumes. Left running, an orphaned arm would hold its run's lock
    against the rerun.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-sweep", daemon=True).start()


def _arm_process(payload: bytes, results: Connection) -> None:
    """The arm's process: run `experiment` inside the sweep's hydrated flow run context."""
    context, parent, parameters = cloudpickle.loads(payload)
    _exit_with_parent(parent)
    from flows.cli import console_filter

    try:
        with hydrated_context(context):
            console_filter((UserError,))  # the sweep prints the one-line message
            result = experiment(**parameters)
    except UserError as exc:
        results.send({"status": "failed", "user_error": True, "message": str(exc)})
        return
    except Exception as exc:
        results.send(
            {"status": "failed", "user_error": False, "message": f"{type(exc).__name__}: {exc}"}
        )
        return
    stages = [s for g in result["generations"] for s in g["stages"]]
    computed = sum(not s["reused"] for s in stages)
    results.send({"status": "done", "computed": computed, "stages": len(stages)})


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"its process was killed by {signal.Signals(-exitcode).name}"
    return f"its process ended with code {exitcode} before reporting"


def run_arm(context: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Run one arm's experiment in a new process and wait for it.

    Args:
        context: the sweep flow run's serialized context (`serialize_context()`).
        run: {"label", "run_id", "config"} of the run.

    Returns:
        {"label", "run_id", "status": "done" | "failed", and "computed"/"stages" when done,
        "message" and "user_error" when failed}.
    """
    # spawn: a fork would copy this process's threads and Prefect clients mid-use.
    mp = multiprocessing.get_context("spawn")
    receiver, sender = mp.Pipe(duplex=False)
    parameters = {"config": run["config"], "run_id": run["run_id"]}
    payload = cloudpickle.dumps((context, os.getpid(), parameters))
    process = mp.Process(target=_arm_process, args=(payload, sender), name=f"arm {run['label']}")
    process.start()
    sender.close()  # the child holds the only sending end now: its death is an EOF here
    try:
        outcome = receiver.recv()
    except EOFError:  # died without a word: killed (kill -9, the OOM killer) or crashed
        outcome = None
    process.join()
    if outcome is None:
        outcome = {"status": "failed", "user_error": False, "message": _ended(process.exitcode)}
    return {"label": run["label"], "run_id": run["run_id"], **outcome}


def crash_stale_sweep_runs(name: str, artifact_root: str) -> list[str]:
    """Mark this sweep's flow runs that a killed process left Running or Pending as Crashed.

    Call it while holding the sweep's lock: no other process is then running this sweep over
    this artifact root, so any other unfinished flow run of it is dead. (Its arms' experiment
    flow runs are closed by the experiment flow when it resumes that run.)

    Returns:
        The ids of the flow runs marked Crashed.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return []
    current = context.flow_run.id
    root = canonical_root(artifact_root)

    def same_root(run: Any) -> bool:
        try:
            return (
                canonical_root(run.parameters["runs"][0]["config"]["run"]["artifact_root"]) == root
            )
        except (KeyError, IndexError, TypeError):
            return False

    with get_client(sync_client=True) as client:
        candidates = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[sweep.name])),
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"sweep-{name}"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)),
            ),
        )
        stale = [run for run in candidates if run.id != current and same_root(run)]
        message = f"superseded: the sweep was killed and rerun by flow run {current}"
        for run in stale:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return [str(run.id) for run in stale]


@task(task_run_name="report")
def sweep_report(sweep_path: str) -> str:
    """Rewrite the sweep's comparison report (cheap; never cached)."""
    return str(write_sweep_report(load_sweep(sweep_path, check_inputs=False)))


@flow(name="sweep", flow_run_name="sweep-{name}", log_prints=True)
def sweep(
    name: str, sweep_path: str, runs: list[dict[str, Any]], max_concurrent: int
) -> list[dict[str, Any]]:
    """Run every run of a sweep, at most `max_concurrent` at once, then write its report.

    Args:
        name: the sweep's name.
        sweep_path: the sweep file (read again for the report).
        runs: one {"label", "run_id", "config"} per distinct run folder.
        max_concurrent: runs at once.

    Returns:
        Every run's outcome (see `run_arm`), in the order of `runs`.

    Raises:
        SweepFailed: some arm failed (SweepFailedByUser when each failed with a UserError);
            the others ran to their end and the report was written.
        SweepLockedError: the same sweep is running in another process.
    """
    logger = get_run_logger()
    if get_current_settings().api.url is None:
        # Without it each arm's process would start a temporary Prefect server of its own.
        raise RuntimeError("the sweep flow needs PREFECT_API_URL set (the CLI sets it)")
    root = runs[0]["config"]["run"]["artifact_root"]
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(sweep_report_store(root, name).lock())
        except RunLockedError:
            raise SweepLockedError(
                f"sweep {name!r} is running in another process (over {root})"
            ) from None
        try:
            stale = crash_stale_sweep_runs(name, root)
        except Exception as exc:  # housekeeping in the UI must never stop a sweep
            logger.warning(f"could not mark the flow runs of a killed earlier sweep Crashed: {exc}")
        else:
            if stale:
                logger.info(f"marked Crashed (killed earlier): {', '.join(stale)}")
        if max_concurrent > 1:
            # Inherited by the arms' processes. Their OpenMP threads otherwise spin between
            # parallel regions on the cores the other arms need: two small demo runs at once
            # on 2 cores took 86 s against 31 s one after the other, and 23 s with passive
            # waiting, which changes scheduling only (bitwise the same weights). Fewer torch
            # threads per arm would help too, but change the floats (measured): an arm would
            # no longer equal the same run made by `collapse run`.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        context = serialize_context()
        progress = create_progress_artifact(
            0.0, key=artifact_key(f"sweep-{name}", "progress"), description=f"{name}: runs done"
        )
        outcomes: dict[str, dict[str, Any]] = {}
        with ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="arm") as pool:
            futures = [pool.submit(run_arm, context, run) for run in runs]
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome["run_id"]] = outcome
                state = outcome["status"] if outcome["status"] == "done" else outcome["message"]
                logger.info(f"arm {outcome['label']} (run {outcome['run_id']}): {state}")
                update_progress_artifact(progress, 100.0 * len(outcomes) / len(runs))
        headers, rows = arm_table(load_sweep(sweep_path, check_inputs=False))
        create_table_artifact(
            [dict(zip(headers, row, strict=True)) for row in rows],
            key=artifact_key(f"sweep-{name}", "arms"),
            description=f"Arms of sweep {name}: generations done, last generation's values",
        )
        sweep_report(sweep_path)
    ordered = [outcomes[run["run_id"]] for run in runs]
    failure = sweep_failure(ordered)
    if failure is not None:
        raise failure
    return ordered


def sweep_failure(outcomes: list[dict[str, Any]]) -> SweepFailed | None:
    """The error a sweep with these outcomes ends with, None if every arm is done.

    SweepFailedByUser (a UserError: exit code 2) when every failed arm failed with an error
    the user can fix, such as a run in use by another process; SweepFailed otherwise.
    """
    failed = [o for o in outcomes if o["status"] != "done"]
    if not failed:
        return None
    kind = SweepFailedByUser if all(o["user_error"] for o in failed) else SweepFailed
    return kind(outcomes)
