"""Non-word counts on texts whose answer is known by construction."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from collapse.corpus.parquet import shard_name, shard_paths, write_shard
from collapse.metrics.oov import (
    Lexicon,
    _item_texts,
    _work_items,
    build_lexicon,
    corpus_texts,
    count_oov,
    count_oov_shards,
    load_lexicon,
    save_lexicon,
)
from collapse.tokenizer import gpt2_tokenizer, train_bpe_tokenizer

NAME = "Brindlewick"  # invented: only the human corpus makes it a word
PLANTED = ["blorptax", "zindlewump", "frabjousk"]  # invented, several GPT-2 pieces each


def _human_texts() -> list[str]:
    texts = [
        f"{NAME} had a red ball. Lily and Tom played with {NAME} in the park. The end.",
        f"Once upon a time, {NAME} saw a big dog. The dog was happy.",
        f"{NAME} is gonna eat the cake, said Tom.",
    ]
    return texts * 2


@pytest.fixture(scope="module")
def lexicon() -> Lexicon:
    return build_lexicon(_human_texts(), min_count=3)


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def _pieces(tokenizer, word: str) -> int:
    return len(tokenizer.encode(" " + word, add_special_tokens=False))


def test_lexicon_holds_dictionary_and_frequent_corpus_words(lexicon: Lexicon):
    assert NAME.lower() in lexicon.words and "dog" in lexicon.words
    assert all(w not in lexicon.words for w in PLANTED)
    assert "park" in lexicon.words  # from the dictionary, though rare in the corpus
    assert lexicon.size == len(lexicon.words) > 50_000
    assert lexicon.name == "pyspellchecker-en+corpus(min_count=3)" and lexicon.version
    # 8 occurrences of the name: in with min_count=8, out with min_count=9
    assert NAME.lower() in build_lexicon(_human_texts(), min_count=8).words
    assert NAME.lower() not in build_lexicon(_human_texts(), min_count=9).words


def test_planted_nonwords_are_counted_and_names_are_not(lexicon: Lexicon, gpt2):
    for word in PLANTED:
        assert _pieces(gpt2, word) >= 2
    assert _pieces(gpt2, NAME) >= 2 and NAME.lower() not in build_lexicon([], 3).words
    assert _pieces(gpt2, "alot") == 1 and "alot" not in lexicon.words  # a one-piece misspelling
    text = (
        f"{NAME} saw a blorptax and a zindlewump near the frabjousk. {NAME} said alot. We gonna go."
    )
    result = count_oov([text], lexicon, gpt2)
    # spaCy words: 10 in the first sentence, 3 in the second, "We gon na go" = 4
    assert result["words"] == 17
    assert result["occurrences"] == 3 and result["distinct"] == 3
    assert result["rate_per_1000_words"] == pytest.approx(3000 / 17)
    assert sorted(w for w, _ in result["top"]) == sorted(PLANTED)
    assert result["lexicon"] == {
        "name": lexicon.name,
        "version": lexicon.version,
        "size": lexicon.size,
    }
    assert result["min_token_pieces"] == 2


def test_counts_are_lower_cased_and_ranked_with_alphabetical_ties(lexicon: Lexicon, gpt2):
    texts = ["Blorptax blorptax zindlewump.", "The zindlewump met a frabjousk."]
    result = count_oov(texts, lexicon, gpt2, top=2)
    assert result["occurrences"] == 5 and result["distinct"] == 3
    assert result["top"] == [["blorptax", 2], ["zindlewump", 2]]
    empty = count_oov([], lexicon, gpt2)
    assert empty["words"] == empty["occurrences"] == 0 and empty["rate_per_1000_words"] == 0.0


def test_gonna_is_a_word_through_its_norm(lexicon: Lexicon):
    # A tiny BPE makes "gon" several pieces, so only the norm check ("gon" -> "going") keeps
    # "gonna" out of the count.
    tok = train_bpe_tokenizer(_human_texts() * 10, vocab_size=300)
    assert _pieces(tok, "gon") >= 2 and "gon" not in lexicon.words and "going" in lexicon.words
    assert count_oov(["We are gonna play. Gonna run!"], lexicon, tok)["occurrences"] == 0
    # The same letters as a word of their own have no such norm, and are counted.
    assert count_oov(["The gon ran."], lexicon, tok)["occurrences"] == 1


def test_lexicon_round_trips_with_identical_bytes(lexicon: Lexicon, tmp_path: Path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_lexicon(lexicon, a)
    save_lexicon(load_lexicon(a), b)
    assert load_lexicon(a) == lexicon
    assert a.read_bytes() == b.read_bytes()
    b.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a"):
        load_lexicon(b)


def test_two_processes_give_the_same_counts(lexicon: Lexicon, gpt2, tmp_path: Path):
    texts = [f"Tom saw a {w} and a dog. {NAME} said hi." for w in PLANTED * 8]
    write_shard(tmp_path / shard_name(0), [[1]] * len(texts), texts, [True] * len(texts))
    assert list(corpus_texts(shard_paths(tmp_path))) == texts
    one = count_oov(corpus_texts(shard_paths(tmp_path)), lexicon, gpt2, batch_size=4)
    two = count_oov(texts, lexicon, gpt2, n_process=2, batch_size=4)
    assert one == two and one["occurrences"] == 24 and one["distinct"] == 3


# --- count_oov_shards -----------------------------------------------------------------------


def _corpus_texts() -> list[str]:
    # Non-words with different counts (and a tie), in mixed case, next to names and contractions,
    # so that a wrong split or merge changes the totals or the ranking.
    texts = []
    for i in range(45):
        word = PLANTED[i % 3].capitalize() if i % 2 else PLANTED[i % 3]
        texts.append(f"{NAME} saw a {word} and {i} dogs. Tom said alot. We gonna go, {NAME}!")
        if i % 5 == 0:
            texts.append(f"The Zindlewump met a quobbleflax near the park, {NAME} said.")
    return texts


@pytest.fixture(scope="module")
def gpt2_dir(gpt2, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    gpt2.save_pretrained(str(path))
    return path


def _write_corpus(root: Path, texts: list[str], shards: int) -> list[Path]:
    bounds = [len(texts) * i // shards for i in range(shards + 1)]
    for shard, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        part = texts[a:b]
        write_shard(root / shard_name(shard), [[1]] * len(part), part, [True] * len(part))
    return shard_paths(root)


def test_work_items_cover_the_rows_in_order(tmp_path: Path):
    texts = _corpus_texts()
    paths = _write_corpus(tmp_path / "three", texts, 3)
    assert [(i.path, i.start, i.stop) for i in _work_items(paths, 1, None)] == [
        (p, 0, len(texts) // 3) for p in paths
    ]
    assert [t for i in _work_items(paths, 2, None) for t in _item_texts(i)] == texts
    one = _write_corpus(tmp_path / "one", texts, 1)
    items = _work_items(one, 4, None)
    assert len(items) >= 4 and [t for i in items for t in _item_texts(i)] == texts
    assert sum(i.stop - i.start for i in _work_items(paths, 4, 20)) == 20
    # Row ranges that cut across several row groups read only what they need.
    table = pq.read_table(one[0])
    pq.write_table(table, one[0], row_group_size=7)
    assert pq.ParquetFile(one[0]).metadata.num_row_groups > 3
    assert [t for i in _work_items(one, 5, 31) for t in _item_texts(i)] == texts[:31]


def test_shards_give_exactly_count_oov(lexicon: Lexicon, gpt2, gpt2_dir: Path, tmp_path: Path):
    texts = _corpus_texts()
    three = _write_corpus(tmp_path / "three", texts, 3)
    one = _write_corpus(tmp_path / "one", texts, 1)
    expected = count_oov(texts, lexicon, gpt2, top=3)
    assert expected["occurrences"] == 45 + 2 * 9 and expected["distinct"] == 4
    assert expected["top"] == [["zindlewump", 24], ["blorptax", 15], ["frabjousk", 15]]
    for paths in (three, one):
        assert count_oov_shards(paths, lexicon, gpt2_dir, top=3) == expected
    # Two processes (row ranges of the shards); each pool costs ~1 s of start-up, so only two.
    assert count_oov_shards(three, lexicon, gpt2_dir, processes=2, top=3) == expected
    # max_documents keeps the corpus' first N documents (across a shard boundary, or of one
    # shard cut into row ranges).
    cap = len(texts) // 3 + 5
    capped = count_oov(texts[:cap], lexicon, gpt2)
    assert 0 < capped["words"] < expected["words"]
    assert count_oov_shards(three, lexicon, gpt2_dir, max_documents=cap) == capped
    assert count_oov_shards(one, lexicon, gpt2_dir, processes=2, max_documents=cap) == capped
    empty = count_oov_shards([], lexicon, gpt2_dir, processes=2)
    assert empty == count_oov([], lexicon, gpt2)
