"""One continuous-batching decode step, taken apart: where a sampling step's time goes.

`bench/throughput.py` times whole sampling runs; this times the parts of one step of
`collapse.slot_sampler.sample_stories` on a pool in its steady state, each part by itself,
with the reference way of doing it beside ours, in one process on the same inputs:

- `model step` (`FastGPTNeo.decode`: embeddings, blocks with the KV cache, final norm, output
  head): attention by SDPA over the furthest row's positions, masked per row (reference) vs
  FlashAttention-2's variable-length kernel over each row's own positions (ours; CUDA with a
  bf16/fp16 cache only, else it says why not);
- `draw` (softmax, then one token per row by inverse CDF): a float64 CDF over the whole
  vocabulary (reference) vs the two-level search of `collapse.sample.draw_tokens` (ours);
- `uniforms` (the counter-based random numbers of the slots' stories, `story_uniforms`).

A steady pool's rows sit at different positions: with story lengths geometric of mean
`--mean-length`, cut at `--max-new-tokens` (TinyStories samples: mean ~155, cap 600), a slot is
at position t with probability proportional to P(length > t), which is how positions are drawn
here (seeded). Each part runs `--steps` times after a warm-up, best of `--repeats`; per part it
prints ms per step, the ratio, and the useful tokens/s the parts together would allow
(slots / summed step time; the slot bookkeeping between steps is left out). The weights are
random (timing does not depend on them).

    python bench/decode_step.py --device cuda            # 33M, vocab 50257, 1024 and 4096 slots
    python bench/decode_step.py --device cuda --profile            # plus the top CUDA kernels
    python bench/decode_step.py --vocab 2048 --slots 32 --steps 2 --repeats 1  # a CPU smoke
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from timing import best_seconds, sync

from collapse.config import ModelConfig
from collapse.device import arithmetic_name, autocast, autocast_dtype, pick_device
from collapse.models import implementation, resolve_model_fields
from collapse.models.gpt_neo_fast import DecodeState, GPTNeoFast
from collapse.sample import draw_tokens, story_uniforms


def steady_positions(slots: int, mean: float, cap: int, seed: int) -> torch.Tensor:
    """Positions of a steady pool's slots: P(t) proportional to P(length > t) for geometric
    lengths of mean `mean` cut at `cap` (a truncated geometric, drawn by inverse CDF)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(slots, dtype=torch.float64, generator=gen)
    keep = math.log1p(-1.0 / mean)  # log P(a story goes on past a token)
    tail = math.exp(cap * keep)
    return torch.floor(torch.log1p(-u * (1 - tail)) / keep).long().clamp(max=cap - 1)


def _state_at(
    model: GPTNeoFast,
    positions: torch.Tensor,
    capacity: int,
    attention: str,
    start_id: int,
) -> DecodeState:
    """A decode state whose rows sit at `positions`, caches zero-filled."""
    device = positions.device
    _, state = implementation("fast").prefill(
        model,
        torch.full((positions.shape[0], 1), start_id, device=device),
        capacity=capacity,
        attention=attention,
    )
    for cache in (*state.keys, *state.values):
        cache.zero_()
    state.zeroed = capacity
    state.positions = positions.clone()
    state.span = int(positions.max())
    return state


def best_ms(device: torch.device, fn: Callable[[], object], steps: int, repeats: int) -> float:
    """Best over `repeats` of the mean time of `fn` over `steps` calls, in ms (after a warm-up)."""
    fn()
    return best_seconds(fn, device, repeats, steps) * 1e3


