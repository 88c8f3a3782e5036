"""Sweep files: a base config, shared overrides, and arms (named overrides x a grid) -> runs.

A sweep is a YAML file (`SweepFile`, unknown keys are errors) that expands into one validated
config per arm, each run exactly as `collapse run BASE OVERRIDES...` would run it: its run id is
`run_id_for(config)`, so arms whose configs are equal are one run (run once), a sweep reuses the
runs that exist already, and an arm can be resumed or inspected with the single-run commands.

`run.seed` is an axis like any other; the arms that differ only in it are the replicates of one
*group* (the arm label without the seed), which status and the comparison report summarise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collapse import yaml_strict
from collapse.config import (
    Config,
    config_to_dict,
    run_id_for,
)
from collapse.errors import UserError, cause_text
from collapse.sections import PositiveInt
from collapse.started import (
    config_to_run,
    earlier_defaults_note,
    started_with,
    under_earlier_defaults,
    unset_changed_defaults,
)
from collapse.store import RunStore, canonical_root, child_root

SEED_KEY = "run.seed"
# Keys a sweep file has and a config never has: how a sweep file is told from a config.
_SWEEP_ONLY_KEYS = {"base", "grid", "arms", "max_concurrent"}


class SweepError(UserError):
    """A sweep file that cannot be used; `problems` holds one line each, arms named."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = problems
        super().__init__(f"invalid sweep {path}:\n" + "\n".join(f"  - {p}" for p in problems))


class ArmSpec(BaseModel):
    """A named arm: overrides of dotted config keys (values as YAML gives them)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", description="Label of the arm.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted.key: value, applied after the shared overrides."
    )


class SweepFile(BaseModel):
    """The schema of a sweep file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Names the sweep's flow run and its report folder (reports/sweep-<name>).",
    )
    base: str = Field(description="The base config, relative to the sweep file.")
    overrides: list[str] = Field(
        default_factory=list, description="key.sub=value strings applied to every arm first."
    )
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="dotted.key: [values]; every combination (the cartesian product) is an arm.",
    )
    arms: list[ArmSpec] = Field(
        default_factory=list, description="Named arms; with a grid, each arm runs every point."
    )
    max_concurrent: PositiveInt = Field(1, description="Arms running at once.")

    @model_validator(mode="after")
    def _has_arms(self) -> SweepFile:
        if not self.grid and not self.arms:
            raise ValueError("a sweep needs a non-empty `grid` or `arms` (it has neither)")
        names = [arm.name for arm in self.arms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"arms: names must be unique, {twice} appear more than once")
        for key, values in self.grid.items():
            texts = [json.dumps(v, sort_keys=True) for v in values]
            if len(set(texts)) < len(texts):
                raise ValueError(f"grid.{key}: lists a value twice: {values}")
        for arm in self.arms:
            both = sorted(set(arm.overrides) & set(self.grid))
            if both:
                raise ValueError(f"arms.{arm.name}: {both} are also grid axes (the grid would win)")
        return self


@dataclass(frozen=True)
class Arm:
    """One arm of a sweep: its label, its group (the label without the seed) and its config."""

    label: str
    group: str
    overrides: tuple[str, ...]  # what the arm adds to the base config, as `key=value`
    config: Config

    @property
    def run_id(self) -> str:
        """The run folder name (`run_id_for(config)`)."""
        return run_id_for(self.config)

    @property
    def store(self) -> RunStore:
        """The arm's run store."""
        return RunStore(self.config.run.artifact_root, self.run_id)

    @property
    def run_dir(self) -> Path:
        """The arm's run folder (its staging copy under a URL root)."""
        return self.store.run_dir

    @property
    def seed(self) -> int:
        """The arm's `run.seed`."""
        return self.config.run.seed


