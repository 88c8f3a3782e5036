"""Repetition and diversity of a token-id corpus: distinct-n, rep-n, Zipf coefficient, self-BLEU.

Everything is computed on token ids (the model's own units), shard by shard with numpy. An
n-gram is taken within one document only, never across a document boundary. The building blocks
are pure functions of a flat id array and document offsets (as `token_arrays` returns them):

- `distinct_n`: distinct n-grams / n-grams, over the whole corpus (Li et al. 2016).
- `rep_n`: mean over documents of 1 - distinct/total n-grams within the document (Welleck et
  al. 2020, "rep-n" of a sequence).
- `zipf_coefficient`: the slope s of log(frequency) = a - s log(rank) on the unigram counts.
- `self_bleu`: mean BLEU-4 of each sampled document against the other sampled ones (Zhu et al.
  2018, Texygen).

N-grams are encoded as one key each: the ids packed into a uint64 when n * bits(max id) <= 64
(n <= 4 for any vocabulary under 2^16 ids, e.g. GPT-2's 50257), else the raw bytes of the n
int32 ids as a numpy void scalar, which sorts and compares exactly but more slowly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collapse.corpus.parquet import iter_tables, token_arrays

# BLEU smoothing: a zero n-gram match count becomes this (NLTK's SmoothingFunction().method1).
BLEU_EPSILON = 0.1


def key_bits(max_id: int) -> int:
    """Bits per id when packing n-grams of ids in [0, max_id] into one integer."""
    return max(1, int(max_id).bit_length())


def _as_arrays(flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = np.asarray(flat)
    offsets = np.asarray(offsets, dtype=np.int64)
    if flat.size and int(flat.min()) < 0:
        raise ValueError("token ids must be >= 0")
    if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != flat.size:
        raise ValueError("offsets must run from 0 to len(flat)")
    return flat, offsets


def ngram_keys(
    flat: np.ndarray, offsets: np.ndarray, n: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """One key per within-document n-gram, and the index of the document holding it.

    Args:
        flat: token ids of all documents, concatenated (non-negative).
        offsets: document boundaries, len = documents + 1 (`token_arrays`).
        n: n-gram order (>= 1).
        bits: bits per id (`key_bits` of the largest id of the whole corpus, so keys from
            different shards are comparable).

    Returns:
        (keys, doc_ids) in corpus order. Keys are uint64 when n * bits <= 64, else void
        scalars of the n ids as int32 bytes.
    """
    flat, offsets = _as_arrays(flat, offsets)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per_doc = np.maximum(np.diff(offsets) - (n - 1), 0)
    doc_ids = np.repeat(np.arange(per_doc.size, dtype=np.int64), per_doc)
    # start of the i-th n-gram = i + (its document's offset - n-grams in earlier documents)
    shift = offsets[:-1] - (np.cumsum(per_doc) - per_doc)
    starts = np.arange(doc_ids.size, dtype=np.int64) + np.repeat(shift, per_doc)
    if n * bits <= 64:
        keys = flat[starts].astype(np.uint64)
        for j in range(1, n):  # in place, first id ends up in the high bits
            keys <<= np.uint64(bits)
            keys |= flat[starts + j].astype(np.uint64)
        return keys, doc_ids
    rows = np.ascontiguousarray(flat[starts[:, None] + np.arange(n)], dtype=np.int32)
    return rows.view(np.dtype((np.void, 4 * n))).reshape(-1), doc_ids


def _sorted_unique(sorted_keys: np.ndarray) -> np.ndarray:
    keep = np.ones(sorted_keys.size, dtype=bool)
    keep[1:] = sorted_keys[1:] != sorted_keys[:-1]  # the operator also compares void keys
    return sorted_keys[keep]


def _unique_and_repeats(
    keys: np.ndarray,
    doc_ids: np.ndarray,
    n_docs: int,
    key_width: int,
    *,
    force_general: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys, and per document how many of its n-grams repeat an earlier one.

    `key_width` is the number of bits the keys use (n * bits), ignored for void keys.
    Hand-written because numpy has no grouped "distinct per group" count; both paths are
    whole-array sorts, no Python loop over n-grams.
    """
    doc_bits = key_bits(max(n_docs - 1, 0))
    if keys.dtype == np.uint64 and key_width + doc_bits <= 64 and not force_general:
        # Fast path: (document, key) packed into one uint64 sorts with plain np.sort, several
        # times faster than an argsort; equal neighbours are repeats within a document.
        pairs = np.sort((doc_ids.astype(np.uint64) << np.uint64(key_width)) | keys)
        dup = pairs[1:] == pairs[:-1]
        repeats = np.bincount(
            (pairs[1:][dup] >> np.uint64(key_width)).astype(np.int64), minlength=n_docs
        )
        return _sorted_unique(np.sort(keys)), repeats
    # General path: a stable sort keeps equal keys in corpus order, and corpus order is
    # document order, so the occurrences of one n-gram in one document end up adjacent.
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_docs = keys[order], doc_ids[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    dup = same & (sorted_docs[1:] == sorted_docs[:-1])
    repeats = np.bincount(sorted_docs[1:][dup], minlength=n_docs)
    keep = np.ones(sorted_keys.size, dtype=bool)
    keep[1:] = ~same
    return sorted_keys[keep], repeats


def _ngram_stats(
    flat: np.ndarray, offsets: np.ndarray, n: int, bits: int
) -> tuple[np.ndarray, int, float, int]:
    """(sorted distinct keys, n-grams, sum over documents of rep-n, documents with an n-gram)."""
    keys, doc_ids = ngram_keys(flat, offsets, n, bits)
    n_docs = len(offsets) - 1
    unique, repeats = _unique_and_repeats(keys, doc_ids, n_docs, n * bits)
    totals = np.maximum(np.diff(offsets) - (n - 1), 0)
    has = totals > 0
    rep_sum = float((repeats[has] / totals[has]).sum())
    return unique, int(keys.size), rep_sum, int(has.sum())


def distinct_n(flat: np.ndarray, offsets: np.ndarray, n_max: int = 4) -> dict[int, float | None]:
    """Distinct-n for n = 1..n_max: distinct n-grams / n-grams (None when there are none).

    Args:
        flat: token ids of all documents, concatenated.
        offsets: document boundaries (len = documents + 1).
        n_max: largest n.
    """
    flat, offsets = _as_arrays(flat, offsets)
    bits = key_bits(int(flat.max()) if flat.size else 0)
    out = {}
    for n in range(1, n_max + 1):
        keys, _ = ngram_keys(flat, offsets, n, bits)
        distinct = _sorted_unique(np.sort(keys)).size  # a plain sort: no per-document work
        out[n] = distinct / keys.size if keys.size else None
    return out


def rep_n(flat: np.ndarray, offsets: np.ndarray, n_max: int = 4) -> dict[int, float | None]:
    """Rep-n for n = 1..n_max: mean over documents with >= 1 n-gram of 1 - distinct/total
    (None when no document has one).

    Args:
        flat: token ids of all documents, concatenated.
        offsets: document boundaries (len = documents + 1).
        n_max: largest n.
    """
    flat, offsets = _as_arrays(flat, offsets)
    bits = key_bits(int(flat.max()) if flat.size else 0)
    out = {}
    for n in range(1, n_max + 1):
        _, _, rep_sum, docs = _ngram_stats(flat, offsets, n, bits)
        out[n] = rep_sum / docs if docs else None
    return out


def zipf_coefficient(counts: np.ndarray) -> float | None:
    """Zipf exponent s of a frequency table: least-squares fit of log f = a - s log rank.

    Ranks 1..N are given to the N non-zero counts in decreasing order, each rank weighted
    equally (so the long tail dominates the fit, as in the usual log-log regression). numpy's
    `polyfit` (degree 1) is ordinary least squares, the same estimate as scikit-learn's
    `LinearRegression`, without building an estimator for one 1-D fit.

    Args:
        counts: occurrences per type (any order; zeros ignored).

    Returns:
        s (positive for Zipfian text; 1.0 for f proportional to 1/rank); None with fewer than
        two types (no slope to fit).
    """
    freq = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    freq = freq[freq > 0]
    if freq.size < 2:
        return None
    log_rank = np.log(np.arange(1, freq.size + 1, dtype=np.float64))
    slope, _ = np.polyfit(log_rank, np.log(freq), 1)
    return float(-slope)


def _clipped_matches(keys: np.ndarray, doc_ids: np.ndarray, n_docs: int) -> np.ndarray:
    """Per document, its n-grams matched in the OTHER documents, clipped (BLEU's numerator).

    A hypothesis n-gram counts at most as often as it occurs in the reference holding most of
    it; with every other document as a reference, that is the largest count among the other
    documents, i.e. the top count of that n-gram unless the hypothesis itself holds it, then
    the second-highest. Keeping the two highest counts per n-gram makes all hypotheses one
    vectorised pass instead of one pass per (hypothesis, reference) pair.
    """
    if keys.size == 0:
        return np.zeros(n_docs, dtype=np.float64)
    _, dense = np.unique(keys, return_inverse=True)  # small (sampled docs): any key dtype
    dense = dense.reshape(-1).astype(np.int64)
    n_keys = int(dense.max()) + 1
    pairs, counts = np.unique(doc_ids * n_keys + dense, return_counts=True)
    pair_doc, pair_key = pairs // n_keys, pairs % n_keys
    order = np.lexsort((-counts, pair_key))  # by n-gram, then count descending
    k, c, d = pair_key[order], counts[order], pair_doc[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    sizes = np.diff(np.r_[starts, k.size])
    top = np.zeros(n_keys, dtype=np.int64)
    top_doc = np.full(n_keys, -1, dtype=np.int64)
    second = np.zeros(n_keys, dtype=np.int64)
    top[k[starts]], top_doc[k[starts]] = c[starts], d[starts]
    two = starts[sizes >= 2]
    second[k[two]] = c[two + 1]
    ref_max = np.where(top_doc[pair_key] == pair_doc, second[pair_key], top[pair_key])
    clipped = np.minimum(counts, ref_max)
    return np.bincount(pair_doc, weights=clipped, minlength=n_docs)


def self_bleu(docs: Sequence[Sequence[int] | np.ndarray], max_n: int = 4) -> float | None:
    """Mean sentence BLEU of each document against all the others as references.

    Written here because no BLEU library is a dependency (nltk, sacrebleu). It follows NLTK's
    `sentence_bleu` with uniform weights 1/max_n and `SmoothingFunction().method1`: clipped
    (modified) n-gram precision with denominator max(1, hypothesis n-grams); a zero match count
    becomes `BLEU_EPSILON`; the score is 0 when no unigram matches; brevity penalty
    exp(1 - r/c) when c <= r, with r the reference length closest to c (the shorter on ties)
    and 0 for an empty hypothesis.

    Args:
        docs: token-id documents.
        max_n: highest n-gram order (4 = BLEU-4).

    Returns:
        The mean over documents; None with fewer than two documents (no references).
    """
    m = len(docs)
    if m < 2:
        return None
    arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    flat = np.concatenate(arrays)
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    bits = key_bits(int(flat.max()) if flat.size else 0)
    log_precision = np.zeros(m, dtype=np.float64)
    unigram_hit = np.zeros(m, dtype=bool)
    for n in range(1, max_n + 1):
        keys, doc_ids = ngram_keys(flat, offsets, n, bits)
        matched = _clipped_matches(keys, doc_ids, m)
        total = np.maximum(lengths - (n - 1), 1)
        precision = np.where(matched > 0, matched, BLEU_EPSILON) / total
        log_precision += np.log(precision) / max_n
        if n == 1:
            unigram_hit = matched > 0
    # closest other length; ties go to the shorter: minimise (|r - c|, r) lexicographically
    distance = np.abs(lengths[None, :] - lengths[:, None]) * (lengths.max() + 1) + lengths[None, :]
    np.fill_diagonal(distance, np.iinfo(np.int64).max)
    closest = lengths[np.argmin(distance, axis=1)]
    brevity = np.where(lengths > closest, 1.0, np.exp(1.0 - closest / np.maximum(lengths, 1)))
    scores = np.where(unigram_hit & (lengths > 0), brevity * np.exp(log_precision), 0.0)
    return float(scores.mean())


def _max_token_id(paths: Sequence[Path]) -> int:
    """Largest token id of the corpus, from Parquet column statistics where present."""
    best = -1
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if group.num_rows == 0:
                continue
            column = next(
                group.column(c)
                for c in range(group.num_columns)
                if group.column(c).path_in_schema.startswith("input_ids.")
            )
            stats = column.statistics
            if stats is not None and stats.has_min_max:
                best = max(best, int(stats.max))
            elif stats is None or stats.num_values != stats.null_count:
                # no statistics written: read this shard's ids once
                ids = pq.read_table(path, columns=["input_ids"]).column("input_ids")
                top = pc.max(pc.list_flatten(ids)).as_py()
                best = max(best, -1 if top is None else int(top))
                break
    return best


def _merge_unique(arrays: list[np.ndarray]) -> np.ndarray:
    """Union of sorted, duplicate-free key arrays, sorted and duplicate-free."""
    merged = np.concatenate(arrays)
    # Stable sort is timsort here, which merges the already-sorted runs in near-linear time.
    merged.sort(kind="stable")
    return _sorted_unique(merged)


def corpus_diversity(
    paths: Sequence[Path], *, n_max: int = 4, self_bleu_samples: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Distinct-n, rep-n, Zipf coefficient and self-BLEU of a corpus, streamed shard by shard.

    Distinct-n merges each shard's sorted distinct n-gram keys into a running union (shards are
    buffered and merged once they add up to the union's size, so each key is re-merged
    O(log shards) times). Memory is 8 bytes per distinct n-gram per n, plus up to twice that
    while merging, plus one shard's arrays: at paper scale (600M tokens per generation) the
    worst case is 4.8 GB per n (every n-gram distinct); a distinct-4 of 0.3 means about
    1.4 GB for n = 4, ~3 GB at the merge peak. Vocabularies with ids >= 2^16 use void keys of
    4n bytes instead of 8.

    Args:
        paths: the corpus shards (`input_ids` column).
        n_max: largest n-gram order.
        self_bleu_samples: documents drawn (uniformly, without replacement) for self-BLEU;
            all documents when the corpus has fewer.
        seed: seed of `numpy.random.default_rng` for that draw.

    Returns:
        JSON-serialisable: `distinct_1`..`distinct_{n_max}`, `rep_1`..`rep_{n_max}`,
        `zipf_coefficient`, `self_bleu`, `self_bleu_samples` (documents actually used),
        `documents`, `tokens`.
    """
    rows = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    documents = sum(rows)
    max_id = _max_token_id(paths)
    bits = key_bits(max(max_id, 0))
    sample = np.sort(
        np.random.default_rng(seed).choice(
            documents, size=min(self_bleu_samples, documents), replace=False
        )
    )
    unigrams = np.zeros(max_id + 1, dtype=np.int64)
    union: dict[int, np.ndarray] = {}
    pending: dict[int, list[np.ndarray]] = {n: [] for n in range(1, n_max + 1)}
    totals = dict.fromkeys(range(1, n_max + 1), 0)
    rep_sums = dict.fromkeys(range(1, n_max + 1), 0.0)
    rep_docs = dict.fromkeys(range(1, n_max + 1), 0)
    sampled: list[np.ndarray] = []
    first_row = 0
    for table, n_rows in zip(iter_tables(paths, ["input_ids"]), rows, strict=True):
        flat, offsets = token_arrays(table)
        unigrams += np.bincount(flat, minlength=max_id + 1)
        for n in range(1, n_max + 1):
            unique, total, rep_sum, docs = _ngram_stats(flat, offsets, n, bits)
            totals[n] += total
            rep_sums[n] += rep_sum
            rep_docs[n] += docs
            pending[n].append(unique)
            acc = union.get(n)
            if acc is None or sum(a.size for a in pending[n]) >= acc.size:
                union[n] = _merge_unique(([] if acc is None else [acc]) + pending[n])
                pending[n] = []
        local = sample[(sample >= first_row) & (sample < first_row + n_rows)] - first_row
        # copies, so the sample does not keep every shard's arrays alive
        sampled += [flat[offsets[i] : offsets[i + 1]].copy() for i in local]
        first_row += n_rows
    result: dict[str, Any] = {}
    for n in range(1, n_max + 1):
        parts = ([union[n]] if n in union else []) + pending[n]
        distinct = _merge_unique(parts).size if parts else 0
        result[f"distinct_{n}"] = distinct / totals[n] if totals[n] else None
    for n in range(1, n_max + 1):
        result[f"rep_{n}"] = rep_sums[n] / rep_docs[n] if rep_docs[n] else None
    result["zipf_coefficient"] = zipf_coefficient(unigrams)
    result["self_bleu"] = self_bleu(sampled)
    result["self_bleu_samples"] = len(sampled)
    result["documents"] = documents
    result["tokens"] = int(unigrams.sum())
    return result
