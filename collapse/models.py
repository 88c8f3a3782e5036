"""GPT-Neo presets (the TinyStories configurations) and fresh random initialisation."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

# Exact architecture fields of roneneldan/TinyStories-1M and -33M (PROTOCOL.md); vocabulary and
# special tokens come from the run's tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "tinystories-1m": {
        "num_layers": 8,
        "hidden_size": 64,
        "num_heads": 16,
        "intermediate_size": None,
        "window_size": 256,
        "max_position_embeddings": 2048,
        "attention_pattern": "global-local",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
    },
    "tinystories-33m": {
        "num_layers": 4,
        "hidden_size": 768,
        "num_heads": 16,
        "intermediate_size": None,
        "window_size": 256,
        "max_position_embeddings": 2048,
        "attention_pattern": "global-local",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
    },
}

# Fields a config without a preset may leave out.
_DEFAULTS: dict[str, Any] = {
    "intermediate_size": None,
    "window_size": 256,
    "max_position_embeddings": 2048,
    "attention_pattern": "global-local",
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
}
_REQUIRED = ("num_layers", "hidden_size", "num_heads")


def resolve_model_fields(model_cfg: Any) -> dict[str, Any]:
    """Merge preset, defaults and explicit fields of a `ModelConfig` into concrete values.

    Raises:
        ValueError: naming the `model.*` fields that are missing or inconsistent.
    """
    explicit = {k: v for k, v in model_cfg.model_dump().items() if k != "preset" and v is not None}
    fields = dict(_DEFAULTS)
    if model_cfg.preset:
        fields.update(PRESETS[model_cfg.preset])
    fields.update(explicit)
    missing = [f"model.{k}" for k in _REQUIRED if fields.get(k) is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} must be set (or choose model.preset: tinystories-1m | "
            "tinystories-33m)"
        )
    if fields["hidden_size"] % fields["num_heads"]:
        raise ValueError(
            f"model.hidden_size ({fields['hidden_size']}) must be divisible by "
            f"model.num_heads ({fields['num_heads']})"
        )
    if fields["attention_pattern"] == "global-local" and fields["num_layers"] % 2:
        raise ValueError(
            f"model.num_layers ({fields['num_layers']}) must be even for the global-local pattern"
        )
    return fields


def _attention_types(pattern: str, num_layers: int) -> list[list[Any]]:
    if pattern == "global-local":
        return [[["global", "local"], num_layers // 2]]
    return [[[pattern], num_layers]]


def gpt_neo_config(model_cfg: Any, vocab_size: int, bos_id: int, eos_id: int) -> GPTNeoConfig:
    """The `transformers` config for a run's model (dropouts 0, as in TinyStories)."""
    f = resolve_model_fields(model_cfg)
    return GPTNeoConfig(
        vocab_size=vocab_size,
        max_position_embeddings=f["max_position_embeddings"],
        hidden_size=f["hidden_size"],
        num_layers=f["num_layers"],
        num_heads=f["num_heads"],
        intermediate_size=f["intermediate_size"],
        window_size=f["window_size"],
        attention_types=_attention_types(f["attention_pattern"], f["num_layers"]),
        activation_function=f["activation_function"],
        layer_norm_epsilon=f["layer_norm_epsilon"],
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )


def init_model(config: GPTNeoConfig, seed: int) -> GPTNeoForCausalLM:
    """A freshly initialised GPT-Neo; the same seed gives the same weights in any process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoForCausalLM(config)
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameter counts (tied embeddings counted once)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(("wte.weight", "wpe.weight"))
    )
    return {"total": total, "non_embedding": total - embedding}
