"""Perplexity and entropy on inputs whose answers are known by construction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from collapse.corpus.parquet import shard_name, shard_paths, write_shard
from collapse.metrics.entropy import corpus_entropy, entropy_from_counts
from collapse.metrics.perplexity import perplexity, windows


def test_uniform_and_degenerate_entropy(tmp_path: Path):
    ids = [[t for t in range(16)] for _ in range(4)]  # 16 tokens, equally often
    write_shard(tmp_path / shard_name(0), ids, [""] * 4, [True, True, False, True])
    result = corpus_entropy(shard_paths(tmp_path), vocab_size=100)
    assert result["entropy_bits"] == pytest.approx(4.0)
    assert result["distinct_tokens"] == 16 and result["tokens"] == 64
    assert result["finished_fraction"] == 0.75 and result["mean_length"] == 16
    assert entropy_from_counts(torch.tensor([0, 9, 0]).numpy()) == 0.0


def test_windows_score_every_token_exactly_once():
    doc = list(range(1, 40))
    for context in (4, 7, 16, 64):
        scored = []
        for ids, n in windows(doc, bos_id=0, eos_id=99, context=context):
            assert len(ids) <= context and 1 <= n <= len(ids) - (1 if ids[0] == 0 else 0)
            scored += ids[len(ids) - n :]
        assert scored == doc + [99]


def test_a_model_with_zero_logits_has_perplexity_vocab_size(tiny_model):
    with torch.no_grad():
        tiny_model.transformer.wte.weight.zero_()  # tied head: every logit is 0 -> uniform
    docs = [[3, 4, 5], [6] * 80, [7, 8]]
    result = perplexity(tiny_model, docs, 0, 0, context=32, batch_size=2)
    assert result["perplexity"] == pytest.approx(50, rel=1e-5)
    assert result["tokens"] == sum(len(d) + 1 for d in docs)


def test_perplexity_equals_a_direct_computation(tiny_model):
    docs = [[3, 4, 5, 6], [9, 8]]
    nll, count = 0.0, 0
    for doc in docs:
        seq = torch.tensor([[0, *doc, 0]])
        with torch.no_grad():
            logits = tiny_model(seq).logits
        nll += float(F.cross_entropy(logits[0, :-1], seq[0, 1:], reduction="sum"))
        count += len(doc) + 1
    result = perplexity(tiny_model, docs, 0, 0, context=32, batch_size=8)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
