"""Batched ancestral sampling of a corpus from the BOS token, written as Parquet shards.

The loop is ours rather than `model.generate` so that each shard draws from its own seeded RNG
(stream isolated with `fork_rng`), which makes a resumed corpus byte-identical to an
uninterrupted one, and so that tokens are drawn by inverse-CDF sampling: exact categorical
sampling like `torch.multinomial`, but about 10x cheaper on the CPU, where multinomial was
40% of sampling time. Logits warpers are transformers' own; with top-k/top-p off (the paper's
setting) the full distribution at temperature T is sampled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from collapse.corpus.parquet import shard_name, write_shard
from collapse.device import arithmetic_name, autocast, autocast_dtype
from collapse.faults import crash_point
from collapse.models import implementation_of
from collapse.seeding import derive_seed, seeded_torch
from collapse.store import atomic_write_json, sha256_file


def _warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


# Vocabularies at least this large are drawn from in two levels (see `draw_tokens`).
_TWO_LEVEL_VOCAB = 8192
_DRAW_BLOCK = 512


def draw_tokens(probs: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `probs` [batch, vocab], drawn by inverse CDF.

    The CDF is accumulated in float64 so that even tokens of probability ~1e-9 keep their mass.
    A token of probability 0 is never drawn.

    For a large vocabulary the search runs in two levels: the float64 mass of each block of
    `_DRAW_BLOCK` tokens (one read of `probs`), the block holding the target by a search over
    the block CDF, then the CDF within that block only. A full float64 CDF would write and
    read 8 bytes per token twice more: about 1.2 GB per decode step at 1024 slots x 50257
    tokens, nine times the 33M model's bf16 weights, on a GPU bound by memory traffic. The two
    ways differ only in float64 rounding of the partial sums, which moves a token boundary by
    ~1e-16 of the mass: the draws are the same but for targets that close to a boundary (no
    difference in the tests' ~3,000 rows of 50257 tokens). Smaller vocabularies (the demo's)
    keep the single full CDF.

    Args:
        probs: rows of (unnormalised) probabilities.
        u: float64 uniforms in [0, 1), one per row; default: drawn from the torch RNG.
    """
    rows, vocab = probs.shape
    if u is None:
        u = torch.rand(rows, dtype=torch.float64, device=probs.device)
    u = u.to(probs.device)[:, None]
    if vocab < _TWO_LEVEL_VOCAB:
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        found = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        return found.squeeze(1).clamp_(max=vocab - 1)
    block = _DRAW_BLOCK
    whole = vocab // block * block
    mass = probs[:, :whole].view(rows, -1, block).sum(-1, dtype=torch.float64)
    if whole < vocab:  # the short last block
        rest = probs[:, whole:].sum(-1, keepdim=True, dtype=torch.float64)
        mass = torch.cat([mass, rest], dim=1)
    block_cdf = mass.cumsum(dim=-1)
    target = u * block_cdf[:, -1:]
    chosen = torch.searchsorted(block_cdf, target, right=True)
    # a target the rounding put at the total takes the last block with mass
    chosen = torch.minimum(chosen, _last_positive(mass))
    before = block_cdf.gather(1, chosen) - mass.gather(1, chosen)
    columns = chosen * block + torch.arange(block, device=probs.device)
    inside = probs.gather(1, columns.clamp(max=vocab - 1)).double() * (columns < vocab)
    found = torch.searchsorted(inside.cumsum(dim=-1), target - before, right=True)
    # a target the rounding put past the block's own total takes its last token with mass
    return (chosen * block + torch.minimum(found, _last_positive(inside))).squeeze(1)


def _last_positive(values: torch.Tensor) -> torch.Tensor:
    """Per row of `values` [rows, n], the index of its last positive entry, as [rows, 1]."""
    index = torch.arange(values.shape[1], device=values.device)
    return torch.where(values > 0, index, -1).amax(dim=-1, keepdim=True)


