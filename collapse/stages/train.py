"""`train` (generation g >= 1): a fresh model trained from scratch on generation g-1's corpus.

What changes the trained model goes into the key: the architecture, the training settings
(not where or how often it checkpoints), the seed, the generation and the parent corpus. An
objective or a data regime that changes what the model is trained on belongs here too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from collapse.config import without_neutral
from collapse.context import Context, corpus_digest, corpus_shards, load_run_tokenizer
from collapse.regimes import REGIMES
from collapse.stages.base import ChainStage

# Settings that do not change the trained weights (`train.compile` is left out of every hash
# by `without_neutral`).
OPERATIONAL = ("device", "checkpoint_every")

# Facts about one training process, not about the model it made: the record's info keeps them,
# train.json does not. train.json's hash is part of the train digest that every later stage's
# key chains, so with wall times in it an identical retraining, or a resumed one, changed the
# keys of the generation's sampling and evaluations and recomputed them all.
PROCESS_FACTS = ("resumed_from_step", "seconds", "tokens_per_second", "device")


def _key(ctx: Context, gen: int) -> list[Any]:
    from collapse.models import resolve_model_fields

    cfg = ctx.config
    train = json.loads(cfg.train.model_dump_json())
    for name in OPERATIONAL:
        train.pop(name, None)
    parts = [
        resolve_model_fields(cfg.model),
        without_neutral("train", train),
        cfg.run.seed,
        gen,
        corpus_digest(ctx, gen - 1),
    ]
    reads = REGIMES[cfg.train.regime].reads(gen)
    if reads != [gen - 1]:  # the paper's regime keeps its keys; others chain every corpus read
        parts.append({"corpora": [corpus_digest(ctx, g) for g in reads]})
    if cfg.tokenizer.name.startswith("hub:"):
        # Only a tokenizer with a BOS distinct from EOS packs documents as start, doc, end
        # (collapse.corpus.parquet.packed_stream); GPT-2-style ones keep their old keys.
        from collapse.tokenizer import special_ids

        start_id, end_id = special_ids(load_run_tokenizer(ctx))
        if start_id != end_id:
            parts.append({"document_start": start_id})
    return parts


def training_stream(
    ctx: Context, gen: int, start_id: int, end_id: int
) -> tuple[Any, list[dict[str, int]]]:
    """The packed token stream generation `gen` trains on, and what went into it per corpus."""
    import functools

    import numpy as np

    from collapse.corpus.parquet import document_lengths, packed_stream
    from collapse.regimes import describe, select_documents
    from collapse.seeding import derive_seed

    lengths = functools.cache(lambda g: document_lengths(corpus_shards(ctx, g)))
    seed = derive_seed(ctx.config.run.seed, "regime", gen)
    selection = select_documents(gen, ctx.config.train, lengths, seed)
    pieces = [packed_stream(corpus_shards(ctx, g), end_id, start_id, keep) for g, keep in selection]
    if start_id == end_id:  # each piece opens with the shared boundary token: keep the first
        pieces = pieces[:1] + [piece[1:] for piece in pieces[1:]]
    return np.concatenate(pieces), describe(selection, lengths)


def _run(ctx: Context, gen: int, key: str) -> tuple[list[Path], dict[str, Any]]:
    from collapse.device import pick_device
    from collapse.models import build_model, count_parameters, save_model
    from collapse.seeding import derive_seed
    from collapse.store import atomic_dir, atomic_write_json
    from collapse.tokenizer import special_ids
    from collapse.train import make_blocks, train_model

    cfg, store = ctx.config, ctx.store
    tok = load_run_tokenizer(ctx)
    start_id, end_id = special_ids(tok)
    stream, corpora = training_stream(ctx, gen, start_id, end_id)
    blocks = make_blocks(stream, cfg.train.seq_len)
    model = build_model(
        cfg.model, len(tok), start_id, end_id, derive_seed(cfg.run.seed, "init", gen)
    )
    device = pick_device(cfg.train.device)
    parameters = count_parameters(model)
    ctx.log(
        f"gen {gen}: training {parameters['total']:,} parameters from scratch on "
        f"{blocks.size:,} tokens of generation {gen - 1} ({device})"
    )
    checkpoint = store.train_state_dir(gen) / "checkpoint.pt"
    store.restore_partial(checkpoint)  # saved by a machine that was training this before
    stats = train_model(
        model,
        blocks,
        cfg.train,
        data_seed=derive_seed(cfg.run.seed, "data", gen),
        device=device,
        checkpoint_path=checkpoint,
        checkpoint_key=key,
        progress=ctx.progress,
        log=ctx.log,
        saved=store.save_partial,
    )
    model.to("cpu")
    with atomic_dir(store.model_dir(gen)) as tmp:
        save_model(model, tmp)
        tok.save_pretrained(str(tmp))  # a model folder is usable on its own
    atomic_write_json(
        store.train_stats_path(gen), {k: v for k, v in stats.items() if k not in PROCESS_FACTS}
    )
    info = {k: v for k, v in stats.items() if k != "losses"}
    info["parameters"] = parameters
    info["corpora"] = corpora
    ctx.log(f"gen {gen}: trained {stats['steps']} steps, final loss {stats['final_loss']:.4f}")
    return [store.model_dir(gen), store.train_stats_path(gen)], info


def _finish(ctx: Context, gen: int) -> None:
    ctx.store.discard_partial(ctx.store.train_state_dir(gen))


STAGE = ChainStage(
    name="train",
    description="A fresh random init trained from scratch on the previous generation's corpus.",
    version=1,
    needs_gpu=True,
    human=False,
    key_parts=_key,
    run=_run,
    finish=_finish,
)
