"""`sample` (generation g >= 1): the next corpus, drawn from generation g's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from collapse.config import without_neutral
from collapse.context import Context, load_model, load_run_tokenizer, stage_record
from collapse.stages.base import ChainStage

# Settings that do not change the sampled corpus (the pool's size, `sample.slots`, is left out
# of every hash by `without_neutral`).
OPERATIONAL = ("device",)


def _key(ctx: Context, gen: int) -> list[Any]:
    cfg = ctx.config
    sample = json.loads(cfg.sample.model_dump_json())
    for name in OPERATIONAL:
        sample.pop(name, None)
    return [
        without_neutral("sample", sample),
        cfg.run.seed,
        gen,
        stage_record(ctx, gen, "train")["digest"],
    ]


def _run(ctx: Context, gen: int, key: str) -> tuple[list[Path], dict[str, Any]]:
    from collapse.corpus.parquet import shard_paths
    from collapse.device import pick_device
    from collapse.sample import progress_shards, sample_corpus
    from collapse.seeding import derive_seed

    cfg = ctx.config
    device = pick_device(cfg.sample.device)
    model = load_model(ctx, gen, device)
    corpus_dir = ctx.store.corpus_dir(gen)
    progress_path = ctx.store.sample_progress_path(gen)
    # what a machine that was sampling this before saved (sample_corpus checks each shard)
    if ctx.store.restore_partial(progress_path):
        for name in progress_shards(progress_path):
            ctx.store.restore_partial(corpus_dir / name)
    ctx.log(f"gen {gen}: sampling {cfg.sample.num_sequences:,} sequences ({device})")
    stats = sample_corpus(
        model,
        load_run_tokenizer(ctx),
        cfg.sample,
        corpus_dir,
        seed=derive_seed(cfg.run.seed, "sample", gen),
        progress_path=progress_path,
        progress_key=key,
        device=device,
        progress=ctx.progress,
        log=ctx.log,
        saved=ctx.store.save_partial,
    )
    # The shards, not the folder: the progress file beside them is no output. It goes once
    # the record is written (`_finish`, here and at a URL root), so a kill while the shards
    # are hashed or published resumes with every shard done instead of sampling again.
    return shard_paths(corpus_dir), stats


def _finish(ctx: Context, gen: int) -> None:
    ctx.store.discard_partial(ctx.store.sample_progress_path(gen))


STAGE = ChainStage(
    name="sample",
    description="Ancestral sampling of the next generation's corpus from the start token.",
    version=1,
    needs_gpu=True,
    human=False,
    key_parts=_key,
    run=_run,
    finish=_finish,
)
