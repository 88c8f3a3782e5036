"""Model throughput: the reference GPT-Neo (transformers) vs ours (`fast`), side by side.

One process, the same weights and the same inputs for both. Cases:

- `train-demo`: one training step (forward, fp32 cross-entropy, backward, AdamW step; ours
  runs the output head and cross-entropy in chunks, `collapse.models.loss`) of
  configs/demo.yaml's model (2 layers, hidden 64, 4 heads, vocab 2048, 512 positions, window
  128) on a batch of 16 x 128 tokens, as the demo trains;
- `train-1m`: the same step for the TinyStories-1M preset (vocab 50257), 16 x 128;
- `forward-33m`: the inference forward (all logits) of the TinyStories-33M preset, 4 x 256;
- `sample-demo`: sampling `--stories` stories from the demo model: transformers' `generate`
  (`do_sample=True, top_k=0, top_p=1.0`) in static batches of `--sample-batch` against our
  continuous-batching sampler (`collapse.slot_sampler`) with as many slots. The random model gets
  a bias on the EOS logit (the same warper on both sides) so that story lengths are geometric
  with mean ~150 tokens, cut at `--max-new-tokens` (500: the demo model has 512 positions), like
  TinyStories samples (mean ~155, cap 600). Useful tokens are story tokens plus the closing EOS;
  a static batch also spends steps on rows that have ended, which is what this case measures.

Each side runs `--repeats` times, interleaved, and the best time of each is compared, so a noisy
neighbour hurts both alike. Prints tokens/s and the ratio. On CUDA the step runs under the
autocast `train.precision: auto` picks (bf16 where supported).

    python bench/throughput.py
    python bench/throughput.py --threads 1 --repeats 15   # steadier on a shared CPU
    python bench/throughput.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from collapse.config import ModelConfig
from collapse.device import autocast, autocast_dtype, pick_device
from collapse.models import implementation, resolve_model_fields
from collapse.models.gpt_neo_fast import from_state_dict
from collapse.models.gpt_neo_hf import gpt_neo_config

DEMO = ModelConfig(
    num_layers=2, hidden_size=64, num_heads=4, max_position_embeddings=512, window_size=128
)


@dataclass
class Case:
    model: ModelConfig
    vocab: int
    batch: int
    seq: int
    train: bool


CASES = {
    "train-demo": Case(DEMO, 2048, 16, 128, train=True),
    "train-1m": Case(ModelConfig(preset="tinystories-1m"), 50257, 16, 128, train=True),
    "forward-33m": Case(ModelConfig(preset="tinystories-33m"), 50257, 4, 256, train=False),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(case: Case, device: torch.device) -> dict[str, torch.nn.Module]:
    fields = resolve_model_fields(case.model)
    reference = implementation("transformers").build(fields, case.vocab, 0, 0, seed=0)
    # separate copies of the same weights: each side's optimizer updates its own
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    ours = from_state_dict(gpt_neo_config(fields, case.vocab, 0, 0), state)
    return {"reference (transformers)": reference.to(device), "ours (fast)": ours.to(device)}


def _step_fn(
    model: torch.nn.Module, case: Case, batch: torch.Tensor, device: torch.device
) -> Callable[[], None]:
    impl = implementation("fast" if type(model).__name__ == "GPTNeoFast" else "transformers")
    amp = autocast_dtype("auto", device)
    if not case.train:
        model.eval()

        def forward() -> None:
            with torch.inference_mode(), autocast(device, amp):
                impl.logits(model, batch)

        return forward
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=device.type == "cuda",
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = impl.loss(model, batch)
        loss.backward()
        optimizer.step()

    return step


def run_case(name: str, case: Case, device: torch.device, repeats: int) -> float:
    """Time both sides of one case; print and return the ratio ours / reference."""
    models = _models(case, device)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen).to(device)
    steps = {side: _step_fn(model, case, batch, device) for side, model in models.items()}
    for fn in steps.values():  # warm-up: allocator, kernels, optimizer state
        fn()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for side, fn in steps.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[side] = min(best[side], time.perf_counter() - start)
    tokens = case.batch * case.seq
    what = "train step" if case.train else "forward"
    print(f"{name}: {what}, batch {case.batch} x {case.seq}, vocab {case.vocab}")
    for side, seconds in best.items():
        print(f"  {side:26s} {seconds * 1000:9.1f} ms  {tokens / seconds:>12,.0f} tokens/s")
    ratio = best["reference (transformers)"] / best["ours (fast)"]
    print(f"  speed-up (ours / reference): {ratio:.2f}x")
    return ratio


class _EOSBias:
    """Adds `bias` to the EOS logit (a transformers logits processor and our warper alike)."""

    def __init__(self, eos: int, bias: float):
        self.eos, self.bias = eos, bias

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.eos] += self.bias
        return scores


def run_sampling(args: argparse.Namespace, device: torch.device) -> float:
    """Useful tokens/s of `generate` (static batches) vs our slots; prints the ratio."""
    import math

    from transformers import LogitsProcessorList

    from collapse.slot_sampler import sample_stories

    vocab, eos, n, batch = 2048, 0, args.stories, args.sample_batch
    fields = resolve_model_fields(DEMO)
    reference = implementation("transformers").build(fields, vocab, eos, eos, seed=0)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    ours = from_state_dict(gpt_neo_config(fields, vocab, eos, eos), state)
    reference, ours = reference.to(device).eval(), ours.to(device).eval()
    # near-uniform random logits: P(EOS) = e^b / (e^b + vocab - 1) = 1/150 at this bias
    bias = _EOSBias(eos, math.log((vocab - 1) / 149))
    results = {}

    def timed(side: str, fn: Callable[[], list[int]]) -> None:
        _sync(device)
        start = time.perf_counter()
        lengths = fn()
        _sync(device)
        results[side] = (time.perf_counter() - start, lengths)

    def generate() -> list[int]:
        lengths = []
        torch.manual_seed(0)
        for first in range(0, n, batch):
            rows = min(batch, n - first)
            with torch.inference_mode():
                out = reference.generate(
                    torch.full((rows, 1), eos, device=device),
                    attention_mask=torch.ones(rows, 1, dtype=torch.long, device=device),
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=args.max_new_tokens,
                    logits_processor=LogitsProcessorList([bias]),
                    pad_token_id=eos,
                    eos_token_id=eos,
                )
            for row in out[:, 1:].tolist():
                lengths.append(row.index(eos) + 1 if eos in row else len(row))
        return lengths

    def slots() -> list[int]:
        stories = sample_stories(
            ours,
            list(range(n)),
            key=0,
            max_new_tokens=args.max_new_tokens,
            start_id=eos,
            end_id=eos,
            slots=batch,
            warp=lambda scores: bias(None, scores),
            device=device,
        )
        return [len(tokens) + ended for _, tokens, ended in stories]

    timed("reference (generate)", generate)
    timed("ours (slots)", slots)
    print(
        f"sample-demo: {n} stories, batch/slots {batch}, max_new_tokens {args.max_new_tokens}, "
        f"vocab {vocab}"
    )
    for side, (seconds, lengths) in results.items():
        useful = sum(lengths)
        print(
            f"  {side:26s} {seconds:8.2f} s  {useful / seconds:>12,.0f} useful tokens/s  "
            f"(mean length {useful / len(lengths):.0f}, max {max(lengths)})"
        )
    ratio = (sum(results["ours (slots)"][1]) / results["ours (slots)"][0]) / (
        sum(results["reference (generate)"][1]) / results["reference (generate)"][0]
    )
    print(f"  speed-up (ours / reference): {ratio:.2f}x")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cases", nargs="+", choices=[*CASES, "sample-demo"], default=[*CASES, "sample-demo"]
    )
    parser.add_argument("--stories", type=int, default=400, help="sample-demo: stories")
    parser.add_argument("--sample-batch", type=int, default=200, help="sample-demo: batch/slots")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="sample-demo: cap")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"precision={autocast_dtype('auto', device) or 'fp32'} repeats={args.repeats}"
    )
    for name in args.cases:
        if name == "sample-demo":
            run_sampling(args, device)
        else:
            run_case(name, CASES[name], device, args.repeats)


if __name__ == "__main__":
    main()
