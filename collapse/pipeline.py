"""The stages of a run as plain functions over the artifact store (no Prefect here).

Generation 0 holds the human corpus (train shards, validation set, tokenizer). Generation g >= 1
holds the model trained from scratch on generation g-1's corpus, the corpus sampled from it, and
its evaluations. Each stage has a key that chains the content digest of its inputs with its
config section and a version constant (bumped when the stage's output would change), and is
skipped when the manifest holds a valid record under that key. When a stage of the data chain
(corpus, train, sample) must be recomputed, every record downstream of it is dropped first, so
nothing computed from a stale parent survives, even if the run is killed midway.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from collapse.config import config_to_dict, section_hash
from collapse.context import (
    Context,
    corpus_digest,
    load_model,
    load_run_tokenizer,
    stage_record,
)
from collapse.corpus.parquet import packed_stream, shard_name, shard_paths, write_shard
from collapse.device import pick_device
from collapse.evals import REGISTRY, evaluation, write_result
from collapse.models import gpt_neo_config, init_model, resolve_model_fields
from collapse.seeding import derive_seed
from collapse.store import (
    StorageFullError,
    atomic_dir,
    atomic_write_json,
    sha256_json,
    storage_full,
)

# Bump a stage's version when a code change alters its output; only that stage and what depends
# on it are then recomputed (the git SHA is deliberately not part of any key). Evaluations carry
# their versions in the registry (collapse.evals).
STAGE_VERSIONS = {"corpus": 1, "train": 1, "sample": 1}
CHAIN_STAGES = ("corpus", "train", "sample")


def _version(stage: str) -> int:
    return STAGE_VERSIONS[stage] if stage in STAGE_VERSIONS else evaluation(stage).version


def _key(stage: str, *parts: Any) -> str:
    return sha256_json({"stage": stage, "version": _version(stage), "parts": parts})


def _without(section: Any, *names: str) -> dict[str, Any]:
    data = json.loads(section.model_dump_json())
    for name in names:
        data.pop(name, None)
    return data


def stage_key(ctx: Context, gen: int, stage: str) -> str:
    """The key a valid record of (`gen`, `stage`) must carry, from its inputs' digests."""
    cfg = ctx.config
    if stage == "corpus":
        return _key(stage, section_hash(cfg.corpus), section_hash(cfg.tokenizer), cfg.run.seed)
    if stage == "train":
        return _key(
            stage,
            resolve_model_fields(cfg.model),
            _without(cfg.train, "device", "checkpoint_every"),
            cfg.run.seed,
            gen,
            corpus_digest(ctx, gen - 1),
        )
    if stage == "sample":
        sample = _without(cfg.sample, "device")
        return _key(stage, sample, cfg.run.seed, gen, stage_record(ctx, gen, "train")["digest"])
    if stage.startswith("eval.") and stage.removeprefix("eval.") in REGISTRY:
        return _key(stage, *evaluation(stage).key_parts(ctx, gen))
    raise ValueError(f"unknown stage {stage!r}")


def stages_of(ctx: Context, gen: int) -> list[str]:
    """Stages of a generation in execution order."""
    metrics = [m for m in ctx.config.eval.metrics if REGISTRY[m].applies_to(ctx.config, gen)]
    chain = ["corpus"] if gen == 0 else ["train", "sample"]
    return chain + [f"eval.{m}" for m in metrics]


def valid_record(ctx: Context, gen: int, stage: str) -> dict[str, Any] | None:
    """The stage's record if it is done and its outputs intact, else None."""
    try:
        key = stage_key(ctx, gen, stage)
    except RuntimeError:  # a parent stage is not done
        return None
    return ctx.store.valid_record(gen, stage, key)


def _drop_downstream(ctx: Context, gen: int, stage: str) -> None:
    """Forget everything computed from (gen, stage), before recomputing it.

    A chain stage (corpus, train, sample) feeds every later stage of its generation and every
    later generation; an evaluation feeds nothing in its generation (a later generation's stage
    that reads it, like OOV reading generation 0's lexicon, carries its digest in its key).
    """
    if stage not in CHAIN_STAGES:
        ctx.store.drop_stage(gen, stage)
        return
    later = stages_of(ctx, gen)[stages_of(ctx, gen).index(stage) :]
    for name in later:
        ctx.store.drop_stage(gen, name)
    dropped = ctx.store.invalidate_from(gen + 1)
    if dropped:
        ctx.log(f"dropped the records of generations {dropped} (computed from stale inputs)")


