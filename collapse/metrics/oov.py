"""Non-words (out-of-vocabulary words) in generated text, segmented with spaCy.

A word-like spaCy token (`Token.is_alpha`) is a non-word when neither its lower-case form
(`lower_`) nor its normalised form (`norm_`) is in the lexicon AND it spans at least two pieces
of the run's tokenizer. The piece rule keeps single-token slips (which a model emits as one
vocabulary item, not as an invented spelling) out of the count; `norm_` catches spaCy's splits of
contractions such as "gonna" -> "gon" (norm "going") + "na".

The lexicon is pyspellchecker's English word list plus the word types that occur often enough
in the run's human (generation-0) corpus, so the corpus' own names ("Lily") count as words.

`Token.is_oov` is never used: it means "has no vector", which is true of every token in a blank
pipeline.

Counting is vectorised: spaCy's `Doc.to_array` gives the 64-bit hashes of every token's ORTH,
LOWER and NORM, membership is tested with numpy against the sorted hashes of the lexicon, and
Python only ever touches distinct word types (to name them and count their tokenizer pieces).

Parallelism: `count_oov_shards` splits a corpus' Parquet shards across worker processes, each
returning only its word count and a Counter of non-word types, and merges them into exactly
`count_oov`'s result. spaCy's own `nlp.pipe(n_process=...)` is not the way: it ships every Doc
back to the parent, which makes it several times slower than one process.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import multiprocessing
import multiprocessing.context
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import spacy
from spacy.attrs import IS_ALPHA, LOWER, NORM, ORTH
from spacy.language import Language
from spacy.strings import hash_string
from spacy.tokens import Doc

from collapse.corpus.parquet import iter_tables
from collapse.store import atomic_write_bytes

MIN_TOKEN_PIECES = 2
LEXICON_FORMAT = "collapse-lexicon-v1"

# Columns of the arrays taken from each Doc.
_ATTRS = [IS_ALPHA, ORTH, LOWER, NORM]
_COL_ALPHA, _COL_ORTH, _COL_LOWER, _COL_NORM = range(4)


@dataclass(frozen=True)
class Lexicon:
    """The set of lower-case strings that count as words.

    Attributes:
        words: the words, lower-cased.
        name: what the lexicon is made of, e.g. "pyspellchecker-en+corpus(min_count=3)".
        version: the version of the word list's source (pyspellchecker's package version).
    """

    words: frozenset[str]
    name: str
    version: str

    @property
    def size(self) -> int:
        """Number of words."""
        return len(self.words)


def _blank_nlp() -> Language:
    # A blank pipeline only tokenizes (rule-based, with the English exceptions), which is all
    # these metrics need, and it loads in well under a second with no model download.
    return spacy.blank("en")


def _spellchecker_words() -> tuple[frozenset[str], str]:
    from spellchecker import SpellChecker

    frequency = SpellChecker(language="en").word_frequency
    return frozenset(w.lower() for w in frequency.dictionary), importlib.metadata.version(
        "pyspellchecker"
    )


def _alpha_chunks(docs: Iterable[Doc], docs_per_chunk: int) -> Iterator[np.ndarray]:
    """(ORTH, LOWER, NORM, ...) hash rows of the word-like tokens, a few thousand docs at a time.

    Arrays are concatenated per chunk so the numpy work is amortised over many documents.
    """
    pending: list[np.ndarray] = []
    for doc in docs:
        if len(doc):
            rows = doc.to_array(_ATTRS).reshape(len(doc), len(_ATTRS))
            pending.append(rows[rows[:, _COL_ALPHA] == 1])
        if len(pending) >= docs_per_chunk:
            yield np.concatenate(pending)
            pending = []
    if pending:
        yield np.concatenate(pending)


def _hashes(words: Iterable[str]) -> np.ndarray:
    """Sorted spaCy hashes (as in `Doc.to_array`) of the given strings."""
    return np.sort(np.fromiter((hash_string(w) for w in words), dtype=np.uint64))


def _member(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Whether each value is in `sorted_keys`.

    A binary search against the lexicon's hashes, sorted once: `np.isin` would sort the whole
    lexicon again for every chunk of text.
    """
    if sorted_keys.size == 0:
        return np.zeros(values.shape, dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_keys, values), sorted_keys.size - 1)
    return sorted_keys[idx] == values


