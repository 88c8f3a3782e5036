"""Defaults changed after runs existed: a run started under the earlier ones resumes as it was.

`collapse.config.HASH_NEUTRAL` holds, for every key added after runs existed, the value all
earlier runs had. Where a key's default is now another value (`model.implementation: fast`,
`sample.rng: story` and `sample.precision: auto` since 2026-12-07), a config that leaves the key
unset names a new run folder (the key's value is part of the run hash), so re-running an old
config would silently start over. Instead, when the run that the same config named under the
earlier defaults exists and the new one does not, that run is the one meant: it resumes with
the values it was started with, and the caller says so. Setting the key explicitly starts a
run with the new value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collapse.config import (
    HASH_NEUTRAL,
    Config,
    ConfigError,
    config_hash,
    load_config,
    run_id_for,
    start_problems,
    validate_config,
    with_earlier_values,
)
from collapse.store import RunStore, root_problem


def unset_changed_defaults(config: Config) -> dict[str, tuple[Any, Any]]:
    """`section.key` -> (earlier default, current value) for each changed default left unset."""
    changed = {}
    for (section, key), earlier in HASH_NEUTRAL.items():
        part = getattr(config, section)
        if key not in part.model_fields_set and getattr(part, key) != earlier:
            changed[f"{section}.{key}"] = (earlier, getattr(part, key))
    return changed


def under_earlier_defaults(config: Config) -> Config | None:
    """The same config with every changed default it leaves unset at its earlier value.

    None when there is none (the config is the same under the earlier defaults).
    """
    if not unset_changed_defaults(config):
        return None
    return validate_config(with_earlier_values(config.model_dump(mode="json", exclude_unset=True)))


def _frozen_hash(store: RunStore) -> str | None:
    """The config hash the run in `store` was started with; None if it never started."""
    frozen = store.read_run_file(store.config_hash_path)
    return None if frozen is None else frozen.decode().strip()


def started_with(config: Config) -> bool:
    """Whether the run `config` names exists and was started with this very config."""
    store = RunStore(config.run.artifact_root, run_id_for(config))
    return _frozen_hash(store) == config_hash(config)


def run_id_clash(store: RunStore, config: Config) -> str | None:
    """Why `config` cannot run in `store`: the run was started with another config (a
    `run.run_id` given to two configs), else None. Checked before a run starts (`collapse
    run`) and when its flow starts (`freeze_config`)."""
    frozen = _frozen_hash(store)
    if frozen is None or frozen == config_hash(config):
        return None
    return (
        f"run.run_id: run {store.run_id!r} was started with a different config "
        f"(see {store.location}/{store.config_path.name}); choose another run.run_id "
        "or leave it unset"
    )


def as_started(config: Config) -> tuple[Config, str | None]:
    """The config to run: `config`, or its earlier-defaults twin where only that run exists.

    Args:
        config: a validated config, as loaded from the user's file and overrides.

    Returns:
        The config, and a line for the user when it is the earlier-defaults twin (else None).
    """
    earlier = under_earlier_defaults(config)
    if earlier is None or started_with(config) or not started_with(earlier):
        return config, None
    subject = f"run {run_id_for(earlier)} was"
    return earlier, earlier_defaults_note(subject, "it resumes", unset_changed_defaults(config))


def earlier_defaults_note(subject: str, what: str, changed: dict[str, tuple[Any, Any]]) -> str:
    """The line telling the user that `subject` (e.g. "run X was") runs as it was started.

    Args:
        subject: who was started under the earlier defaults, with its verb.
        what: who runs as started, with its verb (e.g. "it resumes").
        changed: `unset_changed_defaults` of the config as loaded.
    """
    was = ", ".join(f"{k}={v[0]}" for k, v in changed.items())
    now = " ".join(f"{k}={v[1]}" for k, v in changed.items())
    return (
        f"{subject} started before today's defaults: {what} as started ({was}); "
        f"to use today's defaults instead, set {now}"
    )


def config_to_run(
    path: str | Path, overrides: list[str], *, check_inputs: bool
) -> tuple[Config | None, list[str], str | None]:
    """The config a run of `path` with `overrides` runs under, as `collapse run`, `submit` and
    `sweep` (per arm) check it before anything starts.

    Every config problem is reported at once, missing input files included. With
    `check_inputs` (a run is about to start): the artifact root must be writable (a URL root is
    probed with an object written and removed), the run folder must not hold a run of another
    config, and input files are checked before a run's first start only (a resumed run may no
    longer need them; the stage that reads a file checks it if it must run). Without (`status`,
    `report`): the root must be readable. A run started under defaults that have changed since
    runs as it was started (`as_started`).

    Returns:
        (the config or None, its problems as "dotted.key: message" lines, the line to tell the
        user when it is a run started under earlier defaults, else None).
    """
    try:
        config = load_config(path, overrides, check_inputs=False)
    except ConfigError:
        try:
            load_config(path, overrides)
        except ConfigError as exc:
            return None, exc.problems, None
        raise
    unusable = root_problem(config.run.artifact_root, write=check_inputs)
    if unusable:
        return None, [f"run.artifact_root: {unusable}"], None
    config, note = as_started(config)
    if not check_inputs:
        return config, [], note
    store = RunStore(config.run.artifact_root, run_id_for(config))
    clash = run_id_clash(store, config)
    if clash:
        return None, [clash], note
    missing = [] if store.started() else start_problems(config)
    return (None if missing else config), missing, note
