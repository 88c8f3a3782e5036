"""GPT-Neo presets and seeded initialisation."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from collapse.config import ModelConfig
from collapse.models import count_parameters, gpt_neo_config, init_model


def test_presets_match_the_tinystories_models():
    expected = {
        "tinystories-1m": (3_745_984, 398_464, 8, 64),
        "tinystories-33m": (68_514_048, 28_343_808, 4, 768),
    }
    for preset, (total, non_emb, layers, hidden) in expected.items():
        cfg = gpt_neo_config(ModelConfig(preset=preset), 50257, 50256, 50256)
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads) == (layers, hidden, 16)
        assert cfg.attention_layers == ["global", "local"] * (layers // 2)
        assert cfg.window_size == 256 and cfg.max_position_embeddings == 2048
        assert cfg.intermediate_size is None and cfg.activation_function == "gelu_new"
        assert cfg.embed_dropout == cfg.attention_dropout == cfg.resid_dropout == 0
        assert cfg.bos_token_id == cfg.eos_token_id == 50256
        if preset == "tinystories-1m":  # the 33M one takes seconds to build; sizes checked above
            assert count_parameters(init_model(cfg, 0)) == {
                "total": total,
                "non_embedding": non_emb,
            }


def test_explicit_fields_override_a_preset():
    cfg = gpt_neo_config(ModelConfig(preset="tinystories-1m", num_layers=2), 100, 0, 0)
    assert cfg.num_layers == 2 and cfg.hidden_size == 64


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = gpt_neo_config(ModelConfig(num_layers=2, hidden_size=32, num_heads=4), 80, 0, 0)
    a, b, c = init_model(cfg, 1), init_model(cfg, 1), init_model(cfg, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, c.transformer.h[0].mlp.c_fc.weight)


def test_init_does_not_touch_the_global_rng():
    cfg = gpt_neo_config(ModelConfig(num_layers=2, hidden_size=32, num_heads=4), 80, 0, 0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    init_model(cfg, 5)
    assert torch.equal(torch.rand(3), expected)


def test_saved_model_loads_with_transformers(tmp_path: Path, tiny_model):
    tiny_model.save_pretrained(str(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = torch.tensor([[0, 5, 7, 9]])
    assert torch.allclose(loaded(ids).logits, tiny_model(ids).logits)
