"""Training losses: next-token cross-entropy from full logits (the reference), and the output
head in chunks, without the full logits (the fast path).

The logits of a training micro-batch are its biggest tensor: 80 x 512 tokens x 50257 ids is
8 GB in fp32 and, kept for backward, dominates peak memory. Here the output head and the
log-softmax run over `chunk` tokens at a time, so only [chunk, vocab] logits exist at once.
The gradient of each token's log-probability with respect to its logits is onehot - softmax.

- `weighted_nll` (training): the loss -mean_t(w_t log p_t), with token weights w_t a function
  of the target's probability taken without gradient (1 for MLE, MixCE's and TaiLr's weights),
  and its gradients computed in the same pass over the vocabulary: a chunk's logits are made
  once, and backward only scales the gradients kept from forward by the upstream gradient. A
  loss through differentiable per-token log-probabilities would make them twice (forward,
  then again in backward), a third more of the head's matmuls, which are most of a 33M step's
  FLOPs (the head is 38.6M of its 67M multiplying parameters).

Written by hand because PyTorch has no fused linear cross-entropy, and the libraries that do
(e.g. Liger's Triton kernels) run on CUDA only; this one runs wherever torch does.
"""

from __future__ import annotations

from collections.abc import Callable
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


ChunkGradient = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def chunk_gradient(
    logits: torch.Tensor,
    picked: torch.Tensor,
    tokens: int,
    weigh: Callable[[torch.Tensor], torch.Tensor] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of `weighted_nll`, after its logits matmul: the sum of w_t log p_t over the
    chunk, and d loss / d logits = w_t / tokens * (softmax - onehot) in `dtype` (the matmuls'
    dtype). Pure elementwise and reduction work over [chunk, vocab], with no input changed,
    so that `train.compile` can fuse it into a kernel or two (`compiled_trunk`); eager it is
    several passes over the chunk's logits.
    """
    norm = logits.logsumexp(dim=1)
    logp = logits.gather(1, picked[:, None]).squeeze(1) - norm
    weights = torch.ones_like(logp) if weigh is None else weigh(logp.exp())
    grad = (logits - norm[:, None]).exp_()
    grad[torch.arange(grad.shape[0], device=grad.device), picked] -= 1
    grad *= (weights / tokens)[:, None]
    return (weights * logp).sum(), grad.to(dtype)


class _WeightedNLL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        dtype: torch.dtype,
        weigh: Callable[[torch.Tensor], torch.Tensor] | None,
        gradient: ChunkGradient,
    ) -> torch.Tensor:
        acc = torch.promote_types(torch.float32, dtype)
        tokens = hidden.shape[0]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        # fp16 ends at 6e-8: a non-target logit's gradient p/tokens (~5e-10 for a 50k vocabulary
        # over a 40k-token micro-batch) would round to 0 in the cast to fp16. There the 1/tokens
        # comes after the head's matmuls, in fp32, as a loss scale would have it; fp32 and bf16
        # (fp32's range) keep the order whose numerics every earlier run has.
        late = tokens if dtype == torch.float16 else 1
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, tokens, chunk):
                h = hidden[start : start + chunk].to(dtype)
                logits = (h @ w.T).to(acc)
                picked = targets[start : start + chunk]
                part, grad = gradient(logits, picked, tokens // late, weigh, dtype)
                total += part
                if late == 1:
                    grad_hidden[start : start + chunk] = (grad @ w).to(hidden.dtype)
                    grad_weight += (grad.T @ h).to(acc)
                else:
                    grad_hidden[start : start + chunk] = (grad @ w).to(acc) / late
                    grad_weight += (grad.T @ h).to(acc) / late
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return -total / tokens

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_out.to(grad_weight.dtype)
        return (
            grad_hidden * scale.to(grad_hidden.dtype),
            (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def weighted_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weigh: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk: int = DEFAULT_CHUNK,
    gradient: ChunkGradient = chunk_gradient,
) -> torch.Tensor:
    """-mean_t(w_t log p(targets[t] | hidden[t])) under the output head `weight`, chunked, its
    gradients made in the same pass (see the module notes).

    Args:
        hidden: [tokens, width] final hidden states.
        weight: [vocab, width] output head (tied embedding).
        targets: [tokens] next-token ids.
        weigh: target probabilities q [tokens] (no gradient) -> token weights; None: all 1
            (MLE). The weights carry no gradient.
        chunk: tokens whose logits exist at once.
        gradient: `chunk_gradient`, or the same function compiled.

    Returns:
        The loss, a scalar in fp32 (fp64 for fp64 inputs). Under autocast the head's matmuls
        run in the autocast dtype and the log-softmax in fp32, as
        `F.cross_entropy(logits.float())` would.
    """
    dtype = _compute_dtype(hidden.device, hidden.dtype)
    return _WeightedNLL.apply(hidden, weight, targets, chunk, dtype, weigh, gradient)


def token_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of a batch of full sequences, from all logits."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())


def token_logprobs(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) (fp32 at least, differentiable) of each next token of a batch of full
    sequences, as [batch * (seq - 1)], from all logits."""
    acc = torch.promote_types(torch.float32, logits.dtype)
    logp = logits[:, :-1].to(acc).flatten(0, 1).log_softmax(dim=-1)
    return logp.gather(1, batch[:, 1:].flatten()[:, None]).squeeze(1)
