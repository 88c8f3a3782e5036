"""Sweeps: expansion of a sweep file into arms, its errors, the numbers that compare groups over
seeds, and (slow) `collapse sweep` / `status --sweep` / `report --sweep` end to end."""

from __future__ import annotations

import contextlib
import fcntl
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

from collapse.config import config_to_dict, load_config, run_id_for, validate_config
from collapse.context import Context
from collapse.evals import evaluation, registry
from collapse.pipeline import run_stage, stages_of
from collapse.stages import chain_stage
from collapse.store import RunStore
from collapse.sweep import SweepError, is_sweep_file, load_sweep
from collapse.sweep_report import (
    draw_evaluation,
    generations_done,
    group_table,
    groups_of,
    read_tables,
)
from collapse.sweep_stats import (
    Spread,
    band,
    curve,
    first_exceeding,
    spread,
    summarize,
    trapezoid_area,
)
from flows.sweep import SweepFailed, SweepFailedByUser, sweep_failure

from .conftest import EARLIER_DEFAULTS, REPO, mark_started, tiny_config_dict, write_story_file

GRID = {"train.objective": ["mle", "mixce"], "run.seed": [1, 2]}


def _base(tmp_path: Path, **changes: dict) -> Path:
    """A tiny one-generation base config beside a `sweeps/` folder."""
    data = tiny_config_dict(write_story_file(tmp_path / "stories.txt"), tmp_path / "artifacts", 1)
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _sweep(tmp_path: Path, **fields) -> Path:
    """A sweep file in tmp/sweeps/ whose base is ../tiny.yaml (relative to the sweep file)."""
    if not (tmp_path / "tiny.yaml").exists():
        _base(tmp_path)
    data = {"name": "demo", "base": "../tiny.yaml", **fields}
    path = tmp_path / "sweeps" / "demo.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- expansion -------------------------------------------------------------------------------


def test_a_grid_is_the_cartesian_product_and_seeds_make_groups(tmp_path: Path):
    path = _sweep(tmp_path, overrides=["run.generations=3"], grid=GRID, max_concurrent=2)
    sweep = load_sweep(path)
    assert [a.label for a in sweep.arms] == [
        "objective=mle,seed=1",
        "objective=mle,seed=2",
        "objective=mixce,seed=1",
        "objective=mixce,seed=2",
    ]
    assert {g: [a.seed for a in arms] for g, arms in sweep.groups.items()} == {
        "objective=mle": [1, 2],
        "objective=mixce": [1, 2],
    }
    assert sweep.spec.max_concurrent == 2 and len(sweep.runs) == 4
    for arm in sweep.arms:
        # each arm is exactly the run `collapse run BASE OVERRIDES...` would make
        same = load_config(tmp_path / "tiny.yaml", ["run.generations=3", *arm.overrides])
        assert arm.config == same and arm.run_id == run_id_for(same)
        assert arm.config.run.generations == 3
    assert len({a.run_id for a in sweep.arms}) == 4
    assert sweep.report_dir == tmp_path / "artifacts" / "reports" / "sweep-demo"


def test_named_arms_each_run_the_whole_grid(tmp_path: Path):
    arms = [
        {"name": "mle"},
        {"name": "mixce", "overrides": {"train.objective": "mixce", "train.eta": 0.25}},
    ]
    sweep = load_sweep(_sweep(tmp_path, arms=arms, grid={"run.seed": [1, 2]}))
    assert [a.label for a in sweep.arms] == [
        "mle,seed=1",
        "mle,seed=2",
        "mixce,seed=1",
        "mixce,seed=2",
    ]
    assert list(sweep.groups) == ["mle", "mixce"]
    mixce = sweep.groups["mixce"][0].config.train
    assert (mixce.objective, mixce.eta) == ("mixce", 0.25)


