"""Short excerpts of randomly chosen documents, to show what a generation's text looks like."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import spacy
from spacy.language import Language

ELLIPSIS = "…"


def _sentencizer() -> Language:
    # spaCy's rule-based sentencizer on a blank pipeline: no model download, and it keeps
    # closing quotes and abbreviations ("Mr.") with their sentence.
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


def cut_excerpt(text: str, nlp: Language, max_words: int = 40) -> str:
    """Shorten a document to its first sentence, or to its first words.

    The result is the first sentence if it has at most `max_words` words, else the first
    `max_words` words followed by "…". Words are whitespace-separated, and whitespace is
    collapsed to single spaces. A text without a sentence end counts as one sentence.

    Args:
        text: the document.
        nlp: a pipeline with sentence boundaries (`_sentencizer()`).
        max_words: the word budget.
    """
    doc = nlp(text)
    first = next(iter(doc.sents), None)
    sentence = first.text.split() if first is not None else []
    if len(sentence) <= max_words:
        return " ".join(sentence)
    return " ".join(text.split()[:max_words]) + ELLIPSIS


def sample_excerpts(
    paths: Sequence[Path], k: int, seed: int, *, max_words: int = 40
) -> list[dict[str, Any]]:
    """Excerpts of k documents drawn uniformly without replacement from a corpus.

    Rows are counted from Parquet metadata, and only the row groups holding a chosen document
    are read (columns `text`, `length`, `finished`), so the cost does not grow with the corpus.

    Args:
        paths: the corpus shards, in order (global row index runs across them).
        k: documents to draw; every document when the corpus has fewer.
        seed: seed of `numpy.random.default_rng`; the result depends only on (corpus, k, seed).
        max_words: word budget of an excerpt (see `cut_excerpt`).

    Returns:
        One dict per document, by increasing `index` (global row index): `index`, `text` (the
        excerpt), `length` (tokens), `finished` (the document ended with EOS).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    files = [pq.ParquetFile(p) for p in paths]
    total = sum(f.metadata.num_rows for f in files)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(k, total), replace=False))
    nlp = _sentencizer()
    out: list[dict[str, Any]] = []
    start = 0
    for pf in files:
        meta = pf.metadata
        for g in range(meta.num_row_groups):
            size = meta.row_group(g).num_rows
            local = chosen[(chosen >= start) & (chosen < start + size)] - start
            if local.size:
                rows = pf.read_row_group(g, columns=["text", "length", "finished"]).take(local)
                for i, row in zip(local.tolist(), rows.to_pylist(), strict=True):
                    out.append(
                        {
                            "index": start + i,
                            "text": cut_excerpt(row["text"], nlp, max_words),
                            "length": int(row["length"]),
                            "finished": bool(row["finished"]),
                        }
                    )
            start += size
    return out
