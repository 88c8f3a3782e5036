"""Excerpts: a deterministic uniform draw of rows, cut to a sentence or a word budget."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from collapse.corpus.parquet import shard_name, shard_paths, write_shard
from collapse.metrics.excerpts import _sentencizer, cut_excerpt, sample_excerpts


def _corpus(root: Path) -> list[Path]:
    """Three shards, 7 + 5 + 9 rows; row i says its own index."""
    start = 0
    for shard, rows in enumerate([7, 5, 9]):
        idx = range(start, start + rows)
        write_shard(
            root / shard_name(shard),
            [[1] * (i + 1) for i in idx],
            [f"Story {i} begins here. It goes on." for i in idx],
            [i % 2 == 0 for i in idx],
        )
        start += rows
    return shard_paths(root)


def test_draw_is_deterministic_and_reads_the_right_rows(tmp_path: Path):
    paths = _corpus(tmp_path)
    a = sample_excerpts(paths, 6, seed=3)
    assert a == sample_excerpts(paths, 6, seed=3)
    assert [e["index"] for e in a] != [e["index"] for e in sample_excerpts(paths, 6, seed=4)]
    assert [e["index"] for e in a] == sorted({e["index"] for e in a}) and len(a) == 6
    for e in a:
        assert e["text"] == f"Story {e['index']} begins here."
        assert e["length"] == e["index"] + 1 and e["finished"] is (e["index"] % 2 == 0)


def test_more_than_the_corpus_returns_every_row(tmp_path: Path):
    paths = _corpus(tmp_path)
    every = sample_excerpts(paths, 100, seed=0)
    assert [e["index"] for e in every] == list(range(21))
    assert sample_excerpts(paths, 0, seed=0) == []


def test_row_groups_inside_a_shard(tmp_path: Path):
    paths = _corpus(tmp_path / "one")
    table = pq.read_table(paths[2])
    pq.write_table(table, paths[2], row_group_size=2)  # 9 rows in 5 row groups
    assert pq.ParquetFile(paths[2]).metadata.num_row_groups == 5
    every = sample_excerpts(paths, 100, seed=0)
    assert [e["text"] for e in every] == [f"Story {i} begins here." for i in range(21)]


def test_cut_rule():
    nlp = _sentencizer()
    assert cut_excerpt("One two three. Four five.", nlp, max_words=3) == "One two three."
    assert cut_excerpt('"Hi!" she   said.\nThen more.', nlp, max_words=5) == '"Hi!"'
    long = " ".join(f"w{i}" for i in range(50)) + ". Next."
    assert cut_excerpt(long, nlp, max_words=40) == " ".join(f"w{i}" for i in range(40)) + "…"
    assert cut_excerpt("One two three four. Five.", nlp, max_words=3) == "One two three…"
    assert cut_excerpt("no sentence end at all", nlp, max_words=40) == "no sentence end at all"
    assert cut_excerpt("a b c d e", nlp, max_words=2) == "a b…"
    assert cut_excerpt("", nlp) == ""
