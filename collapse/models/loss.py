"""Training losses: next-token cross-entropy from full logits (the reference), and next-token
log-probabilities through the output head in chunks, without the full logits (the fast path).

The logits of a training micro-batch are its biggest tensor: 80 x 512 tokens x 50257 ids is
8 GB in fp32 and, kept for backward, dominates peak memory. Here the output head and the
log-softmax run over `chunk` tokens at a time, in forward and again in backward (recomputed,
not stored), so only [chunk, vocab] logits exist at once. The gradient of each token's
log-probability with respect to its logits is onehot - softmax, so any weighting of the
per-token log-probabilities (plain MLE, or the token weights of MixCE/TaiLr) backpropagates
through the same function.

Written by hand because PyTorch has no fused linear cross-entropy, and the libraries that do
(e.g. Liger's Triton kernels) run on CUDA only; this one runs wherever torch does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Tokens per chunk: [chunk, vocab] fp32 logits are 1 GB at 5,000 x 50,257.
DEFAULT_CHUNK = 4096


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The matmul dtype autocast would use here (the input's outside autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        # log-softmax in fp32 at least (fp64 inputs stay fp64, e.g. for gradcheck)
        acc = torch.promote_types(torch.float32, dtype)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                logits = (hidden[start : start + chunk].to(dtype) @ w.T).to(acc)
                picked = logits.gather(1, targets[start : start + chunk, None]).squeeze(1)
                out[start : start + chunk] = picked - logits.logsumexp(dim=1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        acc = torch.promote_types(torch.float32, dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                logits = (h @ w.T).to(acc)
                # d log p(target) / d logits = onehot(target) - softmax(logits)
                grad = logits.softmax(dim=1).neg_()
                rows = torch.arange(grad.shape[0], device=grad.device)
                grad[rows, targets[start : start + chunk]] += 1
                grad *= grad_out[start : start + chunk, None]
                grad = grad.to(dtype)
                grad_hidden[start : start + chunk] = (grad @ w).to(hidden.dtype)
                grad_weight += (grad.T @ h).to(acc)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def target_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the output head `weight`, differentiable, chunked.

    Args:
        hidden: [tokens, width] final hidden states.
        weight: [vocab, width] output head (tied embedding).
        targets: [tokens] next-token ids.
        chunk: tokens whose logits exist at once.

    Returns:
        log-probabilities [tokens] in fp32 (fp64 for fp64 inputs). Under autocast the head's
        matmuls run in the autocast dtype and the log-softmax in fp32, as
        `F.cross_entropy(logits.float())` would.
    """
    dtype = _compute_dtype(hidden.device, hidden.dtype)
    return _TargetLogprobs.apply(hidden, weight, targets, chunk, dtype)


def token_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of a batch of full sequences, from all logits."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
