"""Corpus shards on disk: Parquet files with one row per document.

Columns: `input_ids` (list<int32>, no BOS/EOS), `text` (decoded), `length` (len of input_ids),
`finished` (the document ended with EOS; always true for human text).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from collapse.store import atomic_path

SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("text", pa.string()),
        ("length", pa.int32()),
        ("finished", pa.bool_()),
    ]
)


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"part-{index:05d}.parquet"


def write_shard(
    path: Path, input_ids: Sequence[Sequence[int]], texts: Sequence[str], finished: Sequence[bool]
) -> None:
    """Atomically write one shard. Bytes depend only on the rows (stable across runs)."""
    table = pa.table(
        {
            "input_ids": pa.array([list(map(int, ids)) for ids in input_ids], pa.list_(pa.int32())),
            "text": pa.array(list(texts), pa.string()),
            "length": pa.array([len(ids) for ids in input_ids], pa.int32()),
            "finished": pa.array(list(finished), pa.bool_()),
        },
        schema=SCHEMA,
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def shard_paths(corpus_dir: Path) -> list[Path]:
    """The shards of a corpus folder, in order."""
    return sorted(corpus_dir.glob("part-*.parquet"))


def iter_tables(paths: Sequence[Path], columns: list[str]) -> Iterator[pa.Table]:
    """Stream the given columns shard by shard (never the whole corpus at once)."""
    for path in paths:
        yield pq.read_table(path, columns=columns)


def token_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Flat token ids and document offsets (len = docs + 1) of a table's `input_ids`."""
    col = table.column("input_ids").combine_chunks()
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return flat, offsets


def document_lengths(paths: Sequence[Path]) -> np.ndarray:
    """Token length of every document of a corpus, in order."""
    parts = [np.asarray(t.column("length"), dtype=np.int64) for t in iter_tables(paths, ["length"])]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def documents(paths: Sequence[Path]) -> Iterator[list[int]]:
    """Every document's token ids, in order."""
    for table in iter_tables(paths, ["input_ids"]):
        yield from table.column("input_ids").to_pylist()


def packed_stream(
    paths: Sequence[Path],
    end_id: int,
    start_id: int | None = None,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """All documents joined into one token stream for training.

    With one token for both ends (GPT-2's `<|endoftext|>`, `start_id` None or equal to
    `end_id`): end, doc, end, doc, end, ...: the leading token doubles as the start of the
    first document. With a distinct start token: start, doc, end, start, doc, end, ... Either
    way every document is read after the start token, as sampling and perplexity read it, and
    every end token after a document is a trained target, so models learn to end a story (the
    public code masked it; PROTOCOL.md).

    Args:
        paths: the corpus shards, in order.
        end_id: the token that ends a document.
        start_id: the token a document starts after (None: the same as `end_id`).
        keep: sorted indices (over the whole corpus) of the documents to pack; None: all.
    """
    shared = start_id is None or start_id == end_id
    pieces = [np.array([end_id], dtype=np.int32)] if shared else []
    first = 0  # corpus index of the table's first document
    for table in iter_tables(paths, ["input_ids"]):
        flat, offsets = token_arrays(table)
        if keep is not None:
            n = len(offsets) - 1
            local = keep[(keep >= first) & (keep < first + n)] - first
            first += n
            lengths = np.diff(offsets)[local]
            flat = np.concatenate([flat[offsets[i] : offsets[i + 1]] for i in local] or [flat[:0]])
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if shared:
            pieces.append(np.insert(flat, offsets[1:], end_id).astype(np.int32, copy=False))
            continue
        # start before each document, end after it; at a shared offset the end of one document
        # precedes the start of the next (np.insert keeps the order of equal positions).
        n = len(offsets) - 1
        where = np.stack([offsets[:-1], offsets[1:]], axis=1).ravel()
        values = np.tile(np.array([start_id, end_id], dtype=np.int64), n)
        pieces.append(np.insert(flat, where, values).astype(np.int32, copy=False))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
