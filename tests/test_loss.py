"""The chunked output head + log-softmax: same values and gradients as the full logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from collapse.config import ModelConfig
from collapse.models import build_model, implementation_of
from collapse.models.loss import target_logprobs


def test_gradients_are_exact_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (23,))
    # chunks of 5 over 23 tokens: a partial last chunk too
    assert torch.autograd.gradcheck(
        lambda h, w: target_logprobs(h, w, targets, 5), (hidden, weight)
    )


def test_any_token_weighting_backpropagates_like_cross_entropy():
    # per-token weights stand for MLE (all ones) or MixCE/TaiLr-style weights alike
    torch.manual_seed(1)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    token_weights = torch.rand(300)
    reference = -F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (reference * token_weights).sum().backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ours = target_logprobs(hidden, weight, targets, chunk=64)
    (ours * token_weights).sum().backward()
    # fp32 sums in another order: differences at float rounding (measured ~2e-6)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(hidden.grad, expected[0], atol=1e-5)
    assert torch.allclose(weight.grad, expected[1], atol=1e-5)


def test_fast_and_reference_training_losses_and_gradients_agree():
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64)
    reference = build_model(cfg, 50, 0, 0, seed=4)
    fast = build_model(cfg.model_copy(update={"implementation": "fast"}), 50, 0, 0, seed=4)
    batch = torch.randint(0, 50, (4, 40), generator=torch.Generator().manual_seed(2))
    losses = {}
    for name, model in (("reference", reference), ("fast", fast)):
        loss = implementation_of(model).loss(model, batch)
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["fast"] - losses["reference"]) < 1e-5
    grads = dict(reference.named_parameters())
    for name, param in fast.named_parameters():
        assert torch.allclose(param.grad, grads[name].grad, atol=1e-5), name