def build_lexicon(human_texts: Iterable[str], min_count: int = 3, *, n_process: int = 1) -> Lexicon:
    """pyspellchecker's English words plus the human corpus' frequent word types.

    Args:
        human_texts: the run's human (generation-0) documents, streamed.
        min_count: a lower-cased word-like token of the human corpus joins the lexicon when it
            occurs at least this many times (so rare typos in the human text stay out).
        n_process: spaCy worker processes (see `count_oov` on why 1 is faster).

    Returns:
        The lexicon.
    """
    nlp = _blank_nlp()
    counts: Counter[int] = Counter()
    for rows in _alpha_chunks(nlp.pipe(human_texts, batch_size=1000, n_process=n_process), 1000):
        keys, n = np.unique(rows[:, _COL_LOWER], return_counts=True)
        # Python touches each distinct type once per chunk, never each token.
        counts.update(dict(zip(keys.tolist(), n.tolist(), strict=True)))
    corpus_words = {nlp.vocab.strings[h] for h, n in counts.items() if n >= min_count}
    dictionary, version = _spellchecker_words()
    return Lexicon(
        words=dictionary | frozenset(corpus_words),
        name=f"pyspellchecker-en+corpus(min_count={min_count})",
        version=version,
    )


def save_lexicon(lexicon: Lexicon, path: Path) -> None:
    """Write a lexicon as JSON, atomically; the bytes depend only on the lexicon's content.

    Args:
        lexicon: the lexicon.
        path: the file to write.
    """
    payload = {
        "format": LEXICON_FORMAT,
        "name": lexicon.name,
        "version": lexicon.version,
        "size": lexicon.size,
        "words": sorted(lexicon.words),
    }
    # indent=0 puts one word per line: diffable, and still plain JSON.
    text = json.dumps(payload, ensure_ascii=False, indent=0, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def load_lexicon(path: Path) -> Lexicon:
    """Read a lexicon written by `save_lexicon`.

    Raises:
        ValueError: the file is not a lexicon, or its word count does not match its header.
    """
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(payload, dict) or payload.get("format") != LEXICON_FORMAT:
        raise ValueError(f"{path}: not a {LEXICON_FORMAT} file")
    words = frozenset(payload["words"])
    if len(words) != payload["size"]:
        raise ValueError(f"{path}: {len(words)} words, header says {payload['size']}")
    return Lexicon(words=words, name=payload["name"], version=payload["version"])


def _piece_counts(words: Sequence[str], tokenizer: Any) -> list[int]:
    """Tokenizer pieces of each word as it appears mid-text (after a space)."""
    # A byte-level BPE merges the leading space into the word ("Ġword"), so this is the
    # segmentation the model actually produced; one batched call encodes all the new types.
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


class _NonwordCounter:
    """Accumulates word-like tokens and non-word occurrences over any number of texts.

    The one implementation of the counting, shared by `count_oov` (in-process) and the workers
    of `count_oov_shards`.

    Args:
        known: sorted spaCy hashes of the lexicon's words (`_hashes(lexicon.words)`).
        tokenizer: the run's tokenizer, for the piece rule.
    """

    def __init__(self, known: np.ndarray, tokenizer: Any) -> None:
        self.nlp = _blank_nlp()
        self.known = known
        self.tokenizer = tokenizer
        self.pieces: dict[int, int] = {}  # ORTH hash -> tokenizer pieces: each spelling once
        self.words = 0
        self.nonwords: Counter[str] = Counter()

    def update(self, texts: Iterable[str], *, batch_size: int = 1000, n_process: int = 1) -> None:
        """Count the word-like tokens and non-words of `texts` into the running totals."""
        strings = self.nlp.vocab.strings
        docs = self.nlp.pipe(texts, batch_size=batch_size, n_process=n_process)
        for rows in _alpha_chunks(docs, batch_size):
            self.words += len(rows)
            lower, norm = rows[:, _COL_LOWER], rows[:, _COL_NORM]
            unknown = rows[~(_member(self.known, lower) | _member(self.known, norm))]
            if not len(unknown):
                continue
            orths, first, n = np.unique(
                unknown[:, _COL_ORTH], return_index=True, return_counts=True
            )
            orths_list = orths.tolist()
            new = [h for h in orths_list if h not in self.pieces]
            if new:
                counted = _piece_counts([strings[h] for h in new], self.tokenizer)
                self.pieces.update(zip(new, counted, strict=True))
            lowers = unknown[first, _COL_LOWER].tolist()
            for orth, lower, count in zip(orths_list, lowers, n.tolist(), strict=True):
                if self.pieces[orth] >= MIN_TOKEN_PIECES:
                    self.nonwords[strings[lower]] += count

    def take(self) -> tuple[int, Counter[str]]:
        """The totals so far (words, non-word counts), resetting them (the piece cache stays)."""
        out = (self.words, self.nonwords)
        self.words, self.nonwords = 0, Counter()
        return out


def _summary(words: int, nonwords: Counter[str], lexicon: Lexicon, top: int) -> dict[str, Any]:
    """The result dict of `count_oov` / `count_oov_shards` from the merged counts."""
    occurrences = sum(nonwords.values())
    ranked = sorted(nonwords.items(), key=lambda item: (-item[1], item[0]))
    return {
        "words": words,
        "occurrences": occurrences,
        "distinct": len(nonwords),
        "rate_per_1000_words": 1000.0 * occurrences / words if words else 0.0,
        "top": [[word, count] for word, count in ranked[:top]],
        "lexicon": {"name": lexicon.name, "version": lexicon.version, "size": lexicon.size},
        "min_token_pieces": MIN_TOKEN_PIECES,
    }


def count_oov(
    texts: Iterable[str],
    lexicon: Lexicon,
    tokenizer: Any,
    *,
    n_process: int = 1,
    batch_size: int = 1000,
    top: int = 20,
) -> dict[str, Any]:
    """Count the non-words of a stream of texts, in this process (see the module docstring).

    For a corpus on disk, `count_oov_shards` gives the same result and can use several cores.

    Args:
        texts: the documents, streamed (e.g. `corpus_texts(shard_paths(...))`).
        lexicon: the run's lexicon (`build_lexicon`).
        tokenizer: the run's tokenizer (a `transformers` tokenizer): pieces are counted with
            `tokenizer(" " + word, add_special_tokens=False)`, once per distinct spelling.
        n_process: spaCy worker processes (spaCy's own multiprocessing). Not recommended:
            results are identical, but with a tokenizer-only pipeline it is several times
            SLOWER than 1 (spaCy ships every Doc back with `to_bytes`/`from_bytes`, which costs
            more than the tokenizing itself; bench/metrics.py). Kept for compatibility; use
            `count_oov_shards(..., processes=N)` to parallelise.
        batch_size: documents per spaCy batch, and per vectorised counting step.
        top: how many of the most frequent non-words to list.

    Returns:
        JSON-serialisable: `words` (word-like tokens seen), `occurrences` (non-word tokens),
        `distinct` (distinct non-words, lower-cased), `rate_per_1000_words`, `top` ([word,
        count] pairs, most frequent first, ties alphabetical), `lexicon` (name, version,
        size) and `min_token_pieces`.
    """
    counter = _NonwordCounter(_hashes(lexicon.words), tokenizer)
    counter.update(texts, batch_size=batch_size, n_process=n_process)
    return _summary(*counter.take(), lexicon, top)


# --- shard-parallel counting ----------------------------------------------------------------


_ITEMS_PER_PROCESS = 8  # work items per worker process, at least (see _work_items)


@dataclass(frozen=True)
class _WorkItem:
    """Rows [start, stop) of one shard."""

    path: Path
    start: int
    stop: int


def _work_items(
    paths: Sequence[Path], processes: int, max_documents: int | None
) -> list[_WorkItem]:
    """The corpus' first `max_documents` rows (all if None), as shards or row ranges of shards.

    With one process, one item per shard. With several, a shard is cut into even contiguous row
    ranges when it holds more than 1 / (`processes` * `_ITEMS_PER_PROCESS`) of the corpus, into
    at most max(2, its share of the processes) ranges. So a corpus of one big shard gives every
    process one range, and with many shards the last items to finish are small, so workers are
    not left idle behind whole shards (100 shards of 10k rows on 16 processes: 200 items, ~96%
    busy, instead of 100 items, ~89%). The bound matters because each range costs decoding the
    shard's whole text column again (~1% of the time to count the shard).
    """
    spans: list[tuple[Path, int]] = []  # (shard, rows kept)
    left = max_documents
    for path in paths:
        if left is not None and left <= 0:
            break
        rows = pq.ParquetFile(path).metadata.num_rows
        if left is not None:
            rows = min(rows, left)
            left -= rows
        if rows:
            spans.append((Path(path), rows))
    total = sum(rows for _, rows in spans)
    limit = total if processes == 1 else -(-total // (processes * _ITEMS_PER_PROCESS))
    items: list[_WorkItem] = []
    for path, rows in spans:
        cuts = min(-(-rows // limit), max(2, -(-processes * rows // total)))
        bounds = [rows * i // cuts for i in range(cuts + 1)]
        items.extend(_WorkItem(path, a, b) for a, b in itertools.pairwise(bounds))
    return items


def _item_texts(item: _WorkItem) -> list[str]:
    """The `text` of an item's rows, reading only the row groups that hold them."""
    shard = pq.ParquetFile(item.path)
    groups, first, offset = [], None, 0
    for g in range(shard.metadata.num_row_groups):
        n = shard.metadata.row_group(g).num_rows
        if offset < item.stop and offset + n > item.start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return []
    table = shard.read_row_groups(groups, columns=["text"])
    return table.column("text").slice(item.start - first, item.stop - item.start).to_pylist()


_worker_counter: _NonwordCounter | None = None  # one per worker process (set by _init_worker)


def _init_worker(known: np.ndarray, tokenizer_dir: str) -> None:
    """Worker set-up: the lexicon's hashes (sent once per process) and the run's tokenizer."""
    global _worker_counter
    # Many workers each running the Rust tokenizer's own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from collapse.tokenizer import load_tokenizer

    _worker_counter = _NonwordCounter(known, load_tokenizer(tokenizer_dir))


def _count_item(item: _WorkItem) -> tuple[int, dict[str, int]]:
    """(words, non-word type -> occurrences) of one work item, in the current process."""
    assert _worker_counter is not None, "_init_worker was not run"
    _worker_counter.update(_item_texts(item))
    words, nonwords = _worker_counter.take()
    return words, dict(nonwords)


def _pool_context() -> multiprocessing.context.BaseContext:
    """The "forkserver" start method, with this module preloaded ("spawn" where unavailable).

    Never "fork": the parent may hold threads (torch, CUDA, the Rust tokenizer's pool) that a
    forked child would inherit in an undefined state. The forkserver is a fresh process, so its
    children are as clean as spawned ones, but it imports spaCy/transformers once (seconds) and
    forks every worker from there in milliseconds, where "spawn" makes every worker import
    them again: on 2 cores, a 2-worker spawn pool took ~12 s to start, a forkserver pool ~5 s
    the first time and ~0.05 s after (a later pool in the same process reuses the server).
    Either way each worker then loads the tokenizer and a blank spaCy pipeline (~0.5-1 s).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Process-wide, and only effective before the server first starts; "__main__" is the
    # default preload, kept. If the server is already running, workers import lazily instead.
    ctx.set_forkserver_preload(["__main__", __name__, "collapse.tokenizer", "spacy.lang.en"])
    return ctx


def count_oov_shards(
    paths: Sequence[Path],
    lexicon: Lexicon,
    tokenizer_dir: Path,
    *,
    processes: int = 1,
    max_documents: int | None = None,
    top: int = 20,
) -> dict[str, Any]:
    """`count_oov` over a corpus' Parquet shards, split across worker processes.

    The shards (or row ranges of them, so that every process has work to the end) are counted
    independently; each worker returns only its word count and a Counter of non-word types, and
    the merged result is exactly `count_oov(corpus_texts(paths)[:max_documents], ...)`.

    Args:
        paths: the shards, in corpus order (`shard_paths(...)`); column `text` is read.
        lexicon: the run's lexicon; workers receive its sorted hashes (~1 MB), not the words.
        tokenizer_dir: the run's tokenizer as saved by `save_pretrained` (`load_tokenizer`).
        processes: worker processes (e.g. `os.cpu_count()`); 1 counts in this process, with no
            pool. Workers start with the "forkserver" method ("spawn" where unavailable), so
            a script calling this needs the usual `if __name__ == "__main__":` guard.
        max_documents: count only the first N documents of the corpus (all if None).
        top: how many of the most frequent non-words to list.

    Returns:
        The same dict as `count_oov`.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    items = _work_items(paths, processes, max_documents)
    if not items:
        return _summary(0, Counter(), lexicon, top)
    known = _hashes(lexicon.words)
    words = 0
    nonwords: Counter[str] = Counter()
    if processes == 1 or len(items) == 1:
        from collapse.tokenizer import load_tokenizer

        counter = _NonwordCounter(known, load_tokenizer(tokenizer_dir))
        for item in items:
            counter.update(_item_texts(item))
        words, nonwords = counter.take()
    else:
        with ProcessPoolExecutor(
            max_workers=min(processes, len(items)),
            mp_context=_pool_context(),
            initializer=_init_worker,
            initargs=(known, str(tokenizer_dir)),
        ) as pool:
            for item_words, item_nonwords in pool.map(_count_item, items):
                words += item_words
                nonwords.update(item_nonwords)
    return _summary(words, nonwords, lexicon, top)


def corpus_texts(paths: Sequence[Path]) -> Iterator[str]:
    """Every document's `text`, shard by shard (one shard's text column in memory at a time)."""
    for table in iter_tables(paths, ["text"]):
        yield from table.column("text").to_pylist()
