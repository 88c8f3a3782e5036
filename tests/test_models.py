"""The model interface: presets, seeded initialisation, saving and loading, parameter counts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from collapse.config import ModelConfig
from collapse.models import (
    build_model,
    context_length,
    count_parameters,
    load_model,
    logits,
    resolve_model_fields,
    save_model,
)
from collapse.models.gpt_neo_hf import gpt_neo_config

# the reference implementation (tests/test_fast_model.py checks ours against it)
TINY = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, implementation="transformers")


def test_presets_match_the_tinystories_models():
    expected = {
        "tinystories-1m": (3_745_984, 398_464, 8, 64),
        "tinystories-33m": (68_514_048, 28_343_808, 4, 768),
    }
    for preset, (total, non_emb, layers, hidden) in expected.items():
        model_cfg = ModelConfig(preset=preset)
        cfg = gpt_neo_config(resolve_model_fields(model_cfg), 50257, 50256, 50256)
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (layers, hidden, 16)
        assert cfg.attention_layers == ["global", "local"] * (layers // 2)
        assert cfg.window_size == 256 and cfg.max_position_embeddings == 2048
        assert context_length(model_cfg) == 2048
        assert cfg.intermediate_size is None and cfg.activation_function == "gelu_new"
        assert cfg.embed_dropout == cfg.attention_dropout == cfg.resid_dropout == 0
        assert cfg.bos_token_id == cfg.eos_token_id == 50256
        if preset == "tinystories-1m":  # the 33M one takes seconds to build; sizes checked above
            model = build_model(model_cfg, 50257, 50256, 50256, seed=0)
            assert count_parameters(model) == {"total": total, "non_embedding": non_emb}


def test_explicit_fields_override_a_preset():
    fields = resolve_model_fields(ModelConfig(preset="tinystories-1m", num_layers=2))
    assert fields["num_layers"] == 2 and fields["hidden_size"] == 64


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_model(TINY, 80, 0, 0, seed) for seed in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, c.transformer.h[0].mlp.c_fc.weight)


def test_init_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model(TINY, 80, 0, 0, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_saved_model_loads_with_transformers_and_through_the_interface(tmp_path: Path, tiny_model):
    save_model(tiny_model, tmp_path)
    ids = torch.tensor([[0, 5, 7, 9]])
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert torch.allclose(reference(ids).logits, logits(tiny_model, ids))
    ours = load_model(TINY, tmp_path, torch.device("cpu"))
    assert torch.equal(logits(ours, ids), logits(tiny_model, ids))


def test_distinct_start_and_end_tokens_reach_the_model_config():
    model = build_model(TINY, 80, start_id=1, end_id=2, seed=0)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