def test_arms_with_equal_configs_are_one_run(tmp_path: Path):
    arms = [{"name": "paper"}, {"name": "mle", "overrides": {"train.objective": "mle"}}]
    sweep = load_sweep(_sweep(tmp_path, arms=arms))
    assert len(sweep.arms) == 2 and len(sweep.runs) == 1
    assert sweep.arms[0].run_id == sweep.arms[1].run_id
    assert sweep.labels_of(sweep.runs[0]) == ["paper", "mle"]
    # without a seed axis, each arm is a group of one seed
    assert list(sweep.groups) == ["paper", "mle"]


def test_one_arm_started_under_the_earlier_defaults_puts_every_new_arm_under_them(tmp_path):
    path = _sweep(tmp_path, grid=GRID)
    fresh = load_sweep(path)
    assert fresh.notes == ()
    assert {(a.config.model.implementation, a.config.sample.rng) for a in fresh.arms} == {
        ("fast", "story")
    }
    started = load_config(tmp_path / "tiny.yaml", ["run.seed=2", *EARLIER_DEFAULTS])
    mark_started(started)
    sweep = load_sweep(path)
    assert sweep.arms[1].run_id == run_id_for(started)
    # the others too, so that the arms differ only in what the sweep says
    assert {(a.config.model.implementation, a.config.sample.rng) for a in sweep.arms} == {
        ("transformers", "shard")
    }
    assert sweep.notes == (
        "sweep demo: arms objective=mle,seed=2 were started before today's defaults: every arm "
        "runs as started (model.implementation=transformers, sample.rng=shard, "
        "sample.precision=fp32); to use today's defaults instead, set "
        "model.implementation=fast sample.rng=story sample.precision=auto",
    )


def test_a_bad_value_in_one_arm_names_that_arm_and_every_problem_comes_at_once(tmp_path: Path):
    arms = [{"name": "ok"}, {"name": "typo", "overrides": {"train.lrr": 1}}]
    path = _sweep(tmp_path, arms=arms, grid={"train.objective": ["mle", "nope"]})
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    problems = info.value.problems
    text = "\n".join(problems)
    assert "arms typo,objective=mle; typo,objective=nope: train.lrr: unknown key" in text
    (bad,) = [p for p in problems if "train.objective" in p]
    # the same problem in two arms is one line naming both, and no other arm
    assert bad.startswith("arms ok,objective=nope; typo,objective=nope: train.objective:")
    assert "'nope'" in bad


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"grid": GRID, "colour": "blue"}, "colour: unknown key"),
        ({"grid": {}}, "a sweep needs a non-empty `grid` or `arms`"),
        ({}, "a sweep needs a non-empty `grid` or `arms`"),
        ({"grid": {"run.seed": []}}, "grid.run.seed: an axis needs at least one value"),
        ({"grid": {"run.seed": [1, 2, 1]}}, "grid.run.seed: lists a value twice: [1, 2, 1]"),
        ({"grid": GRID, "max_concurrent": 0}, "max_concurrent: Input should be greater than 0"),
        ({"arms": [{"name": "a"}, {"name": "a"}]}, "names must be unique, ['a']"),
        ({"arms": [{"name": "a", "colour": 1}]}, "arms.0.colour: unknown key"),
        (
            {"arms": [{"name": "a", "overrides": {"run.seed": 3}}], "grid": {"run.seed": [1]}},
            "arms.a: ['run.seed'] are also grid axes",
        ),
        ({"base": "../missing.yaml", "grid": GRID}, "base: '../missing.yaml' does not exist"),
        (
            {"grid": {"run.generations": [1, 2]}},
            "are one run (tiny-",  # generations stay out of the run id
        ),
        (
            {"grid": {"run.artifact_root": ["a", "b"]}},
            "run.artifact_root must be the same for every arm",
        ),
    ],
)
def test_sweep_file_errors(tmp_path: Path, fields: dict, expected: str):
    with pytest.raises(SweepError) as info:
        load_sweep(_sweep(tmp_path, **fields))
    assert expected in str(info.value), info.value


def test_sweep_files_that_cannot_be_read(tmp_path: Path):
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(SweepError, match="must hold a mapping"):
        load_sweep(listed)
    config = _base(tmp_path)
    with pytest.raises(SweepError, match="looks like a config, not a sweep"):
        load_sweep(config)
    assert is_sweep_file(_sweep(tmp_path, grid=GRID)) and not is_sweep_file(config)


