"""Model architectures as plain data: the TinyStories presets and how a `model` section resolves.

No torch here: config validation reads these without loading a framework.
"""

from __future__ import annotations

from typing import Any

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
DEFAULTS: dict[str, Any] = {
    "intermediate_size": None,
    "window_size": 256,
    "max_position_embeddings": 2048,
    "attention_pattern": "global-local",
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
}
REQUIRED = ("num_layers", "hidden_size", "num_heads")
ARCHITECTURE_FIELDS = (*REQUIRED, *DEFAULTS)

# Implementations of the architecture (collapse.models.<module>); `model.implementation` picks
# one. They compute the same function and read and write the same checkpoint format.
IMPLEMENTATIONS: dict[str, str] = {
    "transformers": "collapse.models.gpt_neo_hf",
    "fast": "collapse.models.gpt_neo_fast",
}


def resolve_model_fields(model_cfg: Any) -> dict[str, Any]:
    """Merge preset, defaults and explicit fields of a `ModelConfig` into concrete values.

    Only architecture fields: the implementation that computes it is not part of the result
    (stage keys hash this dict).

    Raises:
        ValueError: naming the `model.*` fields that are missing or inconsistent.
    """
    explicit = {
        k: getattr(model_cfg, k) for k in ARCHITECTURE_FIELDS if getattr(model_cfg, k) is not None
    }
    fields = dict(DEFAULTS)
    if model_cfg.preset:
        fields.update(PRESETS[model_cfg.preset])
    fields.update(explicit)
    missing = [f"model.{k}" for k in REQUIRED if fields.get(k) is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} must be set (or choose model.preset: {' | '.join(PRESETS)})"
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


def context_length(model_cfg: Any) -> int:
    """The longest sequence (BOS included) the configured model can read."""
    return int(resolve_model_fields(model_cfg)["max_position_embeddings"])
