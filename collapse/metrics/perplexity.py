"""Perplexity of a model on the fixed validation set: token-weighted, every token scored."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from collapse.models import implementation_of


def windows(
    doc: Sequence[int], bos_id: int, eos_id: int, context: int
) -> list[tuple[list[int], int]]:
    """Cut one document into model inputs and the number of trailing positions each scores.

    The scored tokens are the document followed by EOS, each predicted after a BOS, so the first
    token counts too (the public code dropped it). A document longer than the context is read in
    windows that overlap by half a context, each scoring only tokens not scored before, so every
    token is scored exactly once with at least context/2 tokens of history where available.
    """
    seq = [bos_id, *doc, eos_id]
    if len(seq) <= context:
        return [(seq, len(seq) - 1)]
    stride = max(1, context // 2)
    out: list[tuple[list[int], int]] = []
    scored_until = 1  # seq[0] is the BOS, never a target
    end = context
    while True:
        end = min(end, len(seq))
        begin = end - context
        out.append((seq[begin:end], end - scored_until))
        scored_until = end
        if end == len(seq):
            return out
        end += stride


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    docs: Sequence[Sequence[int]],
    bos_id: int,
    eos_id: int,
    *,
    context: int,
    batch_size: int = 32,
    device: torch.device | None = None,
) -> dict[str, float | int]:
    """exp(mean NLL) over every validation token (and each document's closing EOS).

    Returns:
        perplexity, nll (nats per token), tokens scored, documents, windows.
    """
    device = device or next(model.parameters()).device
    model.eval()
    impl = implementation_of(model)
    items = [w for doc in docs for w in windows(doc, bos_id, eos_id, context)]
    items.sort(key=lambda w: len(w[0]))  # similar lengths per batch: little padding
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), eos_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, n_scored) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, len(ids) - n_scored : len(ids)] = torch.tensor(ids[len(ids) - n_scored :])
        input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
        logits = impl.logits(model, input_ids, mask).float()
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            labels[:, 1:].flatten(),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += float(nll)
        total_tokens += int((labels[:, 1:] != -100).sum())
    mean = total_nll / max(total_tokens, 1)
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": total_tokens,
        "documents": len(docs),
        "windows": len(items),
        "context": context,
    }