def test_missing_input_files_are_reported_before_a_run_starts(tmp_path: Path):
    _base(tmp_path, corpus={"path": str(tmp_path / "gone.txt")})
    path = _sweep(tmp_path, grid={"run.seed": [1, 2]})
    with pytest.raises(SweepError, match=r"every arm \(2\): corpus.path .* does not exist"):
        load_sweep(path)
    assert len(load_sweep(path, check_inputs=False).arms) == 2  # status and report still work


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(cwd / "prefect-home"))
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_the_cli_rejects_bad_sweeps_with_exit_2_and_writes_nothing(tmp_path: Path):
    bad = _sweep(tmp_path, grid={"train.objective": ["nope"]})
    for args in (
        ["sweep", str(bad)],
        ["status", "--sweep", str(bad)],
        ["report", "--sweep", str(bad)],
    ):
        proc = _cli(tmp_path, *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("collapse: error: invalid sweep")
        assert "arm objective=nope: train.objective" in proc.stderr
        assert "Traceback" not in proc.stderr
    good = _sweep(tmp_path, grid=GRID)
    mixed = _cli(tmp_path, "run", str(good))
    assert mixed.returncode == 2 and "is a sweep file: run it with `collapse sweep" in mixed.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "prefect-home").exists()


def test_the_readme_sweep_example_is_a_valid_sweep(tmp_path: Path):
    readme = (REPO / "README.md").read_text()
    start = readme.index("name: objectives")
    example = readme[start : readme.index("```", start)]
    (tmp_path / "demo.yaml").write_text((REPO / "configs" / "demo.yaml").read_text())
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "objectives.yaml").write_text(example)
    sweep = load_sweep(tmp_path / "sweeps" / "objectives.yaml")
    assert list(sweep.groups) == ["mle", "mixce", "tailr"] and len(sweep.runs) == 9


# --- aggregation over seeds ------------------------------------------------------------------


def _table(**columns: list[float | None]) -> list[dict]:
    """Rows for generations 0..n from per-column value lists."""
    n = len(next(iter(columns.values())))
    return [{"generation": g, **{k: v[g] for k, v in columns.items()}} for g in range(n)]


def test_spread_is_mean_and_range_of_the_seeds_that_have_a_value():
    assert spread([1, 2, None, 3]) == Spread(2.0, 1.0, 3.0, 3, 4)
    assert spread([None, None]) is None
    assert spread([4.0, 2.0]).format(".1f") == "3.0 [2.0-4.0]"
    assert spread([1, 2, None, 3]).format(".2f") == "2.00 [1.00-3.00] (3/4 seeds)"
    assert spread([5.0]).format(".3f") == "5.000"
    assert spread([3, 4]).format("d") == "3.5 [3-4]"  # whole bounds, the mean as it is
    assert spread([3, 3]).format("d") == "3 [3-3]"


def test_first_generation_that_doubles_perplexity():
    assert first_exceeding({1: 10.0, 2: 19.0, 3: 20.0, 4: 20.5, 5: 40.0}) == 4  # > 2x, not =
    assert first_exceeding({1: 10.0, 2: 12.0}) is None  # never
    assert first_exceeding({2: 10.0, 3: 50.0}) is None  # no generation 1 to compare with
    assert first_exceeding({1: 10.0, 2: 5.0, 3: 31.0}, factor=3.0) == 3


def test_area_under_the_curve_is_the_trapezoid_over_generations_1_to_n():
    values = {0: 999.0, 1: 10.0, 2: 20.0, 3: 40.0}  # generation 0 (the human corpus) is left out
    assert trapezoid_area(values, 1, 3) == (10 + 20) / 2 + (20 + 40) / 2
    assert trapezoid_area(values, 1, 2) == 15.0
    assert trapezoid_area({1: 10.0, 3: 40.0}, 1, 3) is None  # a missing generation
    assert trapezoid_area({1: 10.0}, 1, 1) is None  # no curve


