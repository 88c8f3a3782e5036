"""The chunked output head + log-softmax: same values and gradients as the full logits, also
when the loss makes its gradients in its forward pass (`weighted_nll`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from collapse.config import ModelConfig
from collapse.models import build_model, implementation_of
from collapse.models.loss import weighted_nll


def _reference_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log p(target) from the whole [tokens, vocab] logits: what the chunked head must equal."""
    logits = hidden @ weight.T
    logp = logits.to(torch.promote_types(torch.float32, logits.dtype)).log_softmax(dim=1)
    return logp.gather(1, targets[:, None]).squeeze(1)


def test_a_token_weighting_backpropagates_like_weighted_cross_entropy():
    # a weighting of the target's probability, as MixCE and TaiLr weigh (constants to autograd)
    torch.manual_seed(1)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    reference = -F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    expected_loss = -(_mixce_like(reference.detach().exp()) * reference).mean()
    expected_loss.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = weighted_nll(hidden, weight, targets, _mixce_like, chunk=64)
    loss.backward()
    # fp32 sums in another order: differences at float rounding (measured ~2e-6)
    assert torch.allclose(loss, expected_loss, atol=1e-5)
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


def _mixce_like(q: torch.Tensor) -> torch.Tensor:
    return 0.3 + 0.7 * q


def test_the_one_pass_loss_has_exact_gradients_in_float64():
    torch.manual_seed(3)
    hidden = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (23,))
    assert torch.autograd.gradcheck(
        lambda h, w: weighted_nll(h, w, targets, chunk=5), (hidden, weight)
    )
    # weighted: the weights are constants to the gradient (gradcheck would move them with q),
    # so against the full logits' loss with the same detached weights, whose gradient is exact
    grads = []
    for one_pass in (False, True):
        hidden.grad = weight.grad = None
        if one_pass:
            loss = weighted_nll(hidden, weight, targets, _mixce_like, chunk=5)
        else:
            logp = _reference_logprobs(hidden, weight, targets)
            loss = -(_mixce_like(logp.detach().exp()) * logp).mean()
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_the_one_pass_loss_equals_the_full_logits_one_in_fp32_and_under_autocast():
    # 300 tokens in chunks of 64; MLE and a MixCE-like weighting; a loss scaled as gradient
    # accumulation scales it
    torch.manual_seed(4)
    weight = torch.randn(50, 16, requires_grad=True)
    hidden = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    for amp in (False, True):
        for weigh in (None, _mixce_like):
            grads = []
            for one_pass in (False, True):
                hidden.grad = weight.grad = None
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    if one_pass:
                        loss = weighted_nll(hidden, weight, targets, weigh, chunk=64)
                    else:
                        logp = _reference_logprobs(hidden, weight, targets)
                        w = torch.ones_like(logp) if weigh is None else weigh(logp.detach().exp())
                        loss = -(w * logp).mean()
                (loss / 4).backward()
                grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
            (value, *expected), (ours, *got) = grads
            # the same logits (a matmul per element in the same dtype), summed in another order
            assert torch.allclose(ours, value, rtol=1e-6), (amp, weigh)
            for a, b in zip(expected, got, strict=True):
                # under autocast the reference's head gradient is one bf16 matmul over all
                # tokens, rounded once to bf16; ours sums per-chunk products in fp32: they
                # differ by a bf16 rounding of the result (measured 0.33% of the largest entry)
                atol = 2**-7 * a.abs().max().item() if amp else 1e-7
                assert torch.allclose(a, b, rtol=1e-4, atol=atol), (amp, weigh)


def test_fp16_keeps_the_gradients_of_unlikely_tokens():
    """Under fp16 (chosen on GPUs without bf16) a non-target logit's share of the mean loss's
    gradient, p/tokens, lies below fp16's smallest value for a large vocabulary and micro-batch
    (here 2.5e-8): made in fp16 before the 1/tokens, it must not round to 0."""
    torch.manual_seed(5)
    tokens, vocab = 20_000, 2_000
    hidden32 = torch.randn(tokens, 16)
    weight32 = torch.randn(vocab, 16) * 0.1  # near-uniform: p ~ 1/vocab for every token
    targets = torch.randint(0, vocab, (tokens,))
    grads = []
    for dtype in (torch.float32, torch.float16):
        hidden = hidden32.to(dtype).detach().requires_grad_()
        weight = weight32.to(dtype).detach().requires_grad_()
        weighted_nll(hidden, weight, targets).backward()
        grads.append((hidden.grad.float(), weight.grad.float()))
    for exact, half in zip(*grads, strict=True):
        error = (half - exact).abs().sum() / exact.abs().sum()
        assert error < 0.01, error  # 0.37% (hidden) and 0.04% (head); 9.7% and 29% when lost
