"""`collapse` command line: run, sweep, status, report, staging, ui, submit, deploy.

User mistakes (bad config, unreadable corpus, a run in use) print a message and exit with code 2,
without a traceback and before anything is written where possible.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from collapse.config import (
    Config,
    ConfigError,
    RunConfig,
    config_to_dict,
    run_id_for,
)

EXIT_USAGE = 2
# where runs named by their id alone are: run.artifact_root's default
DEFAULT_ROOT: str = RunConfig.model_fields["artifact_root"].default
SWEEP_HAS_ROOTS = (
    "--root does not go with --sweep: the sweep file says where each arm's run is "
    "(its run.artifact_root)"
)
T = TypeVar("T")


def whole_number(low: int, high: int | None, out_of_range: str) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high] (no upper bound when `high` is None).

    Args:
        low: the least value.
        high: the greatest value, or None.
        out_of_range: the message for a number outside; `{value}` is replaced by it.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(out_of_range.format(value=value))
        return value

    return parse


port_number = whole_number(1, 65535, "{value} is no port: use 1-65535")


def _fail(message: str) -> int:
    print(f"collapse: error: {message}", file=sys.stderr)
    return EXIT_USAGE


class _ConsoleFilter(logging.Filter):
    """Keeps the CLI's one-line message the end of a run stopped by a user error.

    Prefect logs such an error with its traceback once per task and flow run; on the console
    those records are dropped (the API handler, which the UI reads, sees them first, and the
    "Finished in state Failed(...)" lines still say where it failed). Once `stopped` is set,
    routine INFO lines (the temporary server's goodbye) are dropped too.
    """

    def __init__(self, types: tuple[type[BaseException], ...]):
        super().__init__()
        self.types = types
        self.stopped = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.stopped and record.levelno < logging.WARNING:
            return False
        return not (record.exc_info and isinstance(record.exc_info[1], self.types))


def console_filter(types: tuple[type[BaseException], ...]) -> _ConsoleFilter:
    """Install a `_ConsoleFilter` on the console handlers Prefect configured."""
    from prefect.logging.handlers import PrefectConsoleHandler

    console = _ConsoleFilter(types)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(console)
    return console


def _connect() -> tuple[str, bool] | str:
    """Point Prefect at a server (see flows.prefect_env).

    Returns:
        (API URL, whether it is a shared server), or the message to fail with.
    """
    from flows import prefect_env

    prefect_env.configure()
    try:
        api_url = prefect_env.connect(on_wait=lambda message: print(message, flush=True))
    except prefect_env.PrefectUnreachable as exc:
        return str(exc)
    return api_url, bool(os.environ.get("PREFECT_API_URL"))


def _flow_or_exit(
    call: Callable[[], T], console: _ConsoleFilter, api_url: str, shared: bool
) -> T | int:
    """Run a flow for the CLI: its result, or the exit code after a one-line message when it
    stopped on a user error or lost the Prefect API (anything else is raised)."""
    import httpx

    from collapse.errors import UserError

    try:
        return call()
    except UserError as exc:
        console.stopped = True
        return _fail(str(exc))
    except httpx.ConnectError as exc:
        message = _lost_api(exc, api_url, shared)
        if message is None:
            raise
        return _fail(message)


def _lost_api(exc: Exception, api_url: str, shared: bool) -> str | None:
    """The message for a connection error that lost the Prefect API, None if Prefect is up."""
    from flows import prefect_env

    if prefect_env.server_healthy(api_url):
        return None  # Prefect is up: something else (a download, the judge) failed to connect
    fix = (
        "start it again and rerun (the run resumes where it stopped)"
        if shared
        else prefect_env.SHARE_HINT
    )
    return f"lost the Prefect API at {api_url} ({exc}): {fix}"


def checked_config(path: str, overrides: list[str], sweep_hint: str) -> Config | str:
    """The validated config, or the message to fail with: what `collapse run` and `collapse
    submit` check before a run starts (`collapse.started.config_to_run`; a line says so when
    the run resumes as it was started under earlier defaults).

    Args:
        path: the config file.
        overrides: `key=value` overrides.
        sweep_hint: what to say when `path` is a sweep file.
    """
    from collapse.started import config_to_run
    from collapse.sweep import is_sweep_file

    if is_sweep_file(path):
        return f"{path} is a sweep file: {sweep_hint}"
    config, problems, note = config_to_run(path, overrides, check_inputs=True)
    if note:
        print(note)
    if config is None:
        return str(ConfigError(problems))
    return config


def cmd_run(args: argparse.Namespace) -> int:
    """`collapse run CONFIG [key=value ...]`."""
    hint = f"run it with `collapse sweep {args.config}`"
    config = checked_config(args.config, args.overrides, hint)
    if isinstance(config, str):
        return _fail(config)
    if args.from_generation is not None and not (
        0 <= args.from_generation <= config.run.generations
    ):
        return _fail(
            f"--from-generation must be between 0 and run.generations ({config.run.generations})"
        )
    run_id = run_id_for(config)

    connected = _connect()
    if isinstance(connected, str):
        return _fail(connected)
    api_url, shared = connected

    from collapse.errors import UserError
    from collapse.pipeline import table_columns
    from collapse.staging import size_of
    from collapse.store import RunStore, format_bytes
    from collapse.table import text_table
    from flows.experiment import experiment

    store = RunStore(config.run.artifact_root, run_id)
    where = store.location
    server = api_url if shared else f"ephemeral server {api_url}"
    print(f"run {run_id}: {where}  (Prefect: {server})")
    started = time.perf_counter()
    console = console_filter((UserError,))
    result = _flow_or_exit(
        lambda: experiment(config_to_dict(config), run_id, args.from_generation),
        console,
        api_url,
        shared,
    )
    if isinstance(result, int):
        return result
    seconds = time.perf_counter() - started
    print()
    for summary in result["generations"]:
        stages = summary["stages"]
        reused = sum(s["reused"] for s in stages)
        state = (
            "reused"
            if reused == len(stages)
            else f"computed {len(stages) - reused}/{len(stages)} stages"
        )
        print(f"generation {summary['generation']}: {state}")
    if all(s["reused"] for g in result["generations"] for s in g["stages"]):
        print("every generation was reused")
    skipped: dict[tuple[str, str], list[int]] = {}
    for summary in result["generations"]:
        for stage in summary["stages"]:
            reason = (stage.get("info") or {}).get("skipped")
            if reason:
                skipped.setdefault((stage["stage"], reason), []).append(summary["generation"])
    for (stage, reason), gens in skipped.items():
        print(f"{stage} skipped (generations {', '.join(map(str, gens))}): {reason}")
    print()
    print(text_table(result["table"], table_columns(config)))
    print(f"\nreport:    {result['report']}")
    print(f"artifacts: {where}   ({seconds:.1f} s)")
    if store.remote is not None and store.run_dir.is_dir():
        # Every stage is published: the copy only saves downloads if the run is extended here.
        size = format_bytes(size_of(store.run_dir))
        print(f"staging:   {store.run_dir} ({size}; `collapse staging --clean` frees it)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`collapse sweep SWEEP.yaml`: every arm as an experiment subflow, then the arm table."""
    sweep = _load_sweep(args.sweep, check_inputs=True)
    if isinstance(sweep, str):
        return _fail(sweep)
    connected = _connect()
    if isinstance(connected, str):
        return _fail(connected)
    api_url, shared = connected
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from collapse.errors import UserError
    from collapse.sweep_report import arm_table, text_grid
    from flows.sweep import SweepFailed
    from flows.sweep import sweep as sweep_flow

    for note in sweep.notes:
        print(note)
    distinct = sweep.runs  # arms with equal configs are one run, run once
    runs = [
        {
            "label": "; ".join(sweep.labels_of(arm)),
            "run_id": arm.run_id,
            "config": config_to_dict(arm.config),
        }
        for arm in distinct
    ]
    limit = sweep.spec.max_concurrent
    server = api_url if shared else f"ephemeral server {api_url}"
    print(
        f"sweep {sweep.name}: {len(sweep.arms)} arms, {len(runs)} runs, at most {limit} at once"
        f"  (Prefect: {server})"
    )
    listing = [
        [r["label"], r["run_id"], a.store.location] for r, a in zip(runs, distinct, strict=True)
    ]
    print(text_grid(["arm", "run id", "run folder"], listing))
    started = time.perf_counter()
    # Failed arms are listed below, one line each; Prefect's tracebacks of them only bury that.
    console = console_filter((UserError, SweepFailed))

    def run_sweep() -> tuple[SweepFailed | None, list[dict]]:
        try:
            # The arms' processes reach this process's Prefect server through the settings
            # they inherit; a temporary server is otherwise known only to its starter.
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                return None, sweep_flow(sweep.name, str(sweep.path.resolve()), runs, limit)
        except SweepFailed as exc:  # some arms failed: listed below with the others
            return exc, exc.outcomes

    ran = _flow_or_exit(run_sweep, console, api_url, shared)
    if isinstance(ran, int):
        return ran
    failed, outcomes = ran
    seconds = time.perf_counter() - started
    print()
    for outcome in outcomes:
        if outcome["status"] != "done":
            state = f"failed: {outcome['message']}"
        elif outcome["computed"] == 0:
            state = "every generation was reused"
        else:
            state = f"computed {outcome['computed']} of {outcome['stages']} stages"
        print(f"arm {outcome['label']} (run {outcome['run_id']}): {state}")
    print()
    print(text_grid(*arm_table(sweep)))
    print(f"\nreport: {sweep.report_store.location}/report.html   ({seconds:.1f} s)")
    if failed is None:
        return 0
    console.stopped = True
    for outcome in outcomes:
        if outcome["status"] != "done":
            print(
                f"collapse: error: arm {outcome['label']} (run {outcome['run_id']}): "
                + outcome["message"].replace("\n", " "),
                file=sys.stderr,
            )
    # Every failure one the user can fix (a run in use): exit 2, as a `collapse run` would.
    return EXIT_USAGE if isinstance(failed, UserError) else 1


def _stage_state(ctx: Any, gen: int, stage: str, record: dict[str, Any] | None) -> str:
    """done, skipped, stale (recorded under another key: the next run recomputes it) or -."""
    from collapse.pipeline import record_is_current

    if record is None:
        return "-"
    if not record_is_current(ctx, gen, stage, record):
        return "stale"
    return "skipped" if (record.get("info") or {}).get("skipped") else "done"


def cmd_status(args: argparse.Namespace) -> int:
    """`collapse status [RUN | --sweep SWEEP]`: per-generation stage table from the manifests."""
    from collapse.context import RunNotFoundError, open_run
    from collapse.pipeline import metrics_table, table_columns
    from collapse.store import RunStore, root_problem, run_ids, run_location
    from collapse.table import text_table

    if args.sweep:
        if args.run is not None:
            return _fail("give a run or --sweep, not both")
        if args.root is not None:
            return _fail(SWEEP_HAS_ROOTS)
        return _sweep_status(args.sweep)
    root = args.root or DEFAULT_ROOT
    unreadable = root_problem(root if args.run is None else run_location(args.run, root), False)
    if unreadable:
        return _fail(unreadable)
    if args.run is None:
        runs = run_ids(root)
        if not runs:
            print(f"no runs under {root}")
            return 0
        for run in runs:
            store = RunStore(root, run)
            print(f"{run}  generations on disk: {len(store.generations_on_disk())}")
        return 0
    try:
        ctx = open_run(run_location(args.run, root))
    except RunNotFoundError as exc:
        return _fail(str(exc))
    print(f"run {ctx.store.run_id}  ({ctx.store.location})\n")
    with ctx.store.manifests_read_once():  # the progress lines and the table read the same
        print("\n".join(_progress_lines(ctx)))
        print()
        print(text_table(metrics_table(ctx), table_columns(ctx.config)))
    return 0


def _progress_lines(ctx: Any) -> list[str]:
    """One line per generation: each stage's state from the manifest (`_stage_state`)."""
    from collapse.pipeline import stages_of

    lines = []
    with ctx.store.manifests_read_once():
        for gen in range(0, ctx.config.run.generations + 1):
            stages = ctx.store.read_manifest(gen)["stages"]
            cells = [
                f"{name}:{_stage_state(ctx, gen, name, stages.get(name))}"
                for name in stages_of(ctx, gen)
            ]
            lines.append(f"gen {gen:>3}  " + "  ".join(cells))
    return lines


def _load_sweep(path: str, check_inputs: bool) -> Any:
    """The expanded sweep, or the one-line failure message (a str)."""
    from collapse.sweep import SweepError, load_sweep

    try:
        return load_sweep(path, check_inputs=check_inputs)
    except SweepError as exc:
        return str(exc)


def _sweep_status(path: str) -> int:
    """`collapse status --sweep SWEEP.yaml`: every arm's run id and stage progress."""
    from collapse.sweep_report import arm_context, arm_table, text_grid

    sweep = _load_sweep(path, check_inputs=False)
    if isinstance(sweep, str):
        return _fail(sweep)
    print(f"sweep {sweep.name}  ({sweep.path}): {len(sweep.arms)} arms, {len(sweep.runs)} runs\n")
    for arm in sweep.arms:
        started = "" if arm.store.started() else "  not started"
        print(f"arm {arm.label}  run {arm.run_id}  ({arm.store.location}){started}")
        print("\n".join(_progress_lines(arm_context(arm))))
        print()
    print(text_grid(*arm_table(sweep)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`collapse report RUN [RUN ...] | --sweep SWEEP`: report.html and PNG figures."""
    from collapse.report import ReportError, write_report
    from collapse.store import RunStore, root_problem, run_location

    if args.sweep:
        if args.runs or args.out:
            return _fail("--sweep takes no runs and no --out (it writes to reports/sweep-NAME)")
        if args.root is not None:
            return _fail(SWEEP_HAS_ROOTS)
        from collapse.sweep_report import write_sweep_report

        sweep = _load_sweep(args.sweep, check_inputs=False)
        if isinstance(sweep, str):
            return _fail(sweep)
        if not any(arm.store.started() for arm in sweep.runs):
            return _fail(
                f"no arm of sweep {sweep.name!r} has started, so there is nothing to report: "
                f"run `collapse sweep {args.sweep}` first"
            )
        write_sweep_report(sweep)
        print(f"report: {sweep.report_store.location}/report.html")
        return 0
    if not args.runs:
        return _fail("give one or more runs, or --sweep SWEEP.yaml")
    runs = [run_location(r, args.root or DEFAULT_ROOT) for r in args.runs]
    unreadable = [p for p in (root_problem(r, write=False) for r in runs) if p]
    if unreadable:
        return _fail("; ".join(unreadable))
    missing = [r for r in runs if not RunStore.at(r).started()]
    if missing:
        return _fail(f"not a run directory (no config.yaml): {', '.join(missing)}")
    try:
        page = write_report(runs, Path(args.out) if args.out else None)
    except ReportError as exc:
        return _fail(str(exc))
    except OSError as exc:  # --out names a file, a folder that cannot be made or written
        return _fail(f"cannot write the report to {args.out or 'the run folder'}: {exc}")
    print(f"report: {page.resolve()}")
    return 0


class _Stop(Exception):
    """SIGTERM or SIGHUP reached `collapse ui` (a service manager, `kill`, a closed terminal)."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server child and reap it; kill it if it does not stop in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cmd_ui(args: argparse.Namespace) -> int:
    """`collapse ui`: Prefect server over the project's PREFECT_HOME on 127.0.0.1.

    Stops its server child on Ctrl-C, SIGTERM and SIGHUP, and removes the state file that points
    runs at it, so no server is left holding the port.
    """
    from flows import prefect_env

    home = prefect_env.prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    api_url = f"{url}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    # The UI page asks /ui-settings where the API is; unset, Prefect answers with the default
    # port (4200) whatever --port says, and the UI stays blank on any other port.
    env.pop("PREFECT_UI_API_URL", None)
    env["PREFECT_SERVER_UI_API_URL"] = api_url
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect) if prefect.exists() else "prefect", "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(args.port)]
    state = home / prefect_env.UI_STATE
    wrote_state = False
    # Without handlers SIGTERM/SIGHUP end this process at once and orphan the server on the port.
    handled = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in (*handled, signal.SIGINT)}
    for sig in handled:
        signal.signal(sig, _raise_stop)
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Started one at a time with runs' servers (see server_start_lock); a run waiting on the
        # lock finds the state file written when it gets it, and reports here.
        with prefect_env.server_start_lock(home, on_wait=lambda m: print(m, flush=True)):
            proc = subprocess.Popen(command, env=env)
            for _ in range(600):
                if proc.poll() is not None:
                    return _fail(f"the Prefect server exited with code {proc.returncode}")
                if prefect_env.server_healthy(api_url):
                    break
                time.sleep(0.5)
            state.write_text(json.dumps({"api_url": api_url, "pid": proc.pid}))
            wrote_state = True
        print(
            f"Prefect UI: {url}   (PREFECT_HOME={home}; runs started now report here)", flush=True
        )
        return proc.wait()
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        # A second signal must not cut the cleanup short (the wait is bounded by _stop_server).
        for sig in (*handled, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if proc is not None:
            _stop_server(proc)
        if wrote_state:  # never another `collapse ui`'s (e.g. one that already holds the port)
            state.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_staging(args: argparse.Namespace) -> int:
    """List this machine's staging copies of runs under URL roots; remove unused ones."""
    from collapse.object_store import staging_base
    from collapse.staging import remove, staging_copies
    from collapse.store import format_bytes

    base = staging_base(args.dir)
    copies = staging_copies(base)
    if not copies:
        print(f"no staging copies under {base}")
        return 0
    freed = 0
    for copy in copies:
        state = "in use" if copy.in_use else "unused"
        if args.clean and not copy.in_use:
            # a process may have opened it since it was listed: remove() checks again
            state = "removed" if remove(copy) else "in use"
        if state == "removed":
            freed += copy.bytes
        print(f"{format_bytes(copy.bytes):>10}  {state:7s}  {copy.location}  ({copy.path})")
    total = sum(copy.bytes for copy in copies)
    if args.clean:
        print(f"freed {format_bytes(freed)}; kept {format_bytes(total - freed)} (in use)")
    else:
        print(f"{format_bytes(total)} under {base}; `collapse staging --clean` removes unused ones")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `collapse`."""
    parser = argparse.ArgumentParser(
        prog="collapse", description="Recursive-training (model collapse) experiments."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) an experiment")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    run.add_argument(
        "--from-generation",
        type=int,
        default=None,
        metavar="G",
        help="recompute generation G and every later one",
    )
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run (or resume) every arm of a sweep")
    sweep.add_argument("sweep", help="sweep file, e.g. configs/sweeps/mitigation-demo.yaml")
    sweep.set_defaults(func=cmd_sweep)
    status = sub.add_parser("status", help="per-generation stage table of a run or a sweep")
    status.add_argument("run", nargs="?", help="run id or run folder (omit to list runs)")
    status.add_argument("--root", default=None, help=f"artifact root (default: {DEFAULT_ROOT})")
    status.add_argument("--sweep", default=None, metavar="SWEEP", help="every arm of a sweep")
    status.set_defaults(func=cmd_status)
    report = sub.add_parser("report", help="write report.html and figures of runs or a sweep")
    report.add_argument("runs", nargs="*", help="run ids or run folders (several: overlay)")
    report.add_argument("--root", default=None, help=f"artifact root (default: {DEFAULT_ROOT})")
    report.add_argument("--out", default=None, help="output folder (default: see README)")
    report.add_argument(
        "--sweep", default=None, metavar="SWEEP", help="comparison report of a sweep's groups"
    )
    report.set_defaults(func=cmd_report)
    staging = sub.add_parser(
        "staging", help="local copies of runs under URL roots: list, or remove unused ones"
    )
    staging.add_argument(
        "--clean", action="store_true", help="remove every copy no process is using"
    )
    staging.add_argument(
        "--dir", default=None, help="staging folder (default: $COLLAPSE_STAGING or ~/.cache/…)"
    )
    staging.set_defaults(func=cmd_staging)
    ui = sub.add_parser("ui", help="start the Prefect UI over this project's runs")
    ui.add_argument("--port", type=port_number, default=4200)
    ui.set_defaults(func=cmd_ui)
    from flows.submit import add_parsers  # runs on a work pool: flows/submit.py

    add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `collapse` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `collapse run CONFIG --from-generation 2 train.lr=1e-3`: overrides after an option are
    # still overrides (argparse takes a positional list only before the options)
    if extra and isinstance(getattr(args, "overrides", None), list):
        strays = [e for e in extra if e.startswith("-") or "=" not in e]
        if not strays:
            args.overrides += extra
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`collapse status | head`): stop quietly, as Unix tools do, with
        # stdout pointed at /dev/null so that flushing it at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
