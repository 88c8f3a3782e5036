"""`corpus` (generation 0): the human corpus, its validation split and the run's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from collapse.config import section_hash
from collapse.context import Context
from collapse.fingerprint import RECORDED, files_digest, key_digest
from collapse.stages.base import ChainStage

# The fingerprint of data/synthetic that every synthetic corpus was made from before the key
# read it (the data is unchanged since it was added, acdc2d3). At this value it stays out of
# the key, so no finished corpus is recomputed; any edit of the grammar makes a new corpus
# (the rule of `collapse.config.HASH_NEUTRAL` for what became a key after runs existed).
# Never update it.
SHIPPED_GRAMMAR = "2a016cd3667c0c0b74adfd93c9db49c337f95bba92dfaa94813f1bc928ee0f9c"


def _key(ctx: Context, gen: int) -> list[Any]:
    cfg = ctx.config
    parts = [section_hash(cfg.corpus), section_hash(cfg.tokenizer), cfg.run.seed]
    if cfg.corpus.source == "synthetic":
        from collapse.corpus.synthetic import grammar_fingerprint

        fingerprint = grammar_fingerprint()
        if fingerprint != SHIPPED_GRAMMAR:
            parts.append(fingerprint)
    if cfg.corpus.source == "local":  # the file's contents: it may be edited in place
        parts += key_digest(_local_files(cfg), ctx.store.read_record(gen, "corpus"))
    return parts


def _local_files(cfg: Any) -> dict[str, list[Path]]:
    return {"corpus": [Path(cfg.corpus.path).expanduser()]}


def _run(ctx: Context, gen: int, key: str) -> tuple[list[Path], dict[str, Any]]:
    from collapse.corpus.parquet import shard_name, write_shard
    from collapse.corpus.sources import load_documents
    from collapse.store import atomic_dir
    from collapse.tokenizer import build_tokenizer

    cfg, store = ctx.config, ctx.store
    ctx.log(f"loading the initial corpus ({cfg.corpus.source})")
    train_texts, val_texts = load_documents(cfg.corpus, cfg.run.seed)
    tok = build_tokenizer(
        cfg.tokenizer.name, train_texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency
    )
    with atomic_dir(store.tokenizer_dir()) as tmp:
        tok.save_pretrained(str(tmp))

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    corpus_dir = store.corpus_dir(0)
    for old in corpus_dir.glob("part-*.parquet"):
        old.unlink()
    size = cfg.sample.shard_size
    n_tokens = 0
    for index, start in enumerate(range(0, len(train_texts), size)):
        texts = train_texts[start : start + size]
        ids = encode(texts)
        n_tokens += sum(map(len, ids))
        write_shard(corpus_dir / shard_name(index), ids, texts, [True] * len(texts))
    val_ids = encode(val_texts)
    write_shard(store.validation_path(), val_ids, val_texts, [True] * len(val_texts))
    info = {
        "source": cfg.corpus.source,
        "train_documents": len(train_texts),
        "train_tokens": n_tokens,
        "validation_documents": len(val_texts),
        "validation_tokens": sum(map(len, val_ids)),
        "vocab_size": len(tok),
        "tokenizer": cfg.tokenizer.name,
    }
    if cfg.corpus.source == "local":
        info[RECORDED] = files_digest(_local_files(cfg))
    if cfg.corpus.source == "synthetic":
        from collapse.corpus.synthetic import load_grammar

        grammar = load_grammar()
        info["grammar"] = f"{grammar.name} {grammar.version}"
    ctx.log(
        f"corpus: {len(train_texts)} train / {len(val_texts)} validation documents, "
        f"{n_tokens} train tokens, vocabulary {len(tok)}"
    )
    return [corpus_dir, store.validation_path(), store.tokenizer_dir()], info


STAGE = ChainStage(
    name="corpus",
    description="Load the human corpus, cut the validation split, build the tokenizer, tokenize.",
    version=1,
    needs_gpu=False,
    human=True,
    key_parts=_key,
    run=_run,
)
