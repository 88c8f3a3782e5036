"""`collapse deploy` and `collapse submit`: a run queued on a work pool, its worker killed, resumed.

The slow test starts a real Prefect server (`collapse ui`) on 127.0.0.1 and process workers over a
PREFECT_HOME private to it, and stops every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.submit import idempotency_key, run_folder_locked, submitted_parameters

from .conftest import REPO, tiny_config_dict, write_story_file
from .test_e2e import (
    _all,
    _env,
    _free_port,
    _post,
    _start_ui,
    _wait_for_ui,
    collapse,
    make_config,
    output_hashes,
    run_dir,
)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("collapse: error:")]


def test_submit_without_a_server_says_how_to_start_one(tmp_path: Path, tiny_config_file: Path):
    """No PREFECT_API_URL and no `collapse ui`: Prefect's temporary server would be no use."""
    proc = collapse(tmp_path, "submit", str(tiny_config_file), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (message,) = _errors(proc.stderr)
    assert "collapse ui" in message and "PREFECT_API_URL" in message
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()


def test_submit_to_a_server_that_does_not_answer_says_so_and_offers_no_temporary_one(
    tmp_path: Path, tiny_config_file: Path
):
    api = f"http://127.0.0.1:{_free_port()}/api"  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "submit", str(tiny_config_file)],
        env=_env(tmp_path, PREFECT_API_URL=api),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (message,) = _errors(proc.stderr)
    assert f"no Prefect server answers at PREFECT_API_URL={api}" in message
    assert "temporary" not in message and "Traceback" not in proc.stderr


def test_submit_checks_the_config_as_run_does(tmp_path: Path, tiny_config_file: Path):
    proc = collapse(tmp_path, "submit", str(tiny_config_file), "train.lr=-1", "corpus.path=/nope")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _errors(proc.stderr) == ["collapse: error: invalid config:"]  # one problem a line
    assert "train.lr" in proc.stderr and "corpus.path '/nope' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_a_relative_artifact_root_is_made_absolute_with_a_warning(
    tmp_path: Path, story_file: Path, monkeypatch: pytest.MonkeyPatch
):
    from collapse.config import Config, run_id_for

    monkeypatch.chdir(tmp_path)
    config = Config.model_validate(tiny_config_dict(story_file, Path("artifacts")))
    parameters, warnings = submitted_parameters(config)
    assert parameters["config"]["run"]["artifact_root"] == str(tmp_path / "artifacts")
    assert parameters["run_id"] == run_id_for(config)  # the root is not part of the run id
    (warning,) = warnings
    assert str(tmp_path / "artifacts") in warning and "workers must see" in warning
    assert idempotency_key(parameters) == idempotency_key(json.loads(json.dumps(parameters)))
    other = Config.model_validate(tiny_config_dict(story_file, Path("artifacts"), generations=3))
    assert idempotency_key(submitted_parameters(other)[0]) != idempotency_key(parameters)


