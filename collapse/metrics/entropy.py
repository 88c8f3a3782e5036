"""Unigram token entropy of a corpus, computed shard by shard with numpy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from collapse.corpus.parquet import iter_tables, token_arrays


def entropy_from_counts(counts: np.ndarray) -> float | None:
    """Shannon entropy in bits of the distribution proportional to `counts`; None when every
    count is 0 (no distribution)."""
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return None
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # one type: 0.0, not -0.0


def corpus_entropy(paths: Sequence[Path], vocab_size: int) -> dict[str, float | int | None]:
    """Unigram entropy (bits) of token ids over a whole corpus, and how many distinct ids it uses.

    p(v) = count(v) / total tokens over the documents' own tokens; the EOS that closes a
    finished document is not counted (it is a boundary, and is reported separately).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    documents = finished = 0
    for table in iter_tables(paths, ["input_ids", "finished"]):
        flat, offsets = token_arrays(table)
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
        documents += len(offsets) - 1
        finished += int(np.asarray(table.column("finished")).sum())
    tokens = int(counts.sum())
    return {
        "entropy_bits": entropy_from_counts(counts),
        "distinct_tokens": int((counts > 0).sum()),
        "tokens": tokens,
        "documents": documents,
        "finished_fraction": finished / documents if documents else None,
        "mean_length": tokens / documents if documents else None,
        "vocab_size": vocab_size,
    }