@dataclass(frozen=True)
class Sweep:
    """An expanded, validated sweep."""

    path: Path
    spec: SweepFile
    base: Path
    arms: tuple[Arm, ...]
    notes: tuple[str, ...] = ()  # what to tell the user before running it

    @property
    def name(self) -> str:
        """The sweep's name."""
        return self.spec.name

    @property
    def runs(self) -> list[Arm]:
        """One arm per distinct run folder (arms with equal configs are one run), in order."""
        seen: dict[Path, Arm] = {}
        for arm in self.arms:
            seen.setdefault(arm.run_dir.resolve(), arm)
        return list(seen.values())

    def labels_of(self, run: Arm) -> list[str]:
        """The labels of every arm that is the run `run`."""
        return [a.label for a in self.arms if a.run_dir.resolve() == run.run_dir.resolve()]

    @property
    def groups(self) -> dict[str, list[Arm]]:
        """Arms by group label (replicates over `run.seed`), in order of first appearance."""
        found: dict[str, list[Arm]] = {}
        for arm in self.arms:
            found.setdefault(arm.group, []).append(arm)
        return found

    @property
    def report_store(self) -> RunStore:
        """The comparison report's folder as a store (see `sweep_report_store`)."""
        return sweep_report_store(self.arms[0].config.run.artifact_root, self.name)

    @property
    def report_dir(self) -> Path:
        """Where the comparison report is written (under a URL root: the staging copy)."""
        return self.report_store.run_dir


def sweep_report_store(artifact_root: str, name: str) -> RunStore:
    """The folder of sweep `name`'s comparison report, `<artifact_root>/reports/sweep-<name>`,
    as a store: its lock is the sweep's, and under a URL root the report is uploaded through it.
    """
    return RunStore(child_root(artifact_root, "reports"), f"sweep-{name}")


def is_sweep_file(path: str | Path) -> bool:
    """Whether `path` holds a sweep (a mapping with `base`, `grid` or `arms`), not a config."""
    try:
        data = yaml_strict.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # not a sweep: loading it as a config says what is wrong
    return isinstance(data, dict) and bool(_SWEEP_ONLY_KEYS & set(data))


