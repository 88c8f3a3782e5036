"""Distinct-n, rep-n, Zipf coefficient and self-BLEU on hand-made token ids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from collapse.corpus.parquet import shard_name, shard_paths, write_shard
from collapse.metrics.diversity import (
    _unique_and_repeats,
    corpus_diversity,
    distinct_n,
    ngram_keys,
    rep_n,
    self_bleu,
    zipf_coefficient,
)


def _arrays(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    flat = np.array([t for d in docs for t in d], dtype=np.int32)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return flat, offsets


def _naive(docs: list[list[int]], n: int) -> tuple[float, float]:
    """distinct-n and rep-n straight from the definitions."""
    grams = [[tuple(d[i : i + n]) for i in range(len(d) - n + 1)] for d in docs]
    every = [g for doc in grams for g in doc]
    distinct = len(set(every)) / len(every) if every else 0.0
    reps = [1 - len(set(doc)) / len(doc) for doc in grams if doc]
    return distinct, (sum(reps) / len(reps) if reps else 0.0)


def test_distinct_n_of_a_hand_counted_sequence():
    flat, offsets = _arrays([[1, 2, 1, 2, 3]])
    # unigrams {1,2,3}/5; bigrams 12,21,12,23 -> 3/4; trigrams 121,212,123 -> 3/3; 4-grams 2/2
    assert distinct_n(flat, offsets) == {1: 3 / 5, 2: 3 / 4, 3: 1.0, 4: 1.0}
    # rep: 1-3/5, 1-3/4, 0, 0
    assert rep_n(flat, offsets) == pytest.approx({1: 0.4, 2: 0.25, 3: 0.0, 4: 0.0})


def test_ngrams_never_cross_document_boundaries():
    flat, offsets = _arrays([[1, 2], [3, 4], [], [5]])
    keys, docs = ngram_keys(flat, offsets, 2, bits=3)
    assert keys.tolist() == [1 << 3 | 2, 3 << 3 | 4] and docs.tolist() == [0, 1]
    assert ngram_keys(flat, offsets, 3, bits=3)[0].size == 0
    # [1,2,1,2] in one document has a repeated bigram; split in two, only "1 2" twice
    split = distinct_n(*_arrays([[1, 2], [1, 2]]), n_max=2)
    assert split == {1: 0.5, 2: 0.5}
    assert distinct_n(*_arrays([[1, 2, 1, 2]]), n_max=2) == {1: 0.5, 2: 2 / 3}


def test_repeated_token_and_random_documents():
    length = 50
    flat, offsets = _arrays([[7] * length])
    assert rep_n(flat, offsets, 1)[1] == pytest.approx(1 - 1 / length)
    assert distinct_n(flat, offsets, 1)[1] == pytest.approx(1 / length)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50_000, size=20).tolist() for _ in range(100)]
    rep = rep_n(*_arrays(docs), n_max=2)
    assert rep[1] < 0.01 and rep[2] == 0.0


def test_vectorised_counts_match_the_definitions_on_every_key_path():
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 6, size=rng.integers(0, 30)).tolist() for _ in range(40)]
    flat, offsets = _arrays(docs)
    got_distinct, got_rep = distinct_n(flat, offsets, 5), rep_n(flat, offsets, 5)
    for n in range(1, 6):
        want_distinct, want_rep = _naive(docs, n)
        assert got_distinct[n] == pytest.approx(want_distinct)
        assert got_rep[n] == pytest.approx(want_rep)
        grams = [[tuple(d[i : i + n]) for i in range(len(d) - n + 1)] for d in docs]
        want_unique = len({g for doc in grams for g in doc})
        want_repeats = [len(doc) - len(set(doc)) for doc in grams]
        for bits in (3, 20):  # packed uint64 keys, and void keys when n * bits > 64
            keys, doc_ids = ngram_keys(flat, offsets, n, bits)
            assert keys.dtype == (np.uint64 if n * bits <= 64 else np.dtype((np.void, 4 * n)))
            for general in (False, True):  # the packed (document, key) sort, and the argsort
                unique, repeats = _unique_and_repeats(
                    keys, doc_ids, len(docs), n * bits, force_general=general
                )
                assert unique.size == want_unique and repeats.tolist() == want_repeats
    big = [[t * 70_001 for t in d] for d in docs]  # ids >= 2^16: void keys from n = 4 on
    assert distinct_n(*_arrays(big), 5) == pytest.approx(got_distinct)
    assert rep_n(*_arrays(big), 5) == pytest.approx(got_rep)


def test_zipf_coefficient_of_power_laws():
    ranks = np.arange(1, 1001, dtype=np.float64)
    assert zipf_coefficient(1e6 / ranks) == pytest.approx(1.0, abs=1e-6)
    shuffled = np.random.default_rng(0).permutation(1e6 / ranks**2)
    assert zipf_coefficient(np.r_[shuffled, 0, 0]) == pytest.approx(2.0, abs=1e-6)
    assert zipf_coefficient(np.array([5, 0])) is None  # one type: no slope, not a slope of 0


def test_self_bleu_hand_computed_cases():
    same = [[1, 2, 3, 4, 5, 6]] * 3
    assert self_bleu(same) == pytest.approx(1.0)
    assert self_bleu([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14]]) == 0.0
    # a = [1,2,3,4] vs b = [1,2,3,5,6] and back:
    # a: p = 3/4, 2/3, 1/2, eps/1; c=4 < r=5 -> BP exp(1 - 5/4)
    # b: p = 3/5, 2/4, 1/3, eps/2; c=5 > r=4 -> BP 1
    eps = 0.1
    a = math.exp(1 - 5 / 4) * (3 / 4 * 2 / 3 * 1 / 2 * eps) ** 0.25
    b = (3 / 5 * 2 / 4 * 1 / 3 * eps / 2) ** 0.25
    assert self_bleu([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == pytest.approx((a + b) / 2)
    # clipping: [7,7,7,7] gets one unigram match from [7,8,9,10]; its own counts never count
    # (and the reverse direction has the same precisions: one 7 matched, no bigram).
    clipped = (1 / 4 * eps / 3 * eps / 2 * eps / 1) ** 0.25
    assert self_bleu([[7, 7, 7, 7], [7, 8, 9, 10]]) == pytest.approx(clipped)
    assert self_bleu([[1, 2, 3]]) is None  # no other document to compare with


def test_two_shards_equal_one_shard(tmp_path: Path):
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 300, size=rng.integers(1, 60)).tolist() for _ in range(60)]
    docs[3] = docs[4] = [9] * 30
    one, two = tmp_path / "one", tmp_path / "two"
    write_shard(one / shard_name(0), docs, [""] * 60, [True] * 60)
    write_shard(two / shard_name(0), docs[:25], [""] * 25, [True] * 25)
    write_shard(two / shard_name(1), docs[25:], [""] * 35, [True] * 35)
    a = corpus_diversity(shard_paths(one), self_bleu_samples=20, seed=1)
    b = corpus_diversity(shard_paths(two), self_bleu_samples=20, seed=1)
    assert a == pytest.approx(b, rel=1e-12)
    cuts = [0, 2, 3, 10, 11, 30, 31, 60]  # uneven shards: exercises the buffered union merges
    for i in range(len(cuts) - 1):
        rows = docs[cuts[i] : cuts[i + 1]]
        write_shard(tmp_path / "many" / shard_name(i), rows, [""] * len(rows), [True] * len(rows))
    many = corpus_diversity(shard_paths(tmp_path / "many"), self_bleu_samples=20, seed=1)
    assert many == pytest.approx(a, rel=1e-12)
    assert a["documents"] == 60 and a["tokens"] == sum(map(len, docs))
    assert a["self_bleu_samples"] == 20
    flat, offsets = _arrays(docs)
    distinct, rep = distinct_n(flat, offsets), rep_n(flat, offsets)
    for n in range(1, 5):
        assert a[f"distinct_{n}"] == pytest.approx(distinct[n])
        assert a[f"rep_{n}"] == pytest.approx(rep[n])
    assert corpus_diversity(shard_paths(one), self_bleu_samples=500)["self_bleu_samples"] == 60
    # ids >= 2^16 (void keys for n = 4) across the same two shards
    big = [[t * 300 for t in d] for d in docs]
    write_shard(two / shard_name(0), big[:25], [""] * 25, [True] * 25)
    write_shard(two / shard_name(1), big[25:], [""] * 35, [True] * 35)
    assert corpus_diversity(shard_paths(two), self_bleu_samples=20, seed=1) == pytest.approx(a)


def test_what_a_corpus_cannot_define_is_missing_not_zero():
    """A metric with nothing to measure is None (shown as "-", left out of sweep means), never a
    0 that reads as a measurement: rep-4 of stories too short for a 4-gram is no "no
    repetition"."""
    flat = np.array([5, 5, 5], dtype=np.int64)
    offsets = np.array([0, 3, 3])  # "5 5 5" and an empty story
    assert rep_n(flat, offsets)[4] is None and distinct_n(flat, offsets)[4] is None
    assert rep_n(flat, offsets)[1] == pytest.approx(2 / 3)
