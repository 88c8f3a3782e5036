"""Tokenizers: the real GPT-2 BPE offline, and a BPE trained on the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collapse.tokenizer import TokenizerError, build_tokenizer, gpt2_tokenizer, load_tokenizer


def test_gpt2_is_the_real_gpt2_bpe():
    tok = gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 50256
    assert tok.convert_ids_to_tokens(50256) == "<|endoftext|>"
    text = 'Once upon a time, "Lily" said: no!\n\nThe end.'
    assert tok.decode(tok(text)["input_ids"]) == text


def test_saved_tokenizer_reloads_identically(tmp_path: Path):
    tok = gpt2_tokenizer()
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert again("Hello world")["input_ids"] == [15496, 995]
    assert again.eos_token_id == 50256


def test_trained_bpe_is_deterministic_and_round_trips(tmp_path: Path):
    texts = [f"Tom had {n} red balls and a big dog. The dog was happy." for n in range(200)]
    a = build_tokenizer("bpe", texts, vocab_size=320)
    b = build_tokenizer("bpe", texts, vocab_size=320)
    assert len(a) == len(b) <= 320
    assert a.eos_token_id == 0 and a.convert_ids_to_tokens(0) == "<|endoftext|>"
    sample = "Tom had 7 red balls."
    assert a(sample)["input_ids"] == b(sample)["input_ids"]
    assert a.decode(a(sample)["input_ids"]) == sample
    a.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path)(sample)["input_ids"] == a(sample)["input_ids"]


def test_bpe_without_texts_is_an_error():
    with pytest.raises(ValueError, match="training texts"):
        build_tokenizer("bpe", None)


def _bos_eos_tokenizer(path: Path, texts: list[str]) -> Path:
    """A local tokenizer (as a hub one would be) whose BOS `<s>` differs from its EOS `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    wrapped.save_pretrained(str(path))
    return path


def test_a_tokenizer_with_its_own_bos_starts_documents_with_it_everywhere(tmp_path: Path):
    from collapse.config import Config
    from collapse.context import Context
    from collapse.corpus.parquet import packed_stream
    from collapse.pipeline import freeze_config, stage_key
    from collapse.store import RunStore
    from collapse.tokenizer import special_ids

    from .conftest import run_all, tiny_config_dict, write_story_file

    stories = write_story_file(tmp_path / "stories.txt", n=80)
    tok_dir = _bos_eos_tokenizer(tmp_path / "tok", stories.read_text().split("\n\n"))
    data = tiny_config_dict(stories, tmp_path / "art", generations=1)
    data["tokenizer"] = {"name": f"hub:{tok_dir}"}
    data["sample"].update(num_sequences=20, batch_size=20, shard_size=20)
    data["eval"] = {"metrics": ["perplexity", "entropy"]}
    ctx = Context(Config.model_validate(data), RunStore(tmp_path / "art", "bos"), log=print)
    freeze_config(ctx)
    records = run_all(ctx)
    tok = load_tokenizer(ctx.store.tokenizer_dir())
    start, end = special_ids(tok)
    assert (start, end) == (tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("</s>"))
    stream = packed_stream(sorted(ctx.store.corpus_dir(0).glob("part-*.parquet")), end, start)
    assert stream[0] == start and (stream == start).sum() == (stream == end).sum() == 76
    model_cfg = json.loads((ctx.store.model_dir(1) / "config.json").read_text())
    assert (model_cfg["bos_token_id"], model_cfg["eos_token_id"]) == (start, end)
    assert records[(1, "eval.perplexity")]["info"]["perplexity"] > 1
    # the start token is part of the training key only where it differs from the end token
    key = stage_key(ctx, 1, "train")
    data["tokenizer"] = {"name": "bpe", "vocab_size": 300}
    assert key != stage_key(Context(Config.model_validate(data), ctx.store), 1, "train")


def test_a_hub_tokenizer_that_cannot_be_loaded_names_tokenizer_name(tmp_path: Path):
    # a folder without tokenizer files (ValueError inside transformers) and a name that is no
    # valid repo id (OSError): both are what an unreachable hub with nothing cached looks like
    for name in (str(tmp_path), "/no/such/tokenizer"):
        with pytest.raises(TokenizerError, match=f"^tokenizer.name: cannot load 'hub:{name}'"):
            build_tokenizer(f"hub:{name}")


def test_a_hub_tokenizer_without_eos_names_tokenizer_name(tmp_path: Path):
    tok = build_tokenizer("bpe", ["a tiny corpus"] * 4, vocab_size=280)
    tok.eos_token = tok.bos_token = tok.pad_token = tok.unk_token = None
    tok.save_pretrained(str(tmp_path))
    with pytest.raises(TokenizerError, match="^tokenizer.name: .* has no EOS token"):
        build_tokenizer(f"hub:{tmp_path}")
