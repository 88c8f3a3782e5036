"""The reference implementation: `transformers.GPTNeoForCausalLM`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from collapse.seeding import seeded_torch


def _attention_types(pattern: str, num_layers: int) -> list[list[Any]]:
    if pattern == "global-local":
        return [[["global", "local"], num_layers // 2]]
    return [[[pattern], num_layers]]


def gpt_neo_config(
    fields: dict[str, Any], vocab_size: int, start_id: int, end_id: int
) -> GPTNeoConfig:
    """The `transformers` config for resolved architecture fields (dropouts 0, as in TinyStories).

    Args:
        fields: `collapse.models.resolve_model_fields` of the run's `model` section.
        vocab_size: the tokenizer's size.
        start_id: BOS id.
        end_id: EOS id (also the pad id).
    """
    return GPTNeoConfig(
        vocab_size=vocab_size,
        max_position_embeddings=fields["max_position_embeddings"],
        hidden_size=fields["hidden_size"],
        num_layers=fields["num_layers"],
        num_heads=fields["num_heads"],
        intermediate_size=fields["intermediate_size"],
        window_size=fields["window_size"],
        attention_types=_attention_types(fields["attention_pattern"], fields["num_layers"]),
        activation_function=fields["activation_function"],
        layer_norm_epsilon=fields["layer_norm_epsilon"],
        embed_dropout=0.0,
        attention_dropout=0.0,
        resid_dropout=0.0,
        bos_token_id=start_id,
        eos_token_id=end_id,
        pad_token_id=end_id,
        tie_word_embeddings=True,
    )


def init_model(config: GPTNeoConfig, seed: int) -> GPTNeoForCausalLM:
    """A freshly initialised GPT-Neo; the same seed gives the same weights in any process."""
    with seeded_torch(seed):
        model = GPTNeoForCausalLM(config)
    return model


@functools.cache
def _cache_arg_of(cls: type) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache`; accept both generations of the API.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _cache_arg(model: GPTNeoForCausalLM) -> str:
    return _cache_arg_of(type(model))


class TransformersGPTNeo:
    """`model.implementation: transformers`: the library's GPT-Neo, eager attention."""

    name = "transformers"
    slots = False  # its cache grows by concatenation, for the whole batch at once

    def build(
        self, fields: dict[str, Any], vocab_size: int, start_id: int, end_id: int, seed: int
    ) -> GPTNeoForCausalLM:
        """See `collapse.models.ModelImplementation`."""
        return init_model(gpt_neo_config(fields, vocab_size, start_id, end_id), seed)

    def load(self, path: Path, device: torch.device) -> GPTNeoForCausalLM:
        """See `collapse.models.ModelImplementation`."""
        return GPTNeoForCausalLM.from_pretrained(str(path)).to(device)

    def save(self, model: GPTNeoForCausalLM, path: Path) -> None:
        """See `collapse.models.ModelImplementation`."""
        model.save_pretrained(str(path))

    def owns(self, model: Any) -> bool:
        """See `collapse.models.ModelImplementation`."""
        return isinstance(model, GPTNeoForCausalLM)

    def count_parameters(self, model: GPTNeoForCausalLM) -> dict[str, int]:
        """See `collapse.models.ModelImplementation`."""
        total = sum(p.numel() for p in model.parameters())
        embedding = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
        return {"total": total, "non_embedding": total - embedding}

    def logits(
        self,
        model: GPTNeoForCausalLM,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See `collapse.models.ModelImplementation`."""
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(
        self,
        model: GPTNeoForCausalLM,
        input_ids: torch.Tensor,
        weigh: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """See `collapse.models.ModelImplementation`: from the full logits."""
        from collapse.models.loss import token_logprobs, token_loss

        logits = model(input_ids=input_ids).logits
        if weigh is None:
            return token_loss(logits, input_ids)
        logp = token_logprobs(logits, input_ids)
        return -(weigh(logp.detach().exp()) * logp).mean()

    def features(self, model: GPTNeoForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
        """See `collapse.models.ModelImplementation`: what `GPTNeoModel` returns."""
        return model.transformer(input_ids=input_ids).last_hidden_state

    def prefill(
        self, model: GPTNeoForCausalLM, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """See `collapse.models.ModelImplementation`."""
        out = model(input_ids=input_ids, use_cache=True)
        return out.logits[:, -1, :], self._cache(model, out)

    def decode(
        self, model: GPTNeoForCausalLM, next_ids: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, Any]:
        """See `collapse.models.ModelImplementation`."""
        out = model(input_ids=next_ids[:, None], use_cache=True, **{_cache_arg(model): state})
        return out.logits[:, -1, :], self._cache(model, out)

    def context_length(self, model: GPTNeoForCausalLM) -> int:
        """See `collapse.models.ModelImplementation`."""
        return int(model.config.max_position_embeddings)

    @staticmethod
    def _cache(model: GPTNeoForCausalLM, out: Any) -> Any:
        return out.cache if _cache_arg(model) == "cache" else out.past_key_values


IMPLEMENTATION = TransformersGPTNeo()