def _override(key: str, value: Any) -> str:
    # JSON is YAML, so `apply_overrides` parses the value back to exactly this one.
    return f"{key}={json.dumps(value)}"


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each grid key's label name: its last part, or the whole key where that is ambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _differences(a: Config, b: Config) -> list[str]:
    fa, fb = _flat(config_to_dict(a)), _flat(config_to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def _load_arm(
    base: Path, overrides: list[str], check_inputs: bool
) -> tuple[Config | None, list[str], bool]:
    """An arm's config, or its problems (as `collapse run` reports them, `config_to_run`), and
    whether it is a run started under earlier defaults (`collapse.started`)."""
    config, problems, note = config_to_run(base, overrides, check_inputs=check_inputs)
    return config, problems, note is not None


def _arm_points(spec: SweepFile) -> list[tuple[str, str, list[str]]]:
    """(label, group, overrides) of every arm: each named arm (or none) x each grid point.

    A label is the arm's name and its grid values (`objective=mixce,seed=2`); its group is the
    same without the `run.seed` value, or the sweep's name when nothing else is left.
    """
    named = [(a.name, [_override(k, v) for k, v in a.overrides.items()]) for a in spec.arms]
    short = _short_names(list(spec.grid))
    points = [
        dict(zip(spec.grid, values, strict=True))
        for values in itertools.product(*spec.grid.values())
    ]
    arms = []
    for name, overrides in named or [(None, [])]:
        for point in points:
            head = [name] if name else []
            parts = [(k, f"{short[k]}={_value_text(v)}") for k, v in point.items()]
            label = ",".join(head + [p for _, p in parts]) or spec.name
            group = ",".join(head + [p for k, p in parts if k != SEED_KEY]) or spec.name
            arms.append((label, group, overrides + [_override(k, v) for k, v in point.items()]))
    return arms


def load_sweep(path: str | Path, *, check_inputs: bool = True) -> Sweep:
    """Read a sweep file and expand it into validated arms.

    Args:
        path: the sweep YAML.
        check_inputs: also report input files (e.g. `corpus.path`) that do not exist, for arms
            whose run has not started (as `collapse run` does).

    Returns:
        The sweep, one `Arm` per arm (equal configs stay separate arms of one run).

    Raises:
        SweepError: every problem of the file and of every arm at once, arms named.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(path, [f"sweep file {str(path)!r} does not exist"])
    try:
        data = yaml_strict.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(path, [f"not valid YAML: {exc}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(path, [f"cannot be read as text ({cause_text(exc)})"]) from None
    if not isinstance(data, dict):
        raise SweepError(path, ["must hold a mapping (name, base, grid and/or arms, ...)"])
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as exc:
        problems = [_format(e) for e in exc.errors()]
        if {"run", "model", "train"} & set(data):
            problems.append("this looks like a config, not a sweep: run it with `collapse run`")
        raise SweepError(path, problems) from None
    base = (path.parent / spec.base).resolve()
    if not base.is_file():
        raise SweepError(path, [f"base: {spec.base!r} does not exist (looked for {base})"])

    arms: list[Arm] = []
    by_problem: dict[str, list[str]] = {}
    points = _arm_points(spec)
    resumed_earlier = []
    for label, group, overrides in points:
        config, problems, earlier = _load_arm(base, [*spec.overrides, *overrides], check_inputs)
        for problem in problems:
            by_problem.setdefault(problem, []).append(label)
        if config is not None:
            arms.append(Arm(label, group, tuple(overrides), config))
        if earlier:
            resumed_earlier.append(label)
    problems = [_arm_problem(names, problem, len(points)) for problem, names in by_problem.items()]
    notes: tuple[str, ...] = ()
    if resumed_earlier and not problems:
        arms, notes = _under_earlier_defaults(spec.name, arms, resumed_earlier)
    problems += _shared_run_problems(arms)
    if problems:
        raise SweepError(path, problems)
    return Sweep(path, spec, base, tuple(arms), notes)


def _under_earlier_defaults(
    name: str, arms: list[Arm], resumed: list[str]
) -> tuple[list[Arm], tuple[str, ...]]:
    """Every arm not started under today's defaults takes the earlier ones, as the `resumed`
    arms' runs were started: arms then differ only in what the sweep says."""
    changed = {}
    settled = []
    for arm in arms:
        earlier = under_earlier_defaults(arm.config)
        if earlier is not None and not started_with(arm.config):
            changed.update(unset_changed_defaults(arm.config))
            arm = dataclasses.replace(arm, config=earlier)
        settled.append(arm)
    subject = f"sweep {name}: arms {'; '.join(resumed)} were"
    note = earlier_defaults_note(subject, "every arm runs", changed)
    return settled, (note,)


def _arm_problem(labels: list[str], problem: str, total: int) -> str:
    if len(labels) == 1:
        return f"arm {labels[0]}: {problem}"
    if len(labels) == total:
        return f"every arm ({total}): {problem}"
    return f"arms {'; '.join(labels)}: {problem}"


def _shared_run_problems(arms: list[Arm]) -> list[str]:
    """Arms that would share a run folder without being the same run; artifact roots."""
    problems = []
    first: dict[Path, Arm] = {}
    for arm in arms:
        other = first.setdefault(arm.run_dir.resolve(), arm)
        if other is not arm and other.config != arm.config:
            keys = ", ".join(_differences(other.config, arm.config))
            problems.append(
                f"arms {other.label} and {arm.label} are one run ({other.run_id}) but differ in "
                f"{keys}: keys left out of the run id cannot tell arms apart"
            )
    roots = sorted({canonical_root(arm.config.run.artifact_root) for arm in arms})
    if len(roots) > 1:
        problems.append(f"run.artifact_root must be the same for every arm, got {roots}")
    return problems


def _format(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (a sweep has name, base, overrides, grid, arms, max_concurrent)"
    elif err["type"] == "too_short" and loc.startswith("grid."):
        msg = "an axis needs at least one value"
    elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], dict):
        msg = f"{msg}, got {err['input']!r}"
    return f"{loc}: {msg}" if loc else msg
