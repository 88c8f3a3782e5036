"""End to end through the CLI and Prefect: reuse, kill -9 and resume, corruption, the UI.

Every run is a real `collapse run` subprocess over a tiny config, with Prefect's ephemeral server
on a PREFECT_HOME private to this test session.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, tiny_config_dict
from .judge_server import JudgeServer, unauthorized

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(e2e_home: Path) -> Path:
    return e2e_home


@pytest.fixture(scope="module")
def corpus(e2e_corpus: Path) -> Path:
    return e2e_corpus


def collapse(
    home: Path, *args: str, fault: str | None = None, delay: str | None = None, timeout: int = 300
):
    """`collapse ARGS` in a subprocess; returns a CompletedProcess with its output.

    Output goes to files, not pipes, and the process group is killed afterwards: a `kill -9`ed
    run leaves its ephemeral Prefect server behind, which would otherwise hold the pipes open.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("COLLAPSE_FAULT", None)
    env.pop("COLLAPSE_DELAY", None)
    if fault:
        env["COLLAPSE_FAULT"] = fault
    if delay:
        env["COLLAPSE_DELAY"] = delay
    out_path, err_path = home / "last.out", home / "last.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            stdout=out,
            stderr=err,
            text=True,
            env=env,
            cwd=home,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, code, out_path.read_text(), err_path.read_text())


def make_config(tmp: Path, corpus: Path, root: Path) -> Path:
    path = tmp / f"tiny-{root.name}.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus, root)))
    return path


def run_dir(root: Path) -> Path:
    (only,) = [p for p in root.iterdir() if p.is_dir()]
    return only


def output_hashes(root: Path, prefix: str) -> dict[str, str]:
    """run-relative path -> sha256 of every recorded output under `prefix` (e.g. corpus)."""
    hashes = {}
    for manifest in sorted(run_dir(root).glob("gen-*/manifest.json")):
        for stage in json.loads(manifest.read_text())["stages"].values():
            hashes.update({k: v for k, v in stage["outputs"].items() if f"/{prefix}" in k})
    return hashes