def invalidate_from(ctx: Context, gen: int) -> None:
    """Make generations >= `gen` recompute from scratch (no mid-stage resume either)."""
    ctx.store.invalidate_from(gen)
    for g in ctx.store.generations_on_disk():
        if g >= gen:
            ckpt = ctx.store.gen_dir(g) / "train-state"
            shutil.rmtree(ckpt, ignore_errors=True)
            (ctx.store.gen_dir(g) / "corpus" / "_progress.json").unlink(missing_ok=True)


def run_stage(ctx: Context, gen: int, stage: str) -> dict[str, Any]:
    """Run one stage unless a valid record exists; returns the record (info has the results).

    Raises:
        StorageFullError: the disk filled up; the error names this generation and stage.
    """
    try:
        return _run_stage(ctx, gen, stage)
    except OSError as exc:  # a write outside the atomic helpers, e.g. an appended log
        full = storage_full(exc, Path(exc.filename or ctx.store.run_dir), errno_only=True)
        if full is None:
            raise
        full.stage = f"generation {gen}, stage {stage}"
        raise full from exc
    except StorageFullError as exc:
        # The failed write knows its filesystem; only here is it known which stage it served.
        exc.stage = f"generation {gen}, stage {stage}"
        raise


def _run_stage(ctx: Context, gen: int, stage: str) -> dict[str, Any]:
    key = stage_key(ctx, gen, stage)
    record = ctx.store.valid_record(gen, stage, key)
    if record is not None:
        return {**record, "reused": True}
    _drop_downstream(ctx, gen, stage)
    if stage in CHAIN_STAGES:
        runner = {"corpus": _run_corpus, "train": _run_train, "sample": _run_sample}[stage]
        outputs, info = runner(ctx, gen)
    else:
        name = stage.removeprefix("eval.")
        info, extra = evaluation(stage).run(ctx, gen)
        outputs = [write_result(ctx, gen, name, info), *extra]
    return {**ctx.store.record_stage(gen, stage, key, outputs, info), "reused": False}


# --- generation 0 -------------------------------------------------------------------------


def _run_corpus(ctx: Context, gen: int) -> tuple[list[Path], dict[str, Any]]:
    from collapse.corpus.sources import load_documents
    from collapse.tokenizer import build_tokenizer

    cfg = ctx.config
    gdir = ctx.store.gen_dir(0)
    ctx.log(f"loading the initial corpus ({cfg.corpus.source})")
    train_texts, val_texts = load_documents(cfg.corpus, cfg.run.seed)
    tok = build_tokenizer(
        cfg.tokenizer.name, train_texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency
    )
    with atomic_dir(gdir / "tokenizer") as tmp:
        tok.save_pretrained(str(tmp))

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    corpus_dir = gdir / "corpus"
    for old in shard_paths(corpus_dir):
        old.unlink()
    size = cfg.sample.shard_size
    n_tokens = 0
    for index, start in enumerate(range(0, len(train_texts), size)):
        texts = train_texts[start : start + size]
        ids = encode(texts)
        n_tokens += sum(map(len, ids))
        write_shard(corpus_dir / shard_name(index), ids, texts, [True] * len(texts))
    val_ids = encode(val_texts)
    write_shard(gdir / "validation.parquet", val_ids, val_texts, [True] * len(val_texts))
    info = {
        "source": cfg.corpus.source,
        "train_documents": len(train_texts),
        "train_tokens": n_tokens,
        "validation_documents": len(val_texts),
        "validation_tokens": sum(map(len, val_ids)),
        "vocab_size": len(tok),
        "tokenizer": cfg.tokenizer.name,
    }
    if cfg.corpus.source == "synthetic":
        from collapse.corpus.synthetic import load_grammar

        grammar = load_grammar()
        info["grammar"] = f"{grammar.name} {grammar.version}"
    ctx.log(
        f"corpus: {len(train_texts)} train / {len(val_texts)} validation documents, "
        f"{n_tokens} train tokens, vocabulary {len(tok)}"
    )
    return [corpus_dir, gdir / "validation.parquet", gdir / "tokenizer"], info


# --- generation g >= 1 --------------------------------------------------------------------