def _start_worker(env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """A process worker on the `gpu` pool, in a process group of its own (with its flow runs)."""
    prefect = str(Path(sys.executable).with_name("prefect"))
    return subprocess.Popen(
        [prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        cwd=cwd,
        start_new_session=True,
    )


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first found first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # the command name (field 2) may hold spaces: the fields after it start after ")"
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal `proc`'s process group and every process below it (a worker starts each flow run
    in a session of its own), then reap `proc`."""
    below = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    proc.wait(timeout=60)
    for pid in below:  # not our children: wait until they are gone (or only a zombie is left)
        _wait(lambda pid=pid: not _alive(pid), f"process {pid} to end", 60, 0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(condition, what: str, timeout: float = 600, every: float = 0.5):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return found


def _run_started(root: Path) -> bool:
    """Whether the run's folder exists under the artifact root."""
    return root.is_dir() and any(p.is_dir() for p in root.iterdir())


def _records(root: Path) -> dict[tuple[str, str], dict]:
    """(generation folder, stage) -> manifest record of every recorded stage."""
    records = {}
    for manifest in sorted(run_dir(root).glob("gen-*/manifest.json")):
        for name, record in json.loads(manifest.read_text())["stages"].items():
            records[(manifest.parent.name, name)] = record
    return records


@pytest.mark.slow
def test_a_submitted_run_survives_a_killed_worker(tmp_path: Path, reference: Path):
    """deploy, submit, kill -9 the worker mid-run, new worker, resubmit: it completes, equal to a
    local run (`reference`, of the same config and corpus), recomputing nothing that had
    finished, with one experiment flow run throughout."""
    home = tmp_path / "prefect-home"
    corpus = write_story_file(tmp_path / "stories.txt", n=200)
    started: list[subprocess.Popen] = []
    ui = _start_ui(home, _free_port(), cwd=tmp_path)
    started.append(ui)
    try:
        _wait_for_ui(ui, home)
        api = json.loads((home / "ui-server.json").read_text())["api_url"]
        # The CLI finds the `collapse ui` server of its PREFECT_HOME; the workers are told.
        deployed = collapse(home, "deploy", "--pool-limit", "1")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "experiment/gpu" in deployed.stdout and "generation/gpu" in deployed.stdout
        again = collapse(home, "deploy")  # idempotent
        assert again.returncode == 0 and "work pool gpu: exists" in again.stdout, again.stderr

        worker_env = _env(home, PREFECT_API_URL=api)
        worker_log = tmp_path / "worker.log"
        worker = _start_worker(worker_env, worker_log, tmp_path)
        started.append(worker)
        root = tmp_path / "shared" / "artifacts"
        root.parent.mkdir()
        config = make_config(root.parent, corpus, root)
        submitted = collapse(home, "submit", str(config))
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        flow_run_id = re.search(r"flow run ([0-9a-f-]{36})", submitted.stdout).group(1)
        assert f"/runs/flow-run/{flow_run_id}" in submitted.stdout
        assert "queued" in submitted.stdout
        # Submitting it again while it waits or runs adds no second flow run.
        twice = collapse(home, "submit", str(config))
        assert twice.returncode == 0 and flow_run_id in twice.stdout, twice.stdout + twice.stderr
        assert "already" in twice.stdout

        # kill -9 the worker and the flow run it runs once generation 1 is trained: a lost node
        # (the artifact root's folder appears a moment before the run's folder inside it)
        _wait(lambda: _run_started(root) and ("gen-001", "train") in _records(root), "gen 1 train")
        _kill_group(worker)
        run_id = run_dir(root).name
        _wait(  # nothing of the lost attempt is left running
            lambda: run_folder_locked(str(root), run_id) is False,
            f"the run folder lock to be free; /proc/locks: {Path('/proc/locks').read_text()}",
            timeout=30,
        )
        before = _records(root)
        assert ("gen-002", "train") not in before

        def flow_runs() -> list[dict]:
            return [
                r
                for r in _all(api, "flow_runs")
                if r["name"] in (run_id, *(f"{run_id}-gen-{g}" for g in range(3)))
                and r["parameters"]["config"]["run"]["artifact_root"] == str(root)
            ]

        assert {r["id"]: r["state_type"] for r in flow_runs() if r["name"] == run_id} == {
            flow_run_id: "RUNNING"  # nobody told the server: a lost worker cannot
        }
        worker = _start_worker(worker_env, worker_log, tmp_path)
        started.append(worker)
        resubmitted = collapse(home, "submit", str(config))
        assert resubmitted.returncode == 0, resubmitted.stdout + resubmitted.stderr
        assert f"flow run {flow_run_id}" in resubmitted.stdout
        assert "worker was lost" in resubmitted.stdout

        def finished() -> dict | None:
            (run,) = [r for r in flow_runs() if r["name"] == run_id]
            return run if run["state_type"] not in ("SCHEDULED", "PENDING", "RUNNING") else None

        run = _wait(finished, "the retried flow run to finish", every=2)
        log = worker_log.read_text()
        assert run["state_type"] == "COMPLETED", log[-5000:]
        assert run["run_count"] == 2
        after = _records(root)
        for key, record in before.items():  # finished before the kill: kept, not recomputed
            assert after[key]["completed_at"] == record["completed_at"], key
            assert after[key]["digest"] == record["digest"], key
        assert ("gen-002", "train") in after
        assert output_hashes(root, "corpus/") == output_hashes(reference, "corpus/")
        assert output_hashes(root, "model/") == output_hashes(reference, "model/")
        assert output_hashes(root, "eval/") == output_hashes(reference, "eval/")
        # One experiment flow run; no generation left Running beside another; the lost
        # attempt's unfinished generation flow runs were closed as Crashed.
        runs = flow_runs()
        assert [r["id"] for r in runs if r["name"] == run_id] == [flow_run_id]
        assert not [r for r in runs if r["state_type"] in ("RUNNING", "PENDING", "SCHEDULED")]
        # Each attempt enters a generation's chain at most once (Prefect re-enters nested flows
        # on a retry: generation 0's second flow run only found its stages done). Which of the
        # lost attempt's chains had finished when the worker died depends on timing (pipelined
        # runs start generation g+1's chain while g's evaluations run), so only that is fixed:
        # the retry completes every generation, and nothing of the lost attempt is left open.
        for gen in range(3):
            states = sorted(r["state_type"] for r in runs if r["name"] == f"{run_id}-gen-{gen}")
            assert 1 <= len(states) <= 2 and "COMPLETED" in states, (gen, states)
            assert set(states) <= {"COMPLETED", "CRASHED"}, (gen, states)
        assert len([r for r in runs if r["name"] == f"{run_id}-gen-0"]) == 2  # both attempts
        lost_tasks = _post(
            f"{api}/task_runs/filter",
            {"flow_runs": {"id": {"any_": [r["id"] for r in runs]}}, "limit": 200},
        )
        assert not [t for t in lost_tasks if t["state_type"] in ("RUNNING", "PENDING")]
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM if proc is ui else signal.SIGKILL)
    assert all(proc.poll() is not None for proc in started)


def test_prefect_yaml_declares_the_experiment_deployment_beside_the_generation_one():
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    entrypoints = {(d["entrypoint"], d["name"], d["work_pool"]["name"]) for d in declared}
    assert ("flows/experiment.py:experiment", "gpu", "gpu") in entrypoints
    assert ("flows/experiment.py:generation", "gpu", "gpu") in entrypoints