def story_uniforms(key: int, stories: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """The uniforms of `stories` (global indices) for their token number `step` (0-based).

    `step` is one number for the whole batch (static batches) or one per story (slots).
    """
    from collapse.counter_rng import uniforms

    steps = torch.as_tensor(step, dtype=torch.long, device=stories.device)
    return uniforms(key, stories, steps.expand_as(stories))


@torch.inference_mode()
def sample_batch(
    model: torch.nn.Module,
    batch_size: int,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    device: torch.device | None = None,
    prefix: list[int] | None = None,
    stories: tuple[int, torch.Tensor] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Draw `batch_size` sequences from BOS (+ `prefix`).

    Args:
        prefix: token ids every sequence of the batch continues (a story beginning); one
            shared prefix keeps the batch unpadded.
        stories: (key, story indices [batch_size]): each row draws the counter-based uniforms
            of its story (`story_uniforms`), so its tokens do not depend on the other rows;
            default: the current torch RNG, shared by the batch.

    Returns:
        (new token ids of each sequence without BOS/prefix/EOS, whether it ended with EOS).
    """
    device = device or next(model.parameters()).device
    impl = implementation_of(model)
    warpers = _warpers(temperature, top_k, top_p)
    start = torch.tensor([bos_id, *(prefix or [])], dtype=torch.long, device=device)
    input_ids = start.expand(batch_size, -1)
    if impl.slots:  # a cache for the positions this batch can reach, not the whole context
        reach = min(input_ids.shape[1] + max_new_tokens, impl.context_length(model))
        last, state = impl.prefill(model, input_ids, capacity=reach)
    else:
        last, state = impl.prefill(model, input_ids)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        scores = warpers(input_ids, last.float())
        step = len(steps)
        u = None if stories is None else story_uniforms(stories[0], stories[1], step)
        nxt = draw_tokens(torch.softmax(scores, dim=-1), u)
        nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
        steps.append(nxt)
        finished |= nxt == eos_id
        if bool(finished.all()):
            break
        last, state = impl.decode(model, nxt, state)
    tokens = torch.stack(steps, dim=1).cpu().tolist() if steps else [[] for _ in range(batch_size)]
    seqs, ended = [], []
    for row in tokens:
        if eos_id in row:
            seqs.append(row[: row.index(eos_id)])
            ended.append(True)
        else:
            seqs.append(row)
            ended.append(False)
    return seqs, ended


def shard_sizes(num_sequences: int, shard_size: int) -> list[int]:
    """Sequences in each shard: full shards and a final partial one."""
    full, rest = divmod(num_sequences, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


def sample_corpus(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Any,
    out_dir: Path,
    *,
    seed: int,
    progress_key: str,
    progress_path: Path | None = None,
    device: torch.device,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    saved: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Sample `cfg.num_sequences` sequences into `out_dir/part-*.parquet`, resuming finished shards.

    Shard i is drawn with the seed derive_seed(seed, "shard", i) whatever happened before it,
    and `progress_path` (default: `out_dir/_progress.json`) records each finished shard's
    sha256, so a restarted run skips exactly the shards that are complete and intact. Stories
    start after the tokenizer's start token and end at its end token
    (`collapse.tokenizer.special_ids`). `saved`, if given, is called with each finished shard
    and then the progress file (e.g. to upload them, `RunStore.save_partial`). The progress
    file is left in place: the caller removes it once the shards are safe (recorded).

    Returns:
        Stats: sequences, shards, shards_reused, tokens (EOS excluded), finished_fraction,
        mean_length, precision (the model's arithmetic: `cfg.precision` on this device),
        and, where continuous batching decoded stories, decode: its `attention` (flash or
        sdpa, with why) and `cuda_graphs` (on, off, or off with why).
    """
    from collapse.tokenizer import special_ids

    start_id, end_id = special_ids(tokenizer)
    progress_path = progress_path or out_dir / "_progress.json"
    model.to(device)
    model.eval()
    done: dict[str, str] = {}
    if progress_path.exists():
        state = json.loads(progress_path.read_text())
        if state.get("key") == progress_key:
            done = state["shards"]
    sizes = shard_sizes(cfg.num_sequences, cfg.shard_size)
    stale = {p.name for p in out_dir.glob("part-*.parquet")} - {
        shard_name(i) for i in range(len(sizes))
    }
    for name in stale:
        (out_dir / name).unlink()
    counts = {"reused": 0, "tokens": 0, "finished": 0}
    if done and log:
        log(f"resuming sampling: {len(done)} of {len(sizes)} shards already written")
    bar = tqdm(total=cfg.num_sequences, disable=not progress, desc="sample", unit="seq")
    todo = []
    for index, size in enumerate(sizes):
        name = shard_name(index)
        path = out_dir / name
        if name in done and path.exists() and sha256_file(path) == done[name]:
            counts["reused"] += 1
            kept = pq.read_table(path, columns=["length", "finished"])
            counts["tokens"] += int(_column_sum(kept.column("length")))
            counts["finished"] += int(_column_sum(kept.column("finished")))
            bar.update(size)
        else:
            todo.append(index)

    def write(index: int, ids: list[list[int]], ended: list[bool]) -> None:
        counts["tokens"] += sum(map(len, ids))
        counts["finished"] += sum(ended)
        path = out_dir / shard_name(index)
        write_shard(path, ids, tokenizer.batch_decode(ids), ended)
        done[path.name] = sha256_file(path)
        atomic_write_json(progress_path, {"key": progress_key, "shards": done})
        if saved is not None:
            saved(path)
            saved(progress_path)
        crash_point("sample", index + 1)
        if log:
            log(f"shard {index + 1}/{len(sizes)} written")

    ends = (start_id, end_id)
    decode: dict[str, str] = {}  # how continuous batching ran (`sample_stories`' report)
    if cfg.rng == "story" and implementation_of(model).slots:
        shards = _slot_shards(model, cfg, todo, sizes, seed, ends, device, bar, decode)
    else:
        shards = _static_shards(model, cfg, todo, sizes, seed, ends, device, bar)
    # autocast is per thread and the generator runs inside this block: evaluations that run
    # beside sampling in other threads keep their own precision
    amp = autocast_dtype(cfg.precision, device)
    with autocast(device, amp):
        for index, ids, ended in shards:
            write(index, ids, ended)
    bar.close()
    # The progress file stays: removed once the shards are recorded (`RunStore.discard_partial`
    # in the stage's `finish`), a kill before that resumes with every shard done.
    n = cfg.num_sequences
    return {
        "shards": len(sizes),
        "shards_reused": counts["reused"],
        "sequences": n,
        "tokens": counts["tokens"],
        "finished_fraction": counts["finished"] / n,
        "mean_length": counts["tokens"] / n,
        "precision": arithmetic_name(amp),
        **({"decode": decode} if decode else {}),
    }


def progress_shards(progress_path: Path) -> list[str]:
    """The shard files a progress file lists as finished (any key), [] when unreadable."""
    try:
        return sorted(json.loads(progress_path.read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


Shard = tuple[int, list[list[int]], list[bool]]


def _static_shards(
    model: torch.nn.Module,
    cfg: Any,
    todo: list[int],
    sizes: list[int],
    seed: int,
    ends: tuple[int, int],
    device: torch.device,
    bar: Any,
) -> Iterator[Shard]:
    """The shards in `todo`, each sampled in batches that run until their longest story ends."""
    for index in todo:
        ids: list[list[int]] = []
        ended: list[bool] = []
        first = index * cfg.shard_size  # global index of the shard's first story
        with seeded_torch(derive_seed(seed, "shard", index), device):
            for start in range(0, sizes[index], cfg.batch_size):
                n = min(cfg.batch_size, sizes[index] - start)
                rows = torch.arange(first + start, first + start + n)
                seqs, fin = sample_batch(
                    model,
                    n,
                    cfg.max_new_tokens,
                    *ends,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    device=device,
                    stories=(seed, rows) if cfg.rng == "story" else None,
                )
                ids += seqs
                ended += fin
                bar.update(n)
        yield index, ids, ended


def _slot_shards(
    model: torch.nn.Module,
    cfg: Any,
    todo: list[int],
    sizes: list[int],
    seed: int,
    ends: tuple[int, int],
    device: torch.device,
    bar: Any,
    report: dict[str, str],
) -> Iterator[Shard]:
    """The shards in `todo` from one pool of `cfg.slots` (default `cfg.batch_size`) slots.

    The pool runs across shard boundaries (no shard drains it); a shard is yielded once its
    last story has ended, so shards come out in about, not exactly, their order. `report` is
    filled with how the decode steps ran (attention, CUDA graphs).
    """
    from collapse.slot_sampler import sample_stories

    warpers = _warpers(cfg.temperature, cfg.top_k, cfg.top_p)
    pending: dict[int, dict[int, tuple[list[int], bool]]] = {i: {} for i in todo}
    stories = [i * cfg.shard_size + j for i in todo for j in range(sizes[i])]
    for story, ids, ended in sample_stories(
        model,
        stories,
        key=seed,
        max_new_tokens=cfg.max_new_tokens,
        start_id=ends[0],
        end_id=ends[1],
        slots=cfg.slots or cfg.batch_size,
        # the warpers read only the scores (input_ids are for repetition penalties)
        warp=(lambda scores: warpers(None, scores)) if warpers else None,
        device=device,
        cuda_graphs=cfg.cuda_graphs,
        report=report,
    ):
        index = story // cfg.shard_size
        pending[index][story] = (ids, ended)
        bar.update(1)
        if len(pending[index]) == sizes[index]:
            shard = pending.pop(index)
            rows = [shard[k] for k in sorted(shard)]
            yield index, [r[0] for r in rows], [r[1] for r in rows]


def _column_sum(column: Any) -> int:
    """Sum of an integer or boolean Arrow column."""
    import pyarrow.compute as pc

    return pc.sum(pc.cast(column, "int64")).as_py() or 0