def _run_train(ctx: Context, gen: int) -> tuple[list[Path], dict[str, Any]]:
    from collapse.models import count_parameters
    from collapse.train import make_blocks, train_model

    cfg = ctx.config
    tok = load_run_tokenizer(ctx)
    gdir = ctx.store.gen_dir(gen)
    parent = shard_paths(ctx.store.gen_dir(gen - 1) / "corpus")
    blocks = make_blocks(packed_stream(parent, tok.eos_token_id), cfg.train.seq_len)
    model = init_model(
        gpt_neo_config(cfg.model, len(tok), tok.bos_token_id, tok.eos_token_id),
        derive_seed(cfg.run.seed, "init", gen),
    )
    device = pick_device(cfg.train.device)
    ctx.log(
        f"gen {gen}: training {count_parameters(model)['total']:,} parameters from scratch on "
        f"{blocks.size:,} tokens of generation {gen - 1} ({device})"
    )
    stats = train_model(
        model,
        blocks,
        cfg.train,
        data_seed=derive_seed(cfg.run.seed, "data", gen),
        device=device,
        checkpoint_path=gdir / "train-state" / "checkpoint.pt",
        checkpoint_key=stage_key(ctx, gen, "train"),
        progress=ctx.progress,
        log=ctx.log,
    )
    model.to("cpu")
    with atomic_dir(gdir / "model") as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    atomic_write_json(gdir / "train.json", stats)
    shutil.rmtree(gdir / "train-state", ignore_errors=True)
    info = {k: v for k, v in stats.items() if k != "losses"}
    info["parameters"] = count_parameters(model)
    ctx.log(f"gen {gen}: trained {stats['steps']} steps, final loss {stats['final_loss']:.4f}")
    return [gdir / "model", gdir / "train.json"], info


def _run_sample(ctx: Context, gen: int) -> tuple[list[Path], dict[str, Any]]:
    from collapse.metrics.entropy import corpus_entropy
    from collapse.sample import sample_corpus

    cfg = ctx.config
    device = pick_device(cfg.sample.device)
    tok = load_run_tokenizer(ctx)
    model = load_model(ctx, gen, device)
    corpus_dir = ctx.store.gen_dir(gen) / "corpus"
    ctx.log(f"gen {gen}: sampling {cfg.sample.num_sequences:,} sequences ({device})")
    stats = sample_corpus(
        model,
        tok,
        cfg.sample,
        corpus_dir,
        seed=derive_seed(cfg.run.seed, "sample", gen),
        progress_key=stage_key(ctx, gen, "sample"),
        device=device,
        progress=ctx.progress,
        log=ctx.log,
    )
    summary = corpus_entropy(shard_paths(corpus_dir), len(tok))
    stats.update(
        tokens=summary["tokens"],
        finished_fraction=summary["finished_fraction"],
        mean_length=summary["mean_length"],
    )
    return [corpus_dir], stats


# --- run-level ----------------------------------------------------------------------------


def freeze_config(ctx: Context) -> None:
    """Write config.yaml at first start; later starts must match it (except run.generations)."""
    import yaml

    from collapse.config import ConfigError, config_hash

    path = ctx.store.run_dir / "config.yaml"
    frozen_hash_path = ctx.store.run_dir / "config.sha256"
    current = config_hash(ctx.config)
    if frozen_hash_path.exists():
        frozen = frozen_hash_path.read_text().strip()
        if frozen != current:
            raise ConfigError(
                [
                    f"run.run_id: run {ctx.store.run_id!r} was started with a different config "
                    f"(see {path}); choose another run.run_id or leave it unset"
                ]
            )
    data = config_to_dict(ctx.config)
    from collapse.store import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
    atomic_write_bytes(frozen_hash_path, (current + "\n").encode())


def table_columns(config: Any) -> list[Any]:
    """The per-generation table's value columns: those of the configured evaluations."""
    return [c for m in config.eval.metrics for c in REGISTRY[m].columns]


def metrics_table(ctx: Context, generations: int | None = None) -> list[dict[str, Any]]:
    """One row per generation from the manifests: each evaluation's table values, and status.

    A value is None where its evaluation has not run (or does not apply, e.g. perplexity of
    the human corpus).
    """
    last = ctx.config.run.generations if generations is None else generations
    rows = []
    for gen in range(0, last + 1):
        stages = ctx.store.read_manifest(gen)["stages"]
        row: dict[str, Any] = {"generation": gen}
        for m in ctx.config.eval.metrics:
            info = stages.get(f"eval.{m}", {}).get("info", {})
            for column in REGISTRY[m].columns:
                row[column.key] = info.get(column.source)
        expected = stages_of(ctx, gen)
        row["stages_done"] = sum(s in stages for s in expected)
        row["stages_total"] = len(expected)
        rows.append(row)
    return rows
