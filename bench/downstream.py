"""Downstream fine-tuning: transformers' classifier vs ours, side by side, and the paper-scale time.

One process, the same weights and inputs for both sides. A fine-tuning step (forward, cross-
entropy, backward, AdamW step) at batch 8 is timed at several sequence lengths for

- the reference: `GPTNeoForSequenceClassification` (transformers), pooled by its pad-id search;
- ours: `collapse.downstream.finetune.SequenceClassifier` over `--implementation` (the same
  computation: tests/test_downstream.py checks the logits agree).

Each side runs `--repeats` times, interleaved; the best time of each is compared and the ratio
printed. Then the step times are interpolated over length to project one paper-scale pass of the
8 tasks (`--preset`, default TinyStories-33M): each task's training steps (examples x epochs / 8)
at its mean token length plus its evaluation (forward only, batch 32). Batches are bucketed by
length, so a batch's padded length is about the mean length. The mean lengths (GPT-2 tokens,
including the start token and the separator, cut at the task's max_length) are ESTIMATES from the
datasets' published word counts (no hub here): measure them where the data is (`--lengths-from`
a JSON {task: mean tokens}) before trusting the projection to better than ~30%.

    python bench/downstream.py                          # CPU: a few minutes
    python bench/downstream.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch
from timing import best_seconds

from collapse.config import ModelConfig
from collapse.device import autocast, autocast_dtype, pick_device
from collapse.downstream.finetune import SequenceClassifier
from collapse.models import implementation, resolve_model_fields
from collapse.models.gpt_neo_fast import from_state_dict
from collapse.models.gpt_neo_hf import gpt_neo_config

VOCAB, PAD = 50257, 50256
# task: (training examples, evaluation examples, epochs, estimated mean tokens)
PAPER_TASKS = {
    "imdb": (25_000, 25_000, 1.0, 290),
    "sst2": (67_349, 872, 1.0, 13),
    "yelp_polarity": (560_000, 38_000, 0.1, 180),
    "qqp": (363_846, 40_430, 1.0, 30),
    "qnli": (104_743, 5_463, 1.0, 52),
    "mrpc": (3_668, 408, 1.0, 54),
    "rte": (2_490, 277, 1.0, 72),
    "cola": (8_551, 1_043, 1.0, 12),
}


def _models(preset: str, impl: str, device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import GPTNeoForSequenceClassification

    fields = resolve_model_fields(ModelConfig(preset=preset))
    lm = implementation("transformers").build(fields, VOCAB, PAD, PAD, seed=0)
    config = gpt_neo_config(fields, VOCAB, PAD, PAD)
    config.num_labels, config.pad_token_id = 2, PAD
    reference = GPTNeoForSequenceClassification(config)
    reference.transformer.load_state_dict(lm.transformer.state_dict())
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    backbone = lm if impl == "transformers" else from_state_dict(config, state)
    ours = SequenceClassifier(backbone, 2, seed=0)
    reference.score.load_state_dict(ours.score.state_dict())
    return {"reference (transformers)": reference.to(device), f"ours ({impl})": ours.to(device)}


def _step_fn(
    name: str, model: torch.nn.Module, batch: int, length: int, device: torch.device, train: bool
) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, PAD, (batch, length), generator=gen).to(device)
    ids[:, 0] = PAD  # the start token (= pad, as in a GPT-2 vocabulary)
    lengths = torch.full((batch,), length, device=device)
    labels = torch.randint(0, 2, (batch,), generator=gen).to(device)
    amp = autocast_dtype("auto", device)
    fused = device.type == "cuda" and not name.startswith("reference")  # as fine_tune does
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0, fused=fused)
    reference = name.startswith("reference")

    def logits() -> torch.Tensor:
        with autocast(device, amp):
            return model(input_ids=ids).logits if reference else model(ids, lengths)

    def step() -> None:
        if not train:
            with torch.no_grad():
                logits()
            return
        loss = torch.nn.functional.cross_entropy(logits().float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train(train)
    return step


def main() -> None:
    """Time both sides per length, print the ratios and the paper-scale projection."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default="tinystories-33m")
    parser.add_argument("--implementation", default="fast", choices=["fast", "transformers"])
    parser.add_argument("--lengths", default="16,64,256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lengths-from", default=None, help="JSON {task: mean tokens}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    models = _models(args.preset, args.implementation, device)
    print(f"{args.preset} on {device}, batch 8 (train) / 32 (eval), best of {args.repeats}")
    table: dict[str, dict[tuple[str, int], float]] = {name: {} for name in models}
    for length in lengths:
        for mode, batch in (("train", 8), ("eval", 32)):
            fns = {
                name: _step_fn(name, m, batch, length, device, mode == "train")
                for name, m in models.items()
            }
            for fn in fns.values():
                fn()  # warm-up (allocator, kernels)
            for name, fn in fns.items():
                table[name][(mode, length)] = best_seconds(fn, device, args.repeats, args.steps)
            ref, ours = (table[n][(mode, length)] for n in models)
            print(
                f"  {mode:5s} len {length:4d}: reference {1000 * ref:8.1f} ms/step, "
                f"ours {1000 * ours:8.1f} ms/step, ratio {ref / ours:5.2f}x"
            )
    means = {t: v[3] for t, v in PAPER_TASKS.items()}
    if args.lengths_from:
        means.update(json.loads(open(args.lengths_from).read()))
    print("\nprojection of one paper-scale fine-tune per task (8 tasks):")
    totals = dict.fromkeys(models, 0.0)
    for task, (n_train, n_eval, epochs, _) in PAPER_TASKS.items():
        steps, eval_steps = int(np.ceil(n_train * epochs / 8)), int(np.ceil(n_eval / 32))
        row = []
        for name in models:
            per = {m: [table[name][(m, n)] for n in lengths] for m in ("train", "eval")}
            seconds = steps * np.interp(means[task], lengths, per["train"])
            seconds += eval_steps * np.interp(means[task], lengths, per["eval"])
            totals[name] += seconds
            row.append(f"{seconds / 60:7.1f} min")
        print(f"  {task:14s} {steps:6d} steps at ~{means[task]:3d} tokens: " + " | ".join(row))
    names = list(models)
    print(
        "  total: "
        + " | ".join(f"{n} {totals[n] / 3600:.2f} h" for n in names)
        + f"  (ratio {totals[names[0]] / totals[names[1]]:.2f}x); "
        "x9 for the paper's 8 judged generations plus the baseline"
    )


if __name__ == "__main__":
    main()
