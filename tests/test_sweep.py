"""Sweeps: expansion of a sweep file into arms, its errors, the numbers that compare groups over
seeds, and (slow) `collapse sweep` / `status --sweep` / `report --sweep` end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from collapse.config import load_config, run_id_for
from collapse.sweep import SweepError, is_sweep_file, load_sweep

from .conftest import tiny_config_dict, write_story_file

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