def test_band_and_summary_of_a_group_with_known_answers():
    # seed A doubles at generation 3, seed B at 2; seed C is unfinished (no generation 3)
    a = _table(ppl=[None, 10.0, 15.0, 25.0], ent=[9.0, 8.0, 7.0, 6.0])
    b = _table(ppl=[None, 10.0, 21.0, 30.0], ent=[9.0, 8.0, 6.0, 4.0])
    c = _table(ppl=[None, 12.0, 13.0, None], ent=[9.0, 8.5, 8.0, None])
    assert curve(a, "ppl") == {1: 10.0, 2: 15.0, 3: 25.0}
    assert band([a, b], "ppl") == [
        (1, Spread(10.0, 10.0, 10.0, 2, 2)),
        (2, Spread(18.0, 15.0, 21.0, 2, 2)),
        (3, Spread(27.5, 25.0, 30.0, 2, 2)),
    ]
    summary = summarize([a, b, c], ["ent", "ppl"], "ppl", last=3)
    assert summary.seeds == 3
    assert summary.doubling == Spread(2.5, 2.0, 3.0, 2, 3)  # C never doubles
    assert summary.not_doubled == 0  # C is unfinished: no telling whether it will
    # a seed that reached N without doubling is said so, not shown as one lacking the values
    d = _table(ppl=[None, 10.0, 12.0, 14.0], ent=[9.0, 8.0, 7.0, 6.0])
    assert summarize([a, d], ["ppl"], "ppl", last=3).not_doubled == 1
    from collapse.sweep_report import _doubling_cell

    assert _doubling_cell(summarize([a, d], ["ppl"], "ppl", last=3), 3) == (
        "3 (1/2 seeds); 1/2 seeds not by generation 3"
    )
    assert _doubling_cell(summarize([d], ["ppl"], "ppl", last=3), 3) == (
        "1/1 seeds not by generation 3"
    )
    # areas: A (10+15)/2 + (15+25)/2 = 32.5, B (10+21)/2 + (21+30)/2 = 41; C incomplete
    assert summary.perplexity_area == Spread(36.75, 32.5, 41.0, 2, 3)
    assert summary.last == {
        "ent": Spread(5.0, 4.0, 6.0, 2, 3),
        "ppl": Spread(27.5, 25.0, 30.0, 2, 3),
    }
    assert summarize([a], ["ent"], None, last=3).doubling is None  # perplexity not evaluated
    assert summary.last_at == {"ent": 3, "ppl": 3}
    # a column of an evaluation that does not run on N (the paper judges 1, 6, ..., 36 of 40)
    # is read where it is told, not left empty at N
    judged = _table(ppl=[None, 10.0, 15.0, 25.0, 30.0], score=[5.0, 7.0, None, 6.0, None])
    other = _table(ppl=[None, 10.0, 15.0, 25.0, 30.0], score=[5.0, 8.0, None, 4.0, None])
    summary = summarize([judged, other], ["score", "ppl"], None, last=4, read_at={"score": 3})
    assert summary.last_at == {"score": 3, "ppl": 4}
    assert summary.last["score"] == Spread(5.0, 4.0, 6.0, 2, 2)


# validation perplexity of generations 1 and 2 per (objective, seed)
PPL = {("mle", 1): [10.0, 26.0], ("mle", 2): [30.0, 50.0], ("mixce", 1): [10.0, 14.0]}
PPL[("mixce", 2)] = [30.0, 36.0]


