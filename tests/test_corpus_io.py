"""Initial corpus sources (through `datasets`), splits, shards and packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collapse.config import CorpusConfig
from collapse.corpus.parquet import (
    documents,
    packed_stream,
    shard_name,
    shard_paths,
    write_shard,
)
from collapse.corpus.sources import CorpusSourceError, load_documents
from collapse.store import sha256_file


def _cfg(**kw) -> CorpusConfig:
    return CorpusConfig(**kw)


def test_txt_blocks_and_lines(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text("First story.\nStill first.\n\nSecond story.\n\n\nThird story.\n")
    train, val = load_documents(_cfg(source="local", path=str(path), validation_fraction=0.3), 1)
    assert sorted(train + val) == ["First story.\nStill first.", "Second story.", "Third story."]
    assert len(val) == 1
    cfg = _cfg(source="local", path=str(path), txt_mode="lines", validation_fraction=0.25)
    train, val = load_documents(cfg, 1)
    assert sorted(train + val) == ["First story.", "Second story.", "Still first.", "Third story."]


def test_jsonl_and_parquet_with_a_text_column(tmp_path: Path):
    rows = [{"story": f"story number {i}", "id": i} for i in range(40)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        cfg = _cfg(source="local", path=str(path), text_column="story")
        train, val = load_documents(cfg, 3)
        assert len(val) == 2 and len(train) == 38  # 5% holdout
        assert sorted(train + val) == sorted(r["story"] for r in rows)
    with pytest.raises(CorpusSourceError, match="no column 'text'"):
        load_documents(_cfg(source="local", path=str(jsonl)), 3)


def test_holdout_is_fixed_by_the_run_seed(story_file: Path):
    cfg = _cfg(source="local", path=str(story_file))
    assert load_documents(cfg, 5) == load_documents(cfg, 5)
    assert load_documents(cfg, 5)[1] != load_documents(cfg, 6)[1]


def test_max_documents_caps_the_corpus(story_file: Path):
    cfg = _cfg(source="local", path=str(story_file), max_documents=100)
    train, val = load_documents(cfg, 5)
    assert len(train) + len(val) == 100


def test_shards_round_trip_and_are_byte_stable(tmp_path: Path):
    ids, texts, fin = [[5, 6, 7], [8], []], ["a", "b", ""], [True, False, True]
    write_shard(tmp_path / shard_name(0), ids, texts, fin)
    first = sha256_file(tmp_path / shard_name(0))
    write_shard(tmp_path / shard_name(0), ids, texts, fin)
    assert sha256_file(tmp_path / shard_name(0)) == first
    table = pq.read_table(tmp_path / shard_name(0))
    assert table.column_names == ["input_ids", "text", "length", "finished"]
    assert table.column("length").to_pylist() == [3, 1, 0]
    assert list(documents(shard_paths(tmp_path))) == ids


def test_packing_joins_documents_with_eos(tmp_path: Path):
    write_shard(tmp_path / shard_name(0), [[5, 6], [7]], ["", ""], [True, True])
    write_shard(tmp_path / shard_name(1), [[8, 9, 10]], [""], [True])
    stream = packed_stream(shard_paths(tmp_path), end_id=0)
    assert stream.tolist() == [0, 5, 6, 0, 7, 0, 8, 9, 10, 0]
    assert stream.dtype == np.int32
    assert packed_stream(shard_paths(tmp_path), end_id=0, start_id=0).tolist() == stream.tolist()


def test_a_distinct_start_token_opens_every_document(tmp_path: Path):
    # Sampling and perplexity read every document after the start token: so must training.
    write_shard(tmp_path / shard_name(0), [[5, 6], [], [7]], ["", "", ""], [True] * 3)
    write_shard(tmp_path / shard_name(1), [[8]], [""], [True])
    stream = packed_stream(shard_paths(tmp_path), end_id=2, start_id=1)
    assert stream.tolist() == [1, 5, 6, 2, 1, 2, 1, 7, 2, 1, 8, 2]


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("c.jsonl", b'{"text": "a story"}\n{"text": \n', "JSON parse error"),
        ("c.parquet", b"not a parquet file", "Parquet magic bytes not found"),
        ("c.txt", b"\xff\xfe not utf-8\n\nmore\n", "UnicodeDecodeError"),
        ("c.jsonl", b"", "is empty"),
        ("c.parquet", b"", "is empty"),
    ],
)
def test_an_unreadable_local_corpus_names_corpus_path(
    tmp_path: Path, name: str, content: bytes, said: str
):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusSourceError, match="^corpus.path: ") as info:
        load_documents(_cfg(source="local", path=str(path)), 1)
    assert said in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_local_corpus_is_reported_when_it_is_read(tmp_path: Path):
    # config validation may accept it (a saved run whose corpus has moved must still load);
    # the corpus stage is where it has to exist
    (tmp_path / "stories.txt").write_text("A story.\n\nAnother story.\n")
    cfg = _cfg(source="local", path=str(tmp_path / "stories.txt"))
    (tmp_path / "stories.txt").unlink()
    with pytest.raises(CorpusSourceError, match="^corpus.path: .*stories.txt' does not exist"):
        load_documents(cfg, 1)
    (tmp_path / "stories.txt").mkdir()
    with pytest.raises(CorpusSourceError, match="^corpus.path: .* is not a file"):
        load_documents(cfg, 1)


@pytest.mark.parametrize("source", ["local", "synthetic"])
def test_loading_a_corpus_prints_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
):
    # Prefect's log_prints replaces `print` and logs whatever goes to sys.stdout, even while it
    # is redirected: `datasets` printed the bytecode of a filter lambda, and later of a function
    # inside its pickler of in-memory tables, into a redirected stdout while fingerprinting, 15
    # log lines in every corpus stage. Record every print instead.
    import builtins

    printed: list[str] = []
    real_print = builtins.print

    def recording_print(*args, **kwargs):
        printed.append(" ".join(map(str, args)))
        real_print(*args, **kwargs)

    monkeypatch.setattr(builtins, "print", recording_print)
    path = tmp_path / "stories.txt"
    path.write_text("A story.\n\nAnother story.\n\nA third one.\n")
    cfg = _cfg(source="local", path=str(path)) if source == "local" else _cfg(num_stories=20)
    train, _ = load_documents(cfg, 1)
    assert train and not any("LOAD_" in line for line in printed), printed
