"""Sampling throughput: collapse's sampler vs transformers' `generate`, side by side, one process.

Both draw pure ancestral samples (temperature 1, top-k and top-p off) from BOS with a KV cache,
with the same model, batch size and length; the reference is `model.generate(do_sample=True,
top_k=0, top_p=1.0)`. Each side runs `--repeats` times, interleaved, and the best time of each is
compared, so a noisy neighbour hurts both alike. Prints generated tokens/s and the ratio.

    python bench/sampler.py                          # the demo model on this machine's device
    python bench/sampler.py --preset tinystories-1m --batch 200 --max-new-tokens 600
"""

from __future__ import annotations

import argparse
import time

import torch
from throughput import DEMO
from timing import sync

from collapse.config import ModelConfig
from collapse.device import pick_device
from collapse.models import build_model, count_parameters
from collapse.sample import sample_batch


def _model_config(args: argparse.Namespace) -> ModelConfig:
    # both sides on the transformers model: `generate` is its method, and the race is between
    # the two sampling loops (the fast model's continuous batching is bench/throughput.py's)
    if args.preset:
        return ModelConfig(preset=args.preset, implementation="transformers")
    return DEMO.model_copy(update={"implementation": "transformers"})  # configs/demo.yaml's


def run_ours(model, args, device, bos: int, eos: int) -> int:
    seqs, ended = sample_batch(model, args.batch, args.max_new_tokens, bos, eos, device=device)
    return sum(len(s) for s in seqs) + sum(ended)


def run_reference(model, args, device, bos: int, eos: int) -> int:
    prompt = torch.full((args.batch, 1), bos, dtype=torch.long, device=device)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    new = out[:, 1:]
    # tokens up to and including the first EOS of each row
    is_eos = new == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
    return int(first.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tinystories-1m", "tinystories-33m"], default=None)
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (gpt2: 50257)")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    torch.set_grad_enabled(False)
    bos = eos = args.vocab - 1
    model = build_model(_model_config(args), args.vocab, bos, eos, seed=0)
    model.to(device).eval()
    params = count_parameters(model)["total"]
    print(
        f"device={device} params={params:,} vocab={args.vocab} batch={args.batch} "
        f"max_new_tokens={args.max_new_tokens} torch={torch.__version__}"
    )
    best = {"reference (generate)": float("inf"), "collapse (ours)": float("inf")}
    tokens = {}
    sides = {"reference (generate)": run_reference, "collapse (ours)": run_ours}
    for fn in sides.values():  # warm-up: allocator, kernels
        fn(model, argparse.Namespace(**{**vars(args), "max_new_tokens": 8}), device, bos, eos)
    for rep in range(args.repeats):
        for name, fn in sides.items():
            torch.manual_seed(rep)
            sync(device)
            start = time.perf_counter()
            n = fn(model, args, device, bos, eos)
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed < best[name]:
                best[name], tokens[name] = elapsed, n
    rates = {name: tokens[name] / best[name] for name in sides}
    for name in sides:
        print(
            f"{name:22s} {tokens[name]:>9,} tokens in {best[name]:7.3f} s  "
            f"{rates[name]:>12,.0f} tokens/s"
        )
    ratio = rates["collapse (ours)"] / rates["reference (generate)"]
    print(f"speed-up (ours / reference): {ratio:.2f}x")


if __name__ == "__main__":
    main()
