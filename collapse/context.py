"""What every stage needs (config, store, reporting) and the readers of earlier stages' outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collapse.config import Config
from collapse.store import RunStore


@dataclass
class Context:
    """What every stage needs: the config, the store, and how to report."""

    config: Config
    store: RunStore
    progress: bool = False
    log: Callable[[str], None] = field(default=print)


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


def load_run_tokenizer(ctx: Context) -> Any:
    """The run's tokenizer (saved in generation 0)."""
    from collapse.tokenizer import load_tokenizer

    return load_tokenizer(ctx.store.gen_dir(0) / "tokenizer")


def load_model(ctx: Context, gen: int, device: Any) -> Any:
    """Generation `gen`'s trained model."""
    from transformers import GPTNeoForCausalLM

    return GPTNeoForCausalLM.from_pretrained(str(ctx.store.gen_dir(gen) / "model")).to(device)