def test_the_group_table_and_figures_from_hand_made_tables(tmp_path: Path):
    _base(tmp_path, eval={"metrics": ["perplexity", "entropy"]}, run={"generations": 2})
    sweep = load_sweep(_sweep(tmp_path, grid=GRID))
    tables = {}
    for arm in sweep.arms:
        ppl = [None, *PPL[(arm.config.train.objective, arm.seed)]]
        tables[arm.run_dir.resolve()] = [
            {
                "generation": gen,
                "perplexity": ppl[gen],
                "entropy_bits": 9.0 - gen - arm.seed,
                "distinct_tokens": 99 + arm.seed,
                "finished_fraction": None,  # e.g. an invalid record: no value
                "mean_length": 50.0,
                "stages_done": 1,
                "stages_total": 1,
            }
            for gen in range(3)
        ]
    groups = groups_of(sweep, tables)
    headers, rows = group_table(groups)
    assert headers == ["", "objective=mle", "objective=mixce"]
    cells = {row[0]: row[1:] for row in rows}
    assert cells["seeds"] == ["2 (1, 2)", "2 (1, 2)"]
    assert cells["last generation N"] == ["2", "2"]
    # mle seed 1: 26 > 2 x 10 at generation 2; seed 2: 50 <= 60; mixce never doubles
    assert cells["first generation with perplexity > 2x generation 1's"] == [
        "2 (1/2 seeds); 1/2 seeds not by generation 2",
        "2/2 seeds not by generation 2",
    ]
    # areas: mle (10+26)/2 = 18, (30+50)/2 = 40; mixce (10+14)/2 = 12, (30+36)/2 = 33
    assert cells["area under the perplexity curve, generations 1..N"] == [
        "29.0 [18.0-40.0]",
        "22.5 [12.0-33.0]",
    ]
    assert cells["perplexity at generation N"] == [
        "38.000 [26.000-50.000]",
        "25.000 [14.000-36.000]",
    ]
    assert cells["entropy at generation N"] == ["5.500 [5.000-6.000]"] * 2
    assert cells["distinct at generation N"] == ["100.5 [100-101]"] * 2
    assert cells["EOS-ended at generation N"] == ["-", "-"]
    figures = {name: draw_evaluation(entry, groups) for name, entry in registry().items()}
    assert figures["perplexity"].startswith(b"\x89PNG")
    assert figures["entropy"].startswith(b"\x89PNG")
    assert figures["diversity"] is None  # not evaluated: no figure


def test_a_run_that_has_not_started_has_an_empty_table(tmp_path: Path):
    sweep = load_sweep(_sweep(tmp_path, grid=GRID))
    tables = read_tables(sweep)
    assert len(tables) == 4
    table = next(iter(tables.values()))
    assert [row["generation"] for row in table] == [0, 1]
    assert all(row["perplexity"] is None and row["stages_done"] == 0 for row in table)
    assert generations_done(table) == 0


def test_a_sweep_fails_with_exit_2_only_when_every_failure_is_the_users():
    done = {"label": "a", "run_id": "r1", "status": "done", "computed": 0, "stages": 4}
    in_use = {"label": "b", "run_id": "r2", "status": "failed", "user_error": True, "message": "x"}
    killed = {**in_use, "label": "c", "run_id": "r3", "user_error": False}
    assert sweep_failure([done]) is None
    assert type(sweep_failure([done, in_use])) is SweepFailedByUser
    assert type(sweep_failure([done, in_use, killed])) is SweepFailed
    assert "arm c: x" in str(sweep_failure([done, killed]))


# --- end to end through the CLI and Prefect (slow) -------------------------------------------


def _manifest_times(sweep) -> dict[tuple[str, str, str], str]:
    """(run id, generation folder, stage) -> completed_at of every recorded stage."""
    times = {}
    for arm in sweep.runs:
        for manifest in sorted(arm.run_dir.glob("gen-*/manifest.json")):
            for stage, record in json.loads(manifest.read_text())["stages"].items():
                times[(arm.run_id, manifest.parent.name, stage)] = record["completed_at"]
    return times


def _stat(pid: int) -> list[str]:
    """Fields 3.. of /proc/PID/stat (state, parent id, ...); [] when there is no such process."""
    try:
        # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    state = _stat(pid)
    return bool(state) and state[0] != "Z"  # a zombie has ended, only its exit code is left


