"""The model interface: how a run's model is built, loaded, saved, counted and run.

Training, sampling, perplexity and the judge call only these functions; which implementation
answers them is chosen by `model.implementation` (for new models) or found from the model object
itself (for calls that take a model). An implementation is a module of this package named in
`presets.IMPLEMENTATIONS` that defines `IMPLEMENTATION`, an object with the methods of
`ModelImplementation`. Adding one is that module plus its entry.

Nothing here imports torch at module level, so config validation can read the presets cheaply.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from collapse.models.presets import (
    IMPLEMENTATIONS,
    PRESETS,
    context_length,
    resolve_model_fields,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMPLEMENTATIONS",
    "PRESETS",
    "ModelImplementation",
    "build_model",
    "context_length",
    "count_parameters",
    "decode_step",
    "features",
    "implementation",
    "implementation_of",
    "load_model",
    "logits",
    "prefill",
    "resolve_model_fields",
    "save_model",
]


class ModelImplementation(Protocol):
    """What an implementation of the architecture provides."""

    name: str
    # Whether decoding rows can be restarted independently (continuous batching):
    # `prefill(model, ids, capacity=N)` sizes the cache, and the state has `reset(rows)`.
    slots: bool

    def build(
        self, fields: dict[str, Any], vocab_size: int, start_id: int, end_id: int, seed: int
    ) -> torch.nn.Module:
        """A freshly initialised model; the same seed gives the same weights in any process."""

    def load(self, path: Path, device: torch.device) -> torch.nn.Module:
        """A model saved by `save` (or by `transformers`' `save_pretrained`)."""

    def save(self, model: torch.nn.Module, path: Path) -> None:
        """Write the model to the folder `path` (a transformers-loadable checkpoint)."""

    def owns(self, model: torch.nn.Module) -> bool:
        """Whether `model` is one of this implementation's models."""

    def count_parameters(self, model: torch.nn.Module) -> dict[str, int]:
        """`total` and `non_embedding` parameter counts (tied weights counted once)."""

    def logits(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits [batch, seq, vocab] for every position."""

    def loss(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        weigh: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32) of full training sequences [batch, seq].

        With `weigh`, -mean_t(w_t log p(x_t | x_<t)) instead, w = weigh(q) from the targets'
        probabilities q (no gradient; `collapse.objectives`' token weights).
        """

    def features(self, model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states [batch, seq, hidden] (what the output head reads).

        Rows may be right-padded: attention is causal, so a real position never sees a pad.
        """

    def prefill(self, model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Read a prompt; returns the last position's logits [batch, vocab] and a decode state."""

    def decode(
        self, model: torch.nn.Module, next_ids: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, Any]:
        """Append one token per row [batch]; returns its logits [batch, vocab] and the state."""

    def context_length(self, model: torch.nn.Module) -> int:
        """The longest sequence the model reads (learned positions)."""


def implementation(name: str) -> ModelImplementation:
    """The implementation registered under `name` (a `model.implementation` value)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown model implementation {name!r}; choose from {list(IMPLEMENTATIONS)}"
        )
    return importlib.import_module(IMPLEMENTATIONS[name]).IMPLEMENTATION


def implementation_of(model: Any) -> ModelImplementation:
    """The implementation a model object belongs to."""
    for name in IMPLEMENTATIONS:
        impl = implementation(name)
        if impl.owns(model):
            return impl
    raise TypeError(
        f"{type(model).__name__} is not a model of any implementation in {list(IMPLEMENTATIONS)}"
    )


# transformers builds and loads models under process-wide switches (e.g. parameters created on
# the meta device while `from_pretrained` loads, weight init turned off): a model built in one
# thread while another loads one came out on the meta device ("Cannot copy out of meta
# tensor"), seen in a pipelined run. Threads of one process build and load models one at a time.
MODEL_CONSTRUCTION_LOCK = threading.RLock()


def build_model(
    model_cfg: Any, vocab_size: int, start_id: int, end_id: int, seed: int
) -> torch.nn.Module:
    """A fresh model of the configured architecture and implementation.

    Args:
        model_cfg: the `model` config section.
        vocab_size: the tokenizer's size.
        start_id: the token every document starts after (see `collapse.tokenizer.special_ids`).
        end_id: the token that ends a document.
        seed: initialisation seed.
    """
    impl = implementation(model_cfg.implementation)
    with MODEL_CONSTRUCTION_LOCK:
        return impl.build(resolve_model_fields(model_cfg), vocab_size, start_id, end_id, seed)


def load_model(model_cfg: Any, path: Path, device: Any) -> torch.nn.Module:
    """A saved model, by the configured implementation, on `device`."""
    with MODEL_CONSTRUCTION_LOCK:
        return implementation(model_cfg.implementation).load(Path(path), device)


def save_model(model: Any, path: Path) -> None:
    """Save a model into the folder `path`."""
    implementation_of(model).save(model, Path(path))


def count_parameters(model: Any) -> dict[str, int]:
    """Total and non-embedding parameter counts."""
    return implementation_of(model).count_parameters(model)


def logits(model: Any, input_ids: Any, attention_mask: Any = None) -> torch.Tensor:
    """Logits of every position (see `ModelImplementation.logits`)."""
    return implementation_of(model).logits(model, input_ids, attention_mask)


def features(model: Any, input_ids: Any) -> torch.Tensor:
    """Final hidden states of every position (see `ModelImplementation.features`)."""
    return implementation_of(model).features(model, input_ids)


def prefill(model: Any, input_ids: Any) -> tuple[torch.Tensor, Any]:
    """Start decoding (see `ModelImplementation.prefill`)."""
    return implementation_of(model).prefill(model, input_ids)


def decode_step(model: Any, next_ids: Any, state: Any) -> tuple[torch.Tensor, Any]:
    """One decoding step (see `ModelImplementation.decode`)."""
    return implementation_of(model).decode(model, next_ids, state)
