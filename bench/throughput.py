"""Model throughput: the reference GPT-Neo (transformers) vs ours (`fast`), side by side.

One process, the same weights and the same inputs for both. Cases:

- `train-demo`: one training step (forward, fp32 cross-entropy, backward, AdamW step) of
  configs/demo.yaml's model (2 layers, hidden 64, 4 heads, vocab 2048, 512 positions, window
  128) on a batch of 16 x 128 tokens, as the demo trains;
- `train-1m`: the same step for the TinyStories-1M preset (vocab 50257), 16 x 128;
- `forward-33m`: the inference forward (all logits) of the TinyStories-33M preset, 4 x 256.

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
from collapse.train import token_loss

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
            logits = impl.logits(model, batch)
        token_loss(logits, batch).backward()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
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
        run_case(name, CASES[name], device, args.repeats)


if __name__ == "__main__":
    main()
