"""`collapse submit` and `collapse deploy`: runs on a work pool instead of in this process.

`collapse deploy` creates the work pools and deployments of prefect.yaml on the current Prefect
server; `collapse submit CONFIG` checks the config as `collapse run` does, then creates a flow
run of the `experiment/gpu` deployment and returns. A worker polling the pool runs it.

One submitted run is one flow run: the flow run's idempotency key is the run id and a digest of
its parameters, so submitting the same config again finds that flow run instead of queueing a
second one. A finished, failed or crashed one is set back to Scheduled (what the UI's "Retry"
does) and resumes from the run's artifacts; one left Running by a worker that was killed is
first marked Crashed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from collapse.config import Config, config_to_dict, run_id_for
from collapse.object_store import is_url
from collapse.store import RunStore
from flows.cli import _fail, checked_config, whole_number

CODE_DIR = Path(__file__).resolve().parents[1]
PREFECT_FILE = CODE_DIR / "prefect.yaml"
DEFAULT_DEPLOYMENT = "experiment/gpu"
# A flow run's process takes the run folder's lock right after it reports Running; within this
# many seconds of that report a free lock does not yet mean the process is gone.
START_GRACE_S = 30.0
NEEDS_SERVER = (
    "needs a Prefect server that the workers reach too: start one (`collapse ui`, or "
    "`prefect server start` on a host the workers reach) and set PREFECT_API_URL to its API "
    "(e.g. http://<server>:4200/api)"
)


def submitted_parameters(config: Config) -> tuple[dict[str, Any], list[str]]:
    """The experiment deployment's parameters for `config`, and warnings for the user.

    The worker runs in another directory (the code directory, or another machine), so a
    relative artifact root is made absolute here, against the submitter's working directory;
    the run id ignores the artifact root, so this changes no run id. Relative input paths are
    part of the run id and are left alone, with a warning.
    """
    data = config_to_dict(config)
    warnings = []
    root = Path(config.run.artifact_root)
    if not is_url(config.run.artifact_root) and not root.is_absolute():
        data["run"]["artifact_root"] = str(root.resolve())
        warnings.append(
            f"run.artifact_root {str(root)!r} is relative: the run writes to {root.resolve()}, "
            "which the workers must see at that path (shared storage)"
        )
    inputs = {
        "corpus.path": config.corpus.path if config.corpus.source == "local" else None,
        "eval.judge.prompts_path": (
            config.eval.judge.prompts_path if config.eval.judge.prompts == "file" else None
        ),
    }
    for key, value in inputs.items():
        if value and not Path(value).is_absolute():
            warnings.append(
                f"{key} {value!r} is relative: a worker reads it relative to its working "
                f"directory (the code directory); give an absolute path on shared storage"
            )
    return {"config": data, "run_id": run_id_for(config)}, warnings


def idempotency_key(parameters: dict[str, Any]) -> str:
    """One flow run per (run id, parameters): a resubmission finds it instead of adding one."""
    blob = json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode()
    return f"{parameters['run_id']}-{hashlib.sha256(blob).hexdigest()[:16]}"


def run_folder_locked(root: str, run_id: str) -> bool | None:
    """Whether a process holds the run's lock; None when that cannot be seen from here.

    The flow run of a submitted run holds this lock (collapse.store.RunStore.lock) for as long
    as it runs, so a Running flow run whose run is not locked lost its process.
    """
    return RunStore(root, run_id).locked()


def _connect() -> str | int:
    """The API URL of a reachable Prefect server, or the exit code after printing why not.

    Never Prefect's temporary in-process server: a worker cannot reach it, and it ends with
    this process.
    """
    from flows import prefect_env

    prefect_env.configure()  # also finds a running `collapse ui` server
    if not os.environ.get("PREFECT_API_URL"):
        return _fail(f"no Prefect server: this command {NEEDS_SERVER}")
    api_url = os.environ["PREFECT_API_URL"]
    # what `prefect_env.connect` checks with PREFECT_API_URL set, with a message of our own:
    # its fallback, a temporary local server, is no use here
    if not prefect_env.server_healthy(api_url, timeout=10):
        return _fail(
            f"no Prefect server answers at PREFECT_API_URL={api_url}: this command {NEEDS_SERVER}"
        )
    return api_url


def flow_run_url(api_url: str, flow_run_id: Any) -> str:
    """The UI page of a flow run (the UI is served beside its API)."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() or api_url.rstrip("/").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _crash_lost(client: Any, flow_run: Any) -> None:
    """Mark a flow run whose process was lost, its unfinished subflow runs and task runs Crashed.

    Its subflow-tracking task runs are closed too: a retried experiment then starts fresh
    generation flow runs instead of reattaching to the dead ones.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.states import Crashed

    from flows.experiment import UNFINISHED, _descendants

    message = "the process running it was lost (its run folder was not locked)"
    runs = [flow_run.id]
    children = _descendants(client, flow_run.id)
    if children:
        unfinished = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=list(children)),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)),
            )
        )
        runs += [run.id for run in unfinished if run.deployment_id is None]
    for run_id in runs:
        client.set_flow_run_state(run_id, Crashed(message=message), force=True)
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED))
        ),
    )
    for task_run in tasks:
        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)


def cmd_submit(args: argparse.Namespace) -> int:
    """`collapse submit CONFIG [key=value ...]`: queue a run on a work pool and return."""
    config = checked_config(args.config, args.overrides, "`collapse submit` takes one run's config")
    if isinstance(config, str):
        return _fail(config)
    start_at = None
    if args.at is not None:
        try:
            start_at = datetime.datetime.fromisoformat(args.at).astimezone()
        except ValueError:
            return _fail(f"--at {args.at!r} is not an ISO date and time, e.g. 2026-12-01T03:00")
    parameters, warnings = submitted_parameters(config)
    run_id = parameters["run_id"]
    root = parameters["config"]["run"]["artifact_root"]
    api_url = _connect()
    if isinstance(api_url, int):
        return api_url

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.exceptions import ObjectNotFound
    from prefect.states import AwaitingRetry, Scheduled

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(args.deployment)
        except ObjectNotFound:
            return _fail(
                f"no deployment {args.deployment!r} on the Prefect server at {api_url}: "
                "create it with `collapse deploy`"
            )
        for warning in warnings:
            print(f"collapse: warning: {warning}", file=sys.stderr)
        earlier = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_id])),
        )
        flow_run = client.create_flow_run_from_deployment(
            deployment.id,
            parameters=parameters,
            name=run_id,
            state=Scheduled(scheduled_time=start_at) if start_at else None,
            idempotency_key=idempotency_key(parameters),
        )
        found = flow_run.state
        if flow_run.id not in {run.id for run in earlier}:
            how = "queued"
        elif found is None or found.is_scheduled() or found.is_pending() or found.is_paused():
            how = f"already {found.name if found else 'queued'}"
        elif found.is_running() or found.is_cancelling():
            # A free lock means a lost process only once the process had time to take it.
            time.sleep(max(0.0, found.timestamp.timestamp() + START_GRACE_S - time.time()))
            locked = run_folder_locked(root, run_id)
            if locked is None:
                return _fail(
                    f"flow run {flow_run.id} of run {run_id} is {found.name} and its run folder "
                    f"is not visible here: if its worker was lost, mark it Crashed in the UI "
                    f"({flow_run_url(api_url, flow_run.id)}) and submit again"
                )
            if locked:
                how = f"already {found.name}"
            else:
                _crash_lost(client, flow_run)
                client.set_flow_run_state(
                    flow_run.id, AwaitingRetry(scheduled_time=start_at), force=True
                )
                how = "its worker was lost (marked Crashed); retried, resuming from its artifacts"
        else:  # Completed, Failed, Crashed, Cancelled: what the UI's "Retry" does
            client.set_flow_run_state(
                flow_run.id, AwaitingRetry(scheduled_time=start_at), force=True
            )
            how = f"it was {found.name}; retried, resuming from its artifacts"
    print(f"run {run_id}: {how}: flow run {flow_run.id} on work pool {deployment.work_pool_name}")
    print(f"  {flow_run_url(api_url, flow_run.id)}")
    print(f"  artifacts: {RunStore(root, run_id).location}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """`collapse deploy`: the work pools and deployments of prefect.yaml, on the current server.

    Idempotent: existing pools are kept (a given --pool-limit is set on them), and
    `prefect deploy` updates existing deployments in place.
    """
    import yaml

    api_url = _connect()
    if isinstance(api_url, int):
        return api_url
    # Where the workers find the code (resolved into the deployments' pull step): this checkout
    # for workers on this machine, /opt/collapse for the Docker image's.
    # Absolute: the pull step runs in the worker's working directory, not this one.
    code_dir = Path(args.code_dir or os.environ.get("COLLAPSE_CODE_DIR") or CODE_DIR)
    code_dir = Path(os.path.abspath(code_dir.expanduser()))
    declared = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    pools = sorted({d["work_pool"]["name"] for d in declared})

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.read_work_pool(pool)
                print(f"work pool {pool}: exists")
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool,
                        type="process",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
                print(f"work pool {pool}: created (type process)")
            if args.pool_limit is not None:
                client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=args.pool_limit))
                print(f"work pool {pool}: at most {args.pool_limit} flow runs at once")
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all"]
    command += ["--prefect-file", str(PREFECT_FILE)]
    env = dict(os.environ, COLLAPSE_CODE_DIR=str(code_dir))
    done = subprocess.run(command, cwd=CODE_DIR, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        return _fail(f"`prefect deploy --all` failed (exit {done.returncode}); its output is above")
    names = ", ".join(f"{_flow_of(d)}/{d['name']}" for d in declared)
    print(f"deployments: {names} (workers run the code in {code_dir})")
    print(f"Prefect: {api_url}")
    return 0


def _flow_of(declared: dict[str, Any]) -> str:
    return declared["entrypoint"].rsplit(":", 1)[1]


def _deployment_name(text: str) -> str:
    """An argparse type: 'flow/deployment'."""
    flow, _, name = text.partition("/")
    if not flow or not name or "/" in name:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'flow/deployment' (e.g. {DEFAULT_DEPLOYMENT})"
        )
    return text


def add_parsers(sub: Any) -> None:
    """Add `submit` and `deploy` to the `collapse` subcommands."""
    submit = sub.add_parser("submit", help="queue a run on a work pool (a worker runs it)")
    submit.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    submit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    submit.add_argument(
        "--deployment",
        type=_deployment_name,
        default=DEFAULT_DEPLOYMENT,
        help=f"'flow/deployment' to run it on (default: {DEFAULT_DEPLOYMENT})",
    )
    submit.add_argument(
        "--at", default=None, metavar="WHEN", help="start at this ISO time, e.g. 2026-12-01T03:00"
    )
    submit.set_defaults(func=cmd_submit)
    deploy = sub.add_parser("deploy", help="create the work pools and deployments of prefect.yaml")
    deploy.add_argument(
        "--pool-limit",
        type=whole_number(0, None, "{value}: a pool runs 0 or more flow runs at once"),
        default=None,
        metavar="N",
        help="run at most N flow runs at once on each pool (the rest wait, queued)",
    )
    deploy.add_argument(
        "--code-dir",
        default=None,
        metavar="DIR",
        help="where workers find this code (default: $COLLAPSE_CODE_DIR, else this checkout; "
        "/opt/collapse in the Docker image)",
    )
    deploy.set_defaults(func=cmd_deploy)
