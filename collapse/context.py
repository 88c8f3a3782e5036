"""What every stage needs (config, store, reporting), readers of earlier stages' outputs, and
`open_run`, the one way a run folder becomes a `Context` again (CLI, report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collapse.errors import UserError
from collapse.store import RunStore

if TYPE_CHECKING:
    from collapse.config import Config


class RunNotFoundError(UserError):
    """A path that is not a run folder (no config.yaml), or a saved config that cannot be read."""


@dataclass
class Context:
    """What every stage needs: the config, the store, and how to report."""

    config: Config
    store: RunStore
    progress: bool = False
    log: Callable[[str], None] = field(default=print)


def open_run(run_dir: str | Path, log: Callable[[str], None] | None = None) -> Context:
    """The context of an existing run folder (a path, or a URL under a URL root), from its
    saved `config.yaml`.

    Validation of a saved config checks types and cross-section rules only, never that input
    files still exist: a run whose corpus file has moved, or that is read on a machine without
    it, still opens (the stage that reads the file checks it, if it has to run at all).

    Raises:
        RunNotFoundError: no config.yaml in `run_dir`, or one that no longer validates.
    """
    import yaml

    from collapse.config import ConfigError, validate_config, with_earlier_values

    store = RunStore.at(run_dir)
    path = store.config_path
    saved = store.read_run_file(path)
    if saved is None:
        raise RunNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        config = validate_config(with_earlier_values(yaml.safe_load(saved)))
    except (ConfigError, yaml.YAMLError) as exc:
        raise RunNotFoundError(f"{path} cannot be read: {exc}") from None
    return Context(config, store, log=log or (lambda _: None))


def stage_record(ctx: Context, gen: int, stage: str) -> dict[str, Any]:
    """The manifest record of a finished stage.

    Raises:
        RuntimeError: the stage has not finished (its dependants cannot have a key yet).
    """
    record = ctx.store.read_manifest(gen)["stages"].get(stage)
    if record is None:
        raise RuntimeError(f"generation {gen} has no finished {stage!r} stage")
    return record


def corpus_digest(ctx: Context, gen: int) -> str:
    """Content digest of generation `gen`'s corpus (gen 0: human corpus + tokenizer)."""
    return stage_record(ctx, gen, "corpus" if gen == 0 else "sample")["digest"]


def corpus_shards(ctx: Context, gen: int) -> list[Path]:
    """The Parquet shards of generation `gen`'s corpus, in order."""
    from collapse.corpus.parquet import shard_paths

    return shard_paths(ctx.store.pull(ctx.store.corpus_dir(gen)))


def validation_path(ctx: Context) -> Path:
    """The human validation set (Parquet)."""
    return ctx.store.pull(ctx.store.validation_path())


def load_run_tokenizer(ctx: Context) -> Any:
    """The run's tokenizer (saved in generation 0)."""
    from collapse.tokenizer import load_tokenizer

    return load_tokenizer(ctx.store.pull(ctx.store.tokenizer_dir()))


def load_model(ctx: Context, gen: int, device: Any) -> Any:
    """Generation `gen`'s trained model, by the configured implementation."""
    from collapse.models import load_model as load

    return load(ctx.config.model, ctx.store.pull(ctx.store.model_dir(gen)), device)


def baseline_model(ctx: Context, device: Any) -> Any:
    """The run's random-init baseline: a fresh model of its architecture, seeded by the run.

    The paper compares generations with an untrained model of the same architecture; the judge
    grades it and the downstream evaluation fine-tunes it (as generation 0 of both). One seed for
    both, so both baselines are the same model.
    """
    from collapse.models import build_model
    from collapse.seeding import derive_seed
    from collapse.tokenizer import special_ids

    tokenizer = load_run_tokenizer(ctx)
    start_id, end_id = special_ids(tokenizer)
    seed = derive_seed(ctx.config.run.seed, "judge-baseline")  # the name predates the reuse
    return build_model(ctx.config.model, len(tokenizer), start_id, end_id, seed).to(device)


def read_result(ctx: Context, gen: int, name: str) -> dict[str, Any] | None:
    """An evaluation's stored result, or None unless the manifest holds a valid record of it.

    Files of dropped stages stay on disk (e.g. after `--from-generation`); only the manifest
    says what is current.
    """
    import json

    if ctx.store.valid_record(gen, f"eval.{name}", None) is None:
        return None
    return json.loads(ctx.store.pull(ctx.store.eval_path(gen, name)).read_text())