def _arm_processes(sweep_pid: int) -> set[int]:
    """The live arm processes (multiprocessing spawn children) of the sweep process."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        state = _stat(pid)
        if state and state[0] != "Z" and int(state[1]) == sweep_pid:
            with contextlib.suppress(OSError):
                if b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.add(pid)
    return found


@pytest.mark.slow
def test_a_sweep_end_to_end_kill_9_resume_status_and_report(tmp_path: Path):
    """Two objectives x two seeds through `collapse sweep`, two at a time: killed mid-sweep
    (each arm's process SIGKILLed after its first sampled shard, one run held by another
    process), rerun (resumes, recomputes nothing finished), status and report, then the sweep
    process itself killed with its arms' processes running: they die with it."""
    from .test_e2e import collapse

    home = tmp_path / "prefect-home"
    home.mkdir()
    # two shards per corpus, so a kill after the first leaves sampling half done
    sample = {"num_sequences": 40, "batch_size": 20, "shard_size": 20}
    _base(tmp_path, sample=sample, eval={"metrics": ["perplexity", "entropy"]})
    path = _sweep(tmp_path, grid=GRID, max_concurrent=2)
    sweep = load_sweep(path)
    held, *others = sweep.arms

    held.run_dir.mkdir(parents=True)
    with open(held.run_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a `collapse run` of the same run would
        killed = collapse(home, "sweep", str(path), fault="sample:1")
    assert killed.returncode == 1, killed.stdout + killed.stderr
    errors = [line for line in killed.stderr.splitlines() if line.startswith("collapse: error:")]
    assert errors[0] == (
        f"collapse: error: arm {held.label} (run {held.run_id}): run {held.run_id} is in use by "
        f"another process (lock: {held.run_dir / '.lock'})"
    )
    assert errors[1:] == [
        f"collapse: error: arm {a.label} (run {a.run_id}): its process was killed by SIGKILL"
        for a in others
    ]
    assert "Traceback" not in killed.stderr
    for arm in others:  # killed mid-sampling, after training
        assert (arm.run_dir / "gen-001" / "corpus" / "_progress.json").is_file()
    finished = _manifest_times(sweep)
    assert {(run, gen, stage) for run, gen, stage in finished if gen == "gen-001"} == {
        (a.run_id, "gen-001", "train") for a in others
    }

    resumed = collapse(home, "sweep", str(path))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    # the held run never started: its generation 0 is taken from the arm with its seed (same
    # keys: orchestration.share_across_runs), the rest computed
    assert f"arm {held.label} (run {held.run_id}): computed 4 of 6 stages" in out
    gen0 = json.loads((held.run_dir / "gen-000" / "manifest.json").read_text())["stages"]
    assert all("copied_from" in record for record in gen0.values())
    for arm in others:  # sample and two evaluations; generation 0 and training were kept
        assert f"arm {arm.label} (run {arm.run_id}): computed 3 of 6 stages" in out
    assert (resumed.stdout + resumed.stderr).count("resuming sampling") == 3
    after = _manifest_times(sweep)
    assert {key: after[key] for key in finished} == finished  # nothing finished was redone
    for arm in sweep.arms:
        assert re.search(rf"^{re.escape(arm.label)} +{arm.run_id} +1/1 +\d+\.\d{{3}} ", out, re.M)

    page = sweep.report_dir / "report.html"
    assert f"report: {page.resolve()}" in out
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 2  # perplexity and entropy
    assert "objective=mle</th><th>objective=mixce" in text and "2 (1, 2)" in text
    for name in ("perplexity", "entropy"):
        assert (sweep.report_dir / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")

    status = collapse(home, "status", "--sweep", str(path))
    assert status.returncode == 0, status.stderr
    for arm in sweep.arms:
        assert f"arm {arm.label}  run {arm.run_id}  ({arm.run_dir.resolve()})" in status.stdout
    progress = "gen   1  train:done  sample:done  eval.perplexity:done  eval.entropy:done"
    assert status.stdout.count(progress) == 4
    page.unlink()
    report = collapse(home, "report", "--sweep", str(path))
    assert report.returncode == 0 and f"report: {page.resolve()}" in report.stdout
    assert page.is_file()

    # Same config alone in another folder: the arm's corpus, sampled beside another arm and
    # resumed after kill -9, is byte for byte the one a run alone samples (the library's chain,
    # in this process: a `collapse run` would add only the Prefect wiring, tested elsewhere).
    arm = others[0]
    data = config_to_dict(arm.config)
    data["run"]["artifact_root"] = str(tmp_path / "alone")
    alone = Context(validate_config(data), RunStore(tmp_path / "alone", arm.run_id), lambda _: None)
    for gen in (0, 1):
        for stage in (s for s in stages_of(alone, gen) if chain_stage(s) is not None):
            run_stage(alone, gen, stage)
    ours = json.loads((arm.run_dir / "gen-001/manifest.json").read_text())["stages"]["sample"]
    assert ours["digest"] == alone.store.read_record(1, "sample")["digest"]

    # kill -9 of the sweep process itself while its arms' processes run: they die with it
    path = _sweep(tmp_path, overrides=["run.generations=3"], grid=GRID, max_concurrent=2)
    assert _arms_die_with_a_killed_sweep(home, path)


def _arms_die_with_a_killed_sweep(home: Path, path: Path) -> bool:
    """Start `collapse sweep PATH`, SIGKILL it once its arms compute generation 2 (each has
    generations 2 and 3 left, seconds of work), and whether every arm process is gone within
    4 s (their watchdogs look once a second)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("COLLAPSE_FAULT", None)
    log = home / "killed.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "sweep", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 180
        while "-gen-2' for flow 'generation'" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "no arm reached generation 2"
            time.sleep(0.2)
        arms = _arm_processes(proc.pid)
        assert arms, "no arm process found"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 4
        while any(_alive(p) for p in arms):
            if time.time() > deadline:
                return False
            time.sleep(0.1)
        return True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_random_init_baseline_is_drawn_as_a_line_not_as_generation_0_of_the_curve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from matplotlib.axes import Axes

    _base(tmp_path, eval={"metrics": ["perplexity", "judge"]}, run={"generations": 2})
    sweep = load_sweep(_sweep(tmp_path, grid={"run.seed": [1, 2]}))
    keys = [c.key for c in evaluation("judge").columns_for(sweep.arms[0].config)]
    tables = {
        arm.run_dir.resolve(): [
            {"generation": g, **dict.fromkeys(keys, [2.0, 7.0, 5.0][g] + arm.seed)}
            for g in range(3)
        ]
        for arm in sweep.arms
    }
    lines: list[float] = []
    curves: list[list[float]] = []
    plot, axhline = Axes.plot, Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda ax, y, **kw: lines.append(y) or axhline(ax, y))
    monkeypatch.setattr(
        Axes, "plot", lambda ax, x, *a, **kw: curves.append(x) or plot(ax, x, *a, **kw)
    )
    png = draw_evaluation(evaluation("judge"), groups_of(sweep, tables))
    assert png is not None and png.startswith(b"\x89PNG")
    assert lines == [3.5] * len(keys)  # the seeds' mean at generation 0, once per panel
    assert curves == [[1, 2]] * len(keys)


def test_the_group_table_reads_the_judge_at_its_last_judged_generation_not_at_n(tmp_path: Path):
    _base(
        tmp_path,
        eval={"metrics": ["perplexity", "judge"], "judge": {"generations": [1]}},
        run={"generations": 2},
    )
    sweep = load_sweep(_sweep(tmp_path, grid={"run.seed": [1, 2]}))
    keys = [c.key for c in evaluation("judge").columns_for(sweep.arms[0].config)]
    tables = {
        arm.run_dir.resolve(): [
            {"generation": 0, "perplexity": None, **dict.fromkeys(keys, 2.0)},
            {"generation": 1, "perplexity": 10.0, **dict.fromkeys(keys, 6.0 + arm.seed)},
            {"generation": 2, "perplexity": None, **dict.fromkeys(keys)},  # not judged
        ]
        for arm in sweep.arms
    }
    cells = {row[0]: row[1] for row in group_table(groups_of(sweep, tables))[1]}
    assert cells["grammar at generation N"] == "7.50 [7.00-8.00] (generation 1)"
    assert cells["perplexity at generation N"] == "-"  # runs on N, no value there: empty
