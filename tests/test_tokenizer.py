"""Tokenizers: the real GPT-2 BPE offline, and a BPE trained on the corpus."""

from __future__ import annotations

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