def test_a_run_prints_its_table_and_a_rerun_reuses_everything(reference: Path, home: Path):
    config = next(reference.parent.glob("tiny-*.yaml"))
    corpus_files = output_hashes(reference, "corpus/")
    assert {Path(k).parent.as_posix() for k in corpus_files} == {
        "gen-000/corpus",
        "gen-001/corpus",
        "gen-002/corpus",
    }
    proc = collapse(home, "run", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "every generation was reused" in proc.stdout
    assert "perplexity" in proc.stdout and "entropy" in proc.stdout
    assert str(run_dir(reference).resolve()) in proc.stdout
    assert "Cached" in proc.stdout + proc.stderr  # Prefect shows the reuse too
    status = collapse(home, "status", run_dir(reference).name, "--root", str(reference))
    assert status.returncode == 0
    assert (
        "gen   2  train:done  sample:done  eval.perplexity:done  eval.entropy:done  "
        "eval.oov:done  eval.diversity:done  eval.excerpts:done  eval.judge:skipped"
    ) in status.stdout
    assert (run_dir(reference) / "report.html").is_file()
    judge = json.loads((run_dir(reference) / "gen-002" / "eval" / "judge.json").read_text())
    assert judge["skipped"].startswith("no judge configured")  # said, not faked
    assert "eval.judge skipped (generations 0, 1, 2): no judge configured" in proc.stdout


@pytest.mark.parametrize(
    ("fault", "resume_line"),
    [("train:1", "resuming training from checkpoint at step 3"), ("sample:1", "resuming sampling")],
)
def test_kill_9_then_resume_equals_uninterrupted(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    home: Path,
    corpus: Path,
    reference: Path,
    fault: str,
    resume_line: str,
):
    root = tmp_path / "artifacts"
    config = make_config(tmp_path, corpus, root)
    killed = collapse(home, "run", str(config), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    gen1 = run_dir(root) / "gen-001"
    if fault.startswith("train"):
        assert (gen1 / "train-state" / "checkpoint.pt").is_file()
        assert not (gen1 / "model").exists()
    else:
        assert (gen1 / "corpus" / "_progress.json").is_file()
    finished = _records(root)  # e.g. generation 0's evaluations, run beside training
    assert ("gen-000", "corpus") in finished
    resumed = collapse(home, "run", str(config))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = _records(root)
    assert {k: after[k] for k in finished} == finished  # nothing finished was recomputed
    assert resume_line in resumed.stdout + resumed.stderr
    # Every stage, the resumed one included, has the reference's key and bytes: a resumed
    # training's statistics are those of an uninterrupted one, so no key after it differs.
    assert _stages(root) == _stages(reference)
    assert not list(run_dir(root).rglob("*.tmp"))
    # The killed process's flow runs (experiment and generation 1, and its stage task) are closed
    # as Crashed by the resumed run, not left Running beside it. The first case's runs used
    # ephemeral servers; the UI started here serves the second case's runs.
    api = request.getfixturevalue("ui_api")
    run_id = run_dir(root).name
    ours = [  # the run id leaves out the artifact root: the reference run has the same names
        r
        for r in _all(api, "flow_runs")
        if r["name"] in (run_id, f"{run_id}-gen-1")
        and r["parameters"]["config"]["run"]["artifact_root"] == str(root)
    ]
    states = sorted((r["name"], r["state_type"]) for r in ours)
    assert states == [
        (run_id, "COMPLETED"),
        (run_id, "CRASHED"),
        (f"{run_id}-gen-1", "COMPLETED"),
        (f"{run_id}-gen-1", "CRASHED"),
    ]
    crashed = [r for r in ours if r["state_type"] == "CRASHED"]
    resumed_id = next(r["id"] for r in ours if r["name"] == run_id and r not in crashed)
    for run in crashed:
        assert run["state"]["message"] == (
            f"superseded: the run was killed and resumed by flow run {resumed_id}"
        )
    killed_tasks = _post(
        f"{api}/task_runs/filter",
        {"flow_runs": {"id": {"any_": [r["id"] for r in crashed]}}, "limit": 200},
    )
    assert killed_tasks and not [t for t in killed_tasks if t["state_type"] == "RUNNING"]
    stage = fault.split(":")[0]
    assert {t["name"]: t["state_type"] for t in killed_tasks}[f"{stage}-gen-1"] == "CRASHED"


def test_the_reference_path_resumes_byte_identical_after_kill_9(
    tmp_path: Path, home: Path, corpus: Path
):
    # The defaults (fast model, continuous batching) are killed and resumed above; this is the
    # transformers model with static batches sharing one stream per shard.
    reference = ["model.implementation=transformers", "sample.rng=shard", "run.generations=1"]
    reference.append("eval.metrics=[entropy]")
    roots = {}
    for name, fault in (("whole", None), ("killed", "sample:1")):
        roots[name] = tmp_path / name / "artifacts"
        config = make_config(tmp_path, corpus, roots[name])
        proc = collapse(home, "run", str(config), *reference, fault=fault)
        if fault:
            assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
            proc = collapse(home, "run", str(config), *reference)
            assert "resuming sampling" in proc.stdout + proc.stderr
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert output_hashes(roots["killed"], "corpus/") == output_hashes(roots["whole"], "corpus/")
    assert output_hashes(roots["killed"], "model/") == output_hashes(roots["whole"], "model/")
    info = json.loads((run_dir(roots["whole"]) / "gen-001" / "manifest.json").read_text())
    assert info["stages"]["sample"]["info"]["sequences"] == 120


def test_a_corrupted_artifact_is_recomputed_and_what_it_feeds_only_if_it_changed(
    tmp_path: Path, home: Path, corpus: Path, reference: Path
):
    """A truncated corpus shard is detected and the corpus sampled again. The new corpus has
    the same bytes, so the evaluations and generations computed from it, whose keys chain its
    digest, stay valid and are not recomputed."""
    root = tmp_path / "artifacts"
    shutil.copytree(reference, root)
    shard = run_dir(root) / "gen-001" / "corpus" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    proc = collapse(home, "run", str(make_config(tmp_path, corpus, root)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "generation 0: reused" in proc.stdout
    assert "generation 1: computed 1/8 stages" in proc.stdout  # sample
    assert "generation 2: reused" in proc.stdout
    assert _stages(root) == _stages(reference)


def test_from_generation_recomputes_that_generation_and_later(
    tmp_path: Path, home: Path, corpus: Path, reference: Path
):
    root = tmp_path / "artifacts"
    shutil.copytree(reference, root)
    config = make_config(tmp_path, corpus, root)
    proc = collapse(home, "run", str(config), "--from-generation", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "generation 1: reused" in proc.stdout
    assert "generation 2: computed 8/8 stages" in proc.stdout
    bad = collapse(home, "run", str(config), "--from-generation", "7")
    assert bad.returncode == 2 and "between 0 and run.generations" in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


def _start_ui(home: Path, port: int, cwd: Path) -> subprocess.Popen:
    """`collapse ui --port PORT` over `home`, in a process group of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(home),
        cwd=cwd,
        start_new_session=True,
    )


def _wait_for_ui(ui: subprocess.Popen, home: Path) -> None:
    """Until the UI's state file says its server answers."""
    deadline = time.time() + 180
    while not (home / "ui-server.json").exists():
        assert ui.poll() is None, "collapse ui exited"
        assert time.time() < deadline, "the UI server did not start"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ui_api(home: Path, reference: Path):
    """`collapse ui` on a free port over the test PREFECT_HOME (after the reference run)."""
    port = _free_port()
    ui = _start_ui(home, port, cwd=home)
    try:
        _wait_for_ui(ui, home)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)


def test_runs_and_artifacts_are_visible_in_the_ui(home: Path, reference: Path, ui_api: str):
    run_id = run_dir(reference).name
    runs = _post(f"{ui_api}/flow_runs/filter", {"limit": 200})
    names = {r["name"] for r in runs}
    assert run_id in names and f"{run_id}-gen-1" in names and f"{run_id}-gen-2" in names
    key = f"{run_id}-metrics"
    artifacts = _post(f"{ui_api}/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})
    assert artifacts and artifacts[0]["type"] == "table"
    rows = json.loads(artifacts[0]["data"])
    assert [r["generation"] for r in rows] == [0, 1, 2]
    # a run started while the UI is up reports to it
    config = next(reference.parent.glob("tiny-*.yaml"))
    again = collapse(home, "run", str(config))
    assert again.returncode == 0 and ui_api in again.stdout
    assert len(_post(f"{ui_api}/flow_runs/filter", {"limit": 200})) > len(runs)


def test_the_ui_calls_the_api_on_the_port_it_is_served_on(ui_api: str):
    """The UI page learns its API URL from /ui-settings; Prefect's default there is port 4200."""
    assert not ui_api.endswith(":4200/api")  # a free port, so the default would be wrong
    with urllib.request.urlopen(ui_api.removesuffix("/api") + "/ui-settings", timeout=30) as resp:
        assert json.loads(resp.read())["api_url"] == ui_api


def test_sigterm_stops_collapse_ui_with_its_server(tmp_path: Path):
    """A service manager's stop (SIGTERM to `collapse ui` alone) leaves no server on the port."""
    home = tmp_path / "prefect-home"
    port = _free_port()
    ui = _start_ui(home, port, cwd=tmp_path)
    state = home / "ui-server.json"
    try:
        _wait_for_ui(ui, home)
        server_pid = json.loads(state.read_text())["pid"]
        os.kill(ui.pid, signal.SIGTERM)  # the process only, not its group
        assert ui.wait(timeout=60) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
        assert not state.exists()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing answers on the port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGKILL)


def test_generations_run_on_a_work_pool_worker(
    tmp_path: Path, home: Path, corpus: Path, reference: Path, ui_api: str
):
    """prefect.yaml's generation/gpu deployment, served by a process worker, runs the GPU jobs
    of a pipelined, distributed run (the mode a `generation_deployment` implies).

    One generation and no judge: each job is a fresh process on the worker (seconds of imports
    on a CPU), and two chain jobs and one evaluation job show every kind of dispatch.
    """
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = _env(home, PREFECT_API_URL=ui_api, COLLAPSE_CODE_DIR=str(REPO))
    for command in (
        [prefect, "work-pool", "create", "gpu", "--type", "process"],
        [prefect, "--no-prompt", "deploy", "--all"],
    ):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 (closed in finally)
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        root = tmp_path / "artifacts"
        config = make_config(tmp_path, corpus, root)
        proc = collapse(
            home,
            "run",
            str(config),
            "orchestration.generation_deployment=generation/gpu",
            "run.generations=1",
            "eval.metrics=[perplexity, entropy, oov, diversity]",
        )
        worker_log = (tmp_path / "worker.log").read_text()
        assert proc.returncode == 0, proc.stdout + proc.stderr + worker_log
        assert "generation 1: computed 6/6 stages" in proc.stdout
        corpora = output_hashes(root, "corpus/")
        assert corpora.items() <= output_hashes(reference, "corpus/").items()
        assert {Path(k).parts[0] for k in corpora} == {"gen-000", "gen-001"}
        run_id = run_dir(root).name
        ours = [
            r
            for r in _all(ui_api, "flow_runs")
            if r["parameters"].get("config", {}).get("run", {}).get("artifact_root") == str(root)
        ]
        (parent,) = [r for r in ours if r["name"] == run_id]
        jobs = sorted(r["name"] for r in ours if r["deployment_id"])
        # Each GPU job is one flow run on the pool: a generation's chain, and each evaluation
        # that needs a GPU (perplexity, from generation 1); CPU evaluations are task runs of
        # the orchestrating flow run.
        expected = [f"{run_id}-gen-0", f"{run_id}-gen-1", f"{run_id}-gen-1-eval.perplexity-"]
        # an evaluation's job name ends with its stage key's first 8 hex digits
        assert sorted(n[:-8] if "-eval." in n else n for n in jobs) == sorted(expected)
        assert all(re.fullmatch(r"[0-9a-f]{8}", n[-8:]) for n in jobs if "-eval." in n)
        for job in (r for r in ours if r["deployment_id"]):
            assert job["state_type"] == "COMPLETED"
            # a retried parent would ask again with the same key and get this run back
            assert job["idempotency_key"].startswith(f"{parent['id']}:{job['name']}:")
        cpu = {
            t["name"]
            for t in _post(
                f"{ui_api}/task_runs/filter",
                {"flow_runs": {"id": {"any_": [parent["id"]]}}, "limit": 200},
            )
        }
        assert {"eval.oov-gen-1", "eval.entropy-gen-1", "eval.diversity-gen-1"} <= cpu
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a worker slow to stop on busy cores: not under test
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()


def _all(api: str, what: str) -> list[dict]:
    """Every object of a kind from the server's REST API (paginated filter)."""
    found, offset = [], 0
    while True:
        page = _post(f"{api}/{what}/filter", {"limit": 200, "offset": offset})
        found += page
        if len(page) < 200:
            return found
        offset += 200


def test_a_judge_key_from_a_prefect_secret_reaches_only_the_judge(
    tmp_path: Path, home: Path, corpus: Path, reference: Path, ui_api: str
):
    key = "sk-test-PLANTED-secret-9876"
    save = f"from prefect.blocks.system import Secret; Secret(value={key!r}).save('judge-key')"
    env = _env(home, PREFECT_API_URL=ui_api)
    done = subprocess.run([sys.executable, "-c", save], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "artifacts"
    with JudgeServer() as server:
        proc = collapse(
            home,
            "run",
            str(make_config(tmp_path, corpus, root)),
            "eval.judge.model=test-judge",
            f"eval.judge.base_url={server.base_url}",
            "eval.judge.api_key_secret=judge-key",
            "eval.judge.api_key_env=COLLAPSE_E2E_JUDGE_KEY",
            "eval.judge.num_prompts=2",
            "eval.judge.completions_per_prompt=2",
            "eval.judge.max_new_tokens=16",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # 3 judged models (random-init baseline, gen 1, gen 2) x 2 prompts x 2 completions;
        # identical completions are asked once
        assert 0 < server.count <= 12
        assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {key}"}
    assert "grammar" in proc.stdout and "skipped" not in proc.stdout
    judged = json.loads((run_dir(root) / "gen-002" / "eval" / "judge.json").read_text())
    assert judged["graded"] == 4 and judged["failures"] == 0
    assert key not in proc.stdout + proc.stderr
    for path in root.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    # nothing the Prefect server holds about the runs mentions it: parameters, logs, artifacts
    for what in ("flow_runs", "task_runs", "logs", "artifacts"):
        assert key not in json.dumps(_all(ui_api, what)), what


def test_a_rejected_judge_key_stops_the_run_with_a_message(
    tmp_path: Path, home: Path, corpus: Path
):
    root = tmp_path / "artifacts"
    with JudgeServer(unauthorized) as server:
        proc = collapse(
            home,
            "run",
            str(make_config(tmp_path, corpus, root)),
            "eval.judge.model=test-judge",
            f"eval.judge.base_url={server.base_url}",
            "eval.judge.num_prompts=1",
            "eval.judge.completions_per_prompt=1",
            "eval.judge.max_new_tokens=8",
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Prefect logs the failed task (with its traceback); ours is the one-line explanation
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("collapse: error:")]
    assert "HTTP 401" in message and "api_key_env" in message
    # what finished before the stop is kept: generation 0's corpus and evaluations
    stages = json.loads((run_dir(root) / "gen-000" / "manifest.json").read_text())["stages"]
    assert "corpus" in stages and "eval.judge" not in stages


def test_runs_started_together_start_their_prefect_servers_one_at_a_time(
    tmp_path: Path, corpus: Path
):
    """Runs started at once over one fresh PREFECT_HOME all finish.

    Their ephemeral servers start one at a time (migrations of one SQLite database and random
    ports drawn together raced); the test holds that start lock itself first, so both runs are
    seen waiting for it, then lets them go.
    """
    home = tmp_path / "prefect-home"
    home.mkdir()
    procs, outputs = [], []
    with open(home / "server-start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for i in range(2):
            data = tiny_config_dict(corpus, tmp_path / f"artifacts-{i}", generations=1)
            data["run"]["seed"] = 100 + i  # different run ids
            data["eval"]["metrics"] = ["entropy"]  # the servers are under test, not the stages
            config = tmp_path / f"tiny-{i}.yaml"
            config.write_text(yaml.safe_dump(data))
            outputs.append(tmp_path / f"run-{i}.out")
            with open(outputs[-1], "w") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "flows.cli", "run", str(config)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=_env(home),
                        cwd=tmp_path,
                        start_new_session=True,
                    )
                )
        try:
            deadline = time.time() + 180
            while not all("waiting for another process" in p.read_text() for p in outputs):
                for proc, path in zip(procs, outputs, strict=True):
                    assert proc.poll() is None, path.read_text()
                assert not (home / "prefect.db").exists(), "a server started without the lock"
                assert time.time() < deadline, "the runs did not reach the start lock"
                time.sleep(0.5)
            assert not (home / "prefect.db").exists()  # still held: no server has started
        except BaseException:
            for proc in procs:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    try:
        codes = [proc.wait(timeout=400) for proc in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    texts = [p.read_text() for p in outputs]
    assert codes == [0, 0], "\n\n".join(texts)
    for text in texts:
        assert "generation 1: computed" in text
        assert "Application startup failed" not in text  # no migration race


def _records(root: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(generation folder, stage) -> (digest, completed_at) of every recorded stage."""
    return {
        (manifest.parent.name, name): (record["digest"], record["completed_at"])
        for manifest in sorted(run_dir(root).glob("gen-*/manifest.json"))
        for name, record in json.loads(manifest.read_text())["stages"].items()
    }


def _stages(root: Path) -> dict[tuple[str, str], tuple[str, dict[str, str]]]:
    """(generation folder, stage) -> (key, output path -> sha256) of every recorded stage.

    Equal across two runs, this says each stage was computed from the same inputs and settings
    (keys chain the content digests of what a stage reads) and wrote the same bytes.
    """
    return {
        (manifest.parent.name, name): (record["key"], record["outputs"])
        for manifest in sorted(run_dir(root).glob("gen-*/manifest.json"))
        for name, record in json.loads(manifest.read_text())["stages"].items()
    }


def test_a_pipelined_run_overlaps_evaluations_with_the_next_training_and_equals_an_unpipelined_one(
    tmp_path: Path, home: Path, corpus: Path, reference: Path, ui_api: str
):
    """A pipelined run (the default) has the same artifacts as the reference, made one
    generation after another, and the API shows its evaluations overlapping the next training.

    Generation 0's OOV is made 8 s slower, so that the overlap does not depend on the machine's
    speed; run one generation after another, it could never overlap.
    """
    root = tmp_path / "artifacts"
    config = make_config(tmp_path, corpus, root)
    proc = collapse(home, "run", str(config), delay="eval.oov:0:8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "generation 2: computed 8/8 stages" in proc.stdout
    pipelined, sequential = _stages(root), _stages(reference)
    assert len(pipelined) == 6 + 8 + 8
    assert pipelined == sequential
    run_id = run_dir(root).name
    (first,) = [
        r
        for r in _all(ui_api, "flow_runs")
        if r["name"] == run_id and r["parameters"]["config"]["run"]["artifact_root"] == str(root)
    ]
    children = _post(
        f"{ui_api}/flow_runs/filter",
        {"flow_runs": {"parent_flow_run_id": {"any_": [first["id"]]}}, "limit": 200},
    )
    subflow = {r["name"]: r["id"] for r in children}
    # a subflow run is drawn in the graph in place of its parent task run
    chain = {r["name"]: r["parent_task_run_id"] for r in children}
    tasks = {
        t["name"]: t
        for t in _post(
            f"{ui_api}/task_runs/filter",
            {"flow_runs": {"id": {"any_": [first["id"], *subflow.values()]}}, "limit": 200},
        )
    }

    def interval(name: str) -> tuple[datetime, datetime]:
        task = tasks[name]
        return datetime.fromisoformat(task["start_time"]), datetime.fromisoformat(task["end_time"])

    overlapping = []
    for gen in (0, 1):
        train_start, train_end = interval(f"train-gen-{gen + 1}")
        for name in [n for n in tasks if n.startswith("eval.") and n.endswith(f"-gen-{gen}")]:
            start, end = interval(name)
            if start < train_end and end > train_start:
                overlapping.append(name)
    assert "eval.oov-gen-0" in overlapping, tasks
    # The graph's edges: an evaluation waits for its generation's chain (the subflow run) and
    # for the same evaluation of the previous generation, and for nothing else.
    for name in ("eval.oov", "eval.perplexity", "eval.entropy"):
        waits = {i["id"] for i in tasks[f"{name}-gen-2"]["task_inputs"]["wait_for"]}
        assert waits == {chain[f"{run_id}-gen-2"], tasks[f"{name}-gen-1"]["id"]}, name
    assert {i["id"] for i in tasks["eval.oov-gen-0"]["task_inputs"]["wait_for"]} == {
        chain[f"{run_id}-gen-0"]
    }


def _store_records(store: Any) -> dict[tuple[str, str], tuple[str, str]]:
    """As `_records`, through the store (any artifact root)."""
    return {
        (store.gen_dir(gen).name, name): (record["digest"], record["completed_at"])
        for gen in store.generations_on_disk()
        for name, record in store.read_manifest(gen)["stages"].items()
    }


def _store_hashes(store: Any, prefix: str) -> dict[str, str]:
    """As `output_hashes`, through the store (any artifact root)."""
    return {
        k: v
        for gen in store.generations_on_disk()
        for record in store.read_manifest(gen)["stages"].values()
        for k, v in record["outputs"].items()
        if f"/{prefix}" in k
    }


def test_a_run_on_s3_killed_on_one_machine_resumes_on_another_and_equals_a_local_run(
    tmp_path: Path,
    home: Path,
    corpus: Path,
    reference: Path,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
):
    """Killed mid-sampling (mid-training resumes the same way: test_object_root_run.py)."""
    from collapse.lease import LEASE_ENV
    from collapse.object_store import STAGING_ENV
    from collapse.store import RunStore

    from .object_roots import make_root

    root = make_root("s3", tmp_path, s3_endpoint)
    config = str(make_config(tmp_path, corpus, tmp_path / "not-used"))
    on_s3 = f"run.artifact_root={root.root}"
    run_id = run_dir(reference).name  # the run id leaves out the artifact root
    store = RunStore(root.root, run_id)

    monkeypatch.setenv(LEASE_ENV, "5")  # machine b takes over the killed run's lease in 5 s
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "machine-a"))
    killed = collapse(home, "run", config, on_s3, fault="sample:1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    finished = _store_records(store)
    assert ("gen-000", "corpus") in finished and ("gen-001", "sample") not in finished

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "machine-b"))  # never saw the run
    resumed = collapse(home, "run", config, on_s3)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{root.root}/{run_id}" in resumed.stdout
    copy = RunStore(root.root, run_id).run_dir  # under machine-b's staging folder
    assert re.search(rf"^staging: +{re.escape(str(copy))} \(\d", resumed.stdout, re.M)
    # mid-stage state saved on machine a (a checkpoint, a finished shard) resumed on machine b
    assert "resuming sampling" in resumed.stdout + resumed.stderr
    assert not [n for n in root.stored(store) if "train-state" in n or "_progress" in n]
    after = _store_records(store)
    assert {k: after[k] for k in finished} == finished  # nothing finished was recomputed
    for prefix in ("corpus/", "model/"):
        assert _store_hashes(store, prefix) == output_hashes(reference, prefix)
    assert "report.html" in root.stored(store)
    assert not (tmp_path / "not-used").exists()
    # Machine b kept no generation's model or corpus once no stage still to run read it;
    # generation 0's files, read by every generation (the validation set here), stay.
    kept = {p.relative_to(copy).parts[:2] for p in copy.rglob("*") if p.is_file()}
    assert ("gen-000", "validation.parquet") in kept, kept
    assert not kept & {(f"gen-00{g}", d) for g in (1, 2) for d in ("model", "corpus")}, kept
    assert "staging: released generation 1's" in resumed.stderr

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "machine-c"))
    status = collapse(home, "status", run_id, "--root", root.root)
    assert status.returncode == 0, status.stderr
    assert "gen   2  train:done  sample:done  eval.perplexity:done" in status.stdout
    listed = collapse(home, "status", "--root", root.root)
    assert listed.stdout.strip() == f"{run_id}  generations on disk: 3"
    report = collapse(home, "report", f"{root.root}/{run_id}")
    assert report.returncode == 0, report.stderr
    fetched = [p for p in (tmp_path / "machine-c").rglob("*") if p.is_file()]
    assert not [p for p in fetched if "/model/" in str(p) or "/corpus/" in str(p)]