def _full_cdf_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The reference draw: a float64 CDF over the whole vocabulary (before 2026-12-07)."""
    cdf = probs.double().cumsum(dim=-1)
    found = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)
    return found.squeeze(1).clamp_(max=probs.shape[1] - 1)


def time_step(
    model: GPTNeoFast,
    slots: int,
    args: argparse.Namespace,
    device: torch.device,
    profile: bool = False,
) -> None:
    """Time the parts of one step of a steady pool of `slots` rows, both sides; print them."""
    eos = args.vocab - 1
    cap = args.max_new_tokens
    capacity = cap + args.steps * (args.repeats + 1) + 1  # room for every timed step
    positions = steady_positions(slots, args.mean_length, cap, seed=0).to(device)
    print(
        f"{slots} slots, positions mean {positions.double().mean():.0f} max {int(positions.max())}"
    )
    times: dict[str, dict[str, float]] = {"reference": {}, "ours": {}}
    ids = torch.randint(0, args.vocab, (slots,), device=device)
    stories = torch.arange(slots, device=device)
    state = None
    for side, attention in (("reference", "sdpa"), ("ours", "auto")):
        state = None  # one pool's cache at a time (~25 GB at 4096 slots)
        state = _state_at(model, positions, capacity, attention, eos)
        if side == "ours" and state.attention != "flash":
            print(f"  model step, ours: flash unavailable ({state.attention_note})")
        label = f"sdpa over {state.span + 1} slots" if side == "reference" else state.attention

        def step(state: DecodeState = state) -> object:
            return implementation("fast").decode(model, ids, state)[0]

        times[side][f"model step ({label})"] = best_ms(device, step, args.steps, args.repeats)
        del step
    logits = implementation("fast").decode(model, ids, state)[0].float()
    u = story_uniforms(0, stories, positions)
    times["reference"]["draw (full float64 CDF)"] = best_ms(
        device, lambda: _full_cdf_draw(torch.softmax(logits, -1), u), args.steps, args.repeats
    )
    times["ours"]["draw (draw_tokens)"] = best_ms(
        device, lambda: draw_tokens(torch.softmax(logits, -1), u), args.steps, args.repeats
    )
    for side in times:
        times[side]["uniforms"] = best_ms(
            device, lambda: story_uniforms(0, stories, positions), args.steps, args.repeats
        )
    totals = {side: sum(parts.values()) for side, parts in times.items()}
    for side, parts in times.items():
        print(f"  {side}:")
        for part, ms in parts.items():
            print(f"    {part:34s} {ms:8.3f} ms  ({ms / totals[side]:5.1%})")
        print(
            f"    {'total':34s} {totals[side]:8.3f} ms  -> "
            f"{slots / totals[side] * 1e3:,.0f} useful tokens/s at most"
        )
    ratio = totals["reference"] / totals["ours"]
    print(f"  speed-up of the step (ours / reference): {ratio:.2f}x")
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        state = _state_at(model, positions, capacity, "auto", eos)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                logits = implementation("fast").decode(model, ids, state)[0].float()
                draw_tokens(torch.softmax(logits, -1), story_uniforms(0, stories, positions))
            sync(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--preset", default="tinystories-33m")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument(
        "--slots", type=int, nargs="+", default=[1024, 4096], help="pool sizes, each timed"
    )
    parser.add_argument("--max-new-tokens", type=int, default=600)
    parser.add_argument("--mean-length", type=float, default=155.0)
    parser.add_argument("--steps", type=int, default=20, help="calls timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="auto", help="as sample.precision")
    parser.add_argument(
        "--profile", action="store_true", help="CUDA: top kernels of the first pool's step"
    )
    args = parser.parse_args()

    device = pick_device(args.device)
    amp = autocast_dtype(args.precision, device)
    fields = resolve_model_fields(ModelConfig(preset=args.preset))
    eos = args.vocab - 1
    model = implementation("fast").build(fields, args.vocab, eos, eos, seed=0).to(device).eval()
    print(f"{args.preset}, vocab {args.vocab}, {arithmetic_name(amp)}, {device}")
    with torch.inference_mode(), autocast(device, amp):
        for i, slots in enumerate(args.slots):
            time_step(model, slots, args, device, profile=args.profile and i == 0)


if __name__ == "__main__":
    main()
