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

Paper-scale cases (the default on CUDA, too slow for a CPU):

- `train-33m`: the training step of the TinyStories-33M preset at the paper's micro-batch,
  80 x 512;
- `sample-33m`: `sample-demo`'s race with the 33M preset (vocab 50257, cap 600, as the paper
  samples), 8192 stories over 1024 slots/batch.

Each side runs `--repeats` times, interleaved, and the best time of each is compared, so a noisy
neighbour hurts both alike. Prints tokens/s and the ratio. On CUDA the step runs under the
autocast `train.precision: auto` picks (bf16 where supported), sampling under the autocast of
`--sample-precision` (default `auto`, as the `sample` stage's `sample.precision`: bf16 where
supported; `fp32` is the exact arithmetic the stage used before 2026-12-07), and each case also
prints its peak GPU memory and how close it gets to the
hardware: MFU (model FLOPs per second over the bf16 matmul rate measured at the start; model
FLOPs = 6 x the parameters that multiply (the tied output head included) + the attention's
scores and mixing over the keys each position sees (causal, 256-token window on local layers),
x3 for forward and backward) for training, and for sampling the fraction of the bandwidth floor
(each decode step reads the weights once, each token reads the keys and values it attends to;
memory bandwidth measured at the start by a large copy). Where a `train-X` and a `sample-X` case
ran, it projects one paper-scale generation (`--paper-stories` stories of `--story-tokens`
tokens, EOS included; training `--epochs` epochs over them, sampling them once; evaluations and
fine-tuning left out) and 40 of them, for ours and for the reference. Training there is timed a
micro-batch per optimizer step (the run accumulates 4): the optimizer's share is over-counted.

    python bench/throughput.py
    python bench/throughput.py --threads 1 --repeats 15   # steadier on a shared CPU
    python bench/throughput.py --device cuda --repeats 10
    python bench/throughput.py --cases train-33m sample-33m --stories 64 --sample-batch 16 \
        --train-batch 2 --train-seq 512 --repeats 1        # the paper cases, shrunk for a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timing import sync

from collapse.config import ModelConfig
from collapse.device import arithmetic_name, autocast, autocast_dtype, pick_device
from collapse.models import implementation, implementation_of, resolve_model_fields
from collapse.models.gpt_neo_fast import compiled_trunk, from_state_dict
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


PRESET_33M = ModelConfig(preset="tinystories-33m")

CASES = {
    "train-demo": Case(DEMO, 2048, 16, 128, train=True),
    "train-1m": Case(ModelConfig(preset="tinystories-1m"), 50257, 16, 128, train=True),
    "forward-33m": Case(PRESET_33M, 50257, 4, 256, train=False),
    "train-33m": Case(PRESET_33M, 50257, 80, 512, train=True),
}


@dataclass
class SampleCase:
    model: ModelConfig
    vocab: int
    stories: int
    slots: int
    max_new_tokens: int


SAMPLE_CASES = {
    # the demo model has 512 positions: cap 500
    "sample-demo": SampleCase(DEMO, 2048, 400, 200, 500),
    "sample-33m": SampleCase(PRESET_33M, 50257, 8192, 1024, 600),
}
PAPER_CASES = ("train-33m", "sample-33m")
GENERATIONS = 40


@dataclass
class Hardware:
    """What the device can do at best, measured: bf16 matmul FLOP/s and copy bytes/s."""

    flops: float
    bandwidth: float


def measure_hardware(device: torch.device) -> Hardware | None:
    """The bf16 matmul rate (8192^3, best of 10) and memory bandwidth (a 1 GiB copy read and
    written, best of 10) of a CUDA device; None elsewhere (no floor worth quoting on a CPU)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    x = torch.empty(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)

    def best(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(10):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    flops = 2 * n**3 / best(lambda: a @ b)
    bandwidth = 2 * x.numel() * x.element_size() / best(lambda: y.copy_(x))
    print(f"measured: bf16 matmul {flops / 1e12:,.0f} TFLOP/s, copy {bandwidth / 1e9:,.0f} GB/s")
    return Hardware(flops, bandwidth)


def _layer_kinds(fields: dict, vocab: int) -> list[str]:
    return list(gpt_neo_config(fields, vocab, 0, 0).attention_layers)


def _keys_seen(kind: str, position: int, window: int) -> int:
    """Keys a query at `position` (0-based) attends to."""
    return position + 1 if kind == "global" else min(position + 1, window)


def train_flops_per_token(case: Case) -> float:
    """Model FLOPs of one trained token: forward and backward of every multiplying weight and of
    attention over the keys each position sees (see the module docstring)."""
    fields = resolve_model_fields(case.model)
    hidden, window = fields["hidden_size"], fields["window_size"]
    inner = fields["intermediate_size"] or 4 * hidden
    weights = fields["num_layers"] * (4 * hidden * hidden + 2 * hidden * inner)
    weights += case.vocab * hidden  # the tied output head
    keys = (
        sum(
            _keys_seen(kind, t, window)
            for kind in _layer_kinds(fields, case.vocab)
            for t in range(case.seq)
        )
        / case.seq
    )
    # scores (q.k) and mixing (p.v): 2 x 2 x hidden multiply-adds per key
    return 3 * (2 * weights + 4 * hidden * keys)


def _peak_memory(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Peak bytes allocated on the device while `fn` runs (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def _gib(nbytes: int | None) -> str:
    return "" if nbytes is None else f"  peak {nbytes / 2**30:6.1f} GiB"


COMPILED = "ours (fast, compiled)"
GRAPHED = "ours (slots, CUDA graphs)"


def _models(case: Case, device: torch.device, compiled: bool) -> dict[str, torch.nn.Module]:
    fields = resolve_model_fields(case.model)
    reference = implementation("transformers").build(fields, case.vocab, 0, 0, seed=0)
    # separate copies of the same weights: each side's optimizer updates its own
    config = gpt_neo_config(fields, case.vocab, 0, 0)
    models = {"reference (transformers)": reference}
    for side in ["ours (fast)", COMPILED] if compiled else ["ours (fast)"]:
        state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        models[side] = from_state_dict(config, state)
    return {side: model.to(device) for side, model in models.items()}


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


def run_case(
    name: str,
    case: Case,
    device: torch.device,
    repeats: int,
    hardware: Hardware | None,
    compiled: bool = False,
) -> dict[str, float]:
    """Time both sides of one case (and ours compiled as `train.compile` compiles it, when
    `compiled`); print them and the ratio; return tokens/s per side."""
    with contextlib.ExitStack() as stack:
        models = _models(case, device, compiled and case.train)
        if COMPILED in models:  # compiled during the warm-up below, untimed
            stack.enter_context(compiled_trunk(models[COMPILED]))
        return _run_case(name, case, device, repeats, hardware, models)


def _run_case(
    name: str,
    case: Case,
    device: torch.device,
    repeats: int,
    hardware: Hardware | None,
    models: dict[str, torch.nn.Module],
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen).to(device)
    steps = {side: _step_fn(model, case, batch, device) for side, model in models.items()}
    # warm-up (allocator, kernels, optimizer state), where the peak memory is taken
    peaks = {side: _peak_memory(device, fn) for side, fn in steps.items()}
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for side, fn in steps.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[side] = min(best[side], time.perf_counter() - start)
    tokens = case.batch * case.seq
    what = "train step" if case.train else "forward"
    print(f"{name}: {what}, batch {case.batch} x {case.seq}, vocab {case.vocab}")
    flops = train_flops_per_token(case) if case.train else None
    for side, seconds in best.items():
        mfu = ""
        if hardware is not None and flops is not None:
            mfu = f"  MFU {flops * tokens / seconds / hardware.flops:6.1%}"
        print(
            f"  {side:26s} {seconds * 1000:9.1f} ms  {tokens / seconds:>12,.0f} tokens/s"
            f"{mfu}{_gib(peaks[side])}"
        )
    ratio = best["reference (transformers)"] / best["ours (fast)"]
    print(f"  speed-up (ours / reference): {ratio:.2f}x")
    if COMPILED in best:
        print(f"  compiled / eager: {best['ours (fast)'] / best[COMPILED]:.2f}x")
    del models, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {side: tokens / seconds for side, seconds in best.items()}


class _EOSBias:
    """Adds `bias` to the EOS logit (a transformers logits processor and our warper alike)."""

    def __init__(self, eos: int, bias: float):
        self.eos, self.bias = eos, bias

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        # in place: a copy of [rows, vocab] per step would be most of a 33M step's traffic
        scores[:, self.eos] += self.bias
        return scores


def _eos_bias(model: torch.nn.Module, eos: int, device: torch.device, mean: float) -> float:
    """The EOS-logit bias that makes P(EOS) = 1 / `mean` on average over the positions of a
    random 64-token story, so that story lengths are about geometric with that mean (a random
    model's logits are nearly flat, but not quite: the bias is fitted, not assumed)."""
    story = torch.randint(0, eos, (1, 64), generator=torch.Generator().manual_seed(0))
    story[0, 0] = eos
    with torch.inference_mode():
        logits = implementation_of(model).logits(model, story.to(device))[0].float()
    others = torch.cat([logits[:, :eos], logits[:, eos + 1 :]], dim=1).logsumexp(1)
    return float((others - logits[:, eos]).mean() - math.log(mean - 1))


def sampling_floor_seconds(
    fields: dict,
    vocab: int,
    lengths: list[int],
    slots: int,
    hardware: Hardware,
    amp: torch.dtype | None = None,
) -> float:
    """Least time to sample stories of these lengths, if memory bandwidth were all that limited
    it: the weights read once per step (steps = tokens / slots, every slot busy) and, per token,
    the keys and values of the positions it attends to. In fp32 (`amp` None) a weight is 4
    bytes a step and a cached value 4; under autocast a weight is read in fp32, its cast
    written and read again (4 + 2 + 2), and the cache holds 2-byte values."""
    hidden, window = fields["hidden_size"], fields["window_size"]
    inner = fields["intermediate_size"] or 4 * hidden
    weights = fields["num_layers"] * (4 * hidden * hidden + 2 * hidden * inner) + vocab * hidden
    kinds = _layer_kinds(fields, vocab)
    tokens = sum(lengths)
    # the token drawn at step t reads positions 0..t (the start token included)
    per_step = [sum(_keys_seen(kind, t, window) for kind in kinds) for t in range(max(lengths))]
    read_by_length = list(itertools.accumulate(per_step))  # keys read by a story of length t+1
    kv = sum(read_by_length[length - 1] for length in lengths if length > 0)
    per_weight, per_value = (4, 4) if amp is None else (8, 2)
    nbytes = per_weight * weights * tokens / slots + per_value * 2 * hidden * kv
    return nbytes / hardware.bandwidth


def run_sampling(
    name: str,
    case: SampleCase,
    device: torch.device,
    hardware: Hardware | None,
    amp: torch.dtype | None = None,
    cuda_graphs: bool = False,
) -> dict[str, float]:
    """Useful tokens/s of `generate` (static batches) vs our slots (and, with `cuda_graphs`,
    our slots replaying CUDA graphs); prints them and the ratio, and returns them with the
    mean story length ("mean length")."""
    from transformers import LogitsProcessorList

    from collapse.slot_sampler import sample_stories

    vocab, n, batch, cap = case.vocab, case.stories, case.slots, case.max_new_tokens
    eos = vocab - 1  # as GPT-2's <|endoftext|>
    fields = resolve_model_fields(case.model)
    reference = implementation("transformers").build(fields, vocab, eos, eos, seed=0)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    ours = from_state_dict(gpt_neo_config(fields, vocab, eos, eos), state)
    reference, ours = reference.to(device).eval(), ours.to(device).eval()
    bias = _EOSBias(eos, _eos_bias(ours, eos, device, mean=150))
    results: dict[str, tuple[float, list[int]]] = {}
    peaks: dict[str, int | None] = {}

    def timed(side: str, fn: Callable[[], list[int]]) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        with autocast(device, amp):
            lengths = fn()
        sync(device)
        results[side] = (time.perf_counter() - start, lengths)
        peaks[side] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    def generate(count: int, new_tokens: int) -> list[int]:
        lengths = []
        torch.manual_seed(0)
        for first in range(0, count, batch):
            rows = min(batch, count - first)
            with torch.inference_mode():
                out = reference.generate(
                    torch.full((rows, 1), eos, device=device),
                    attention_mask=torch.ones(rows, 1, dtype=torch.long, device=device),
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    logits_processor=LogitsProcessorList([bias]),
                    pad_token_id=eos,
                    eos_token_id=eos,
                )
            for row in out[:, 1:].tolist():
                lengths.append(row.index(eos) + 1 if eos in row else len(row))
        return lengths

    reports: dict[str, dict[str, str]] = {}

    def slots(count: int, new_tokens: int, graphs: bool = False) -> list[int]:
        report = reports.setdefault(GRAPHED if graphs else "ours (slots)", {})
        stories = sample_stories(
            ours,
            list(range(count)),
            key=0,
            max_new_tokens=new_tokens,
            start_id=eos,
            end_id=eos,
            slots=batch,
            warp=lambda scores: bias(None, scores),
            device=device,
            cuda_graphs=graphs,
            report=report,
        )
        return [len(tokens) + ended for _, tokens, ended in stories]

    if device.type == "cuda":  # kernels and allocator warmed on a slice, untimed, both sides
        with autocast(device, amp):
            generate(batch, 8)
            slots(batch, 8)
    timed("reference (generate)", lambda: generate(n, cap))
    timed("ours (slots)", lambda: slots(n, cap))
    if cuda_graphs:
        timed(GRAPHED, lambda: slots(n, cap, graphs=True))
    print(
        f"{name}: {n} stories, batch/slots {batch}, max_new_tokens {cap}, vocab {vocab}, "
        f"{arithmetic_name(amp)}"
    )
    rates = {}
    for side, (seconds, lengths) in results.items():
        useful = sum(lengths)
        rates[side] = useful / seconds
        print(
            f"  {side:26s} {seconds:8.2f} s  {rates[side]:>12,.0f} useful tokens/s  "
            f"(mean length {useful / len(lengths):.0f}, max {max(lengths)}){_gib(peaks[side])}"
        )
    for side, report in reports.items():
        print(f"  {side}: attention {report['attention']}, CUDA graphs {report['cuda_graphs']}")
    ratio = rates["ours (slots)"] / rates["reference (generate)"]
    print(f"  speed-up (ours / reference): {ratio:.2f}x")
    if cuda_graphs:
        print(f"  CUDA graphs / step by step: {rates[GRAPHED] / rates['ours (slots)']:.2f}x")
    if hardware is not None:
        seconds, lengths = results["ours (slots)"]
        floor = sampling_floor_seconds(fields, vocab, lengths, batch, hardware, amp)
        print(f"  ours at {floor / seconds:.1%} of the bandwidth floor ({floor:.2f} s)")
    lengths = results["ours (slots)"][1]
    return {**rates, "mean length": sum(lengths) / len(lengths)}


def project(
    name: str, train: dict[str, float], sample: dict[str, float], args: argparse.Namespace
) -> None:
    """Print the time of one paper-scale generation and of 40, per side."""
    stories, tokens = args.paper_stories, args.story_tokens
    print(
        f"projection ({name}): {stories:,} stories x {tokens} tokens per generation, "
        f"{args.epochs:g} epochs of training + sampling them (no evaluations)"
    )
    sides = (
        ("ours", "ours (fast)", "ours (slots)"),
        ("reference", "reference (transformers)", "reference (generate)"),
    )
    for label, train_side, sample_side in sides:
        train_s = args.epochs * stories * tokens / train[train_side]
        sample_s = stories * tokens / sample[sample_side]
        total = train_s + sample_s
        print(
            f"  {label:10s} train {train_s / 3600:6.2f} h + sample {sample_s / 3600:6.2f} h = "
            f"{total / 3600:6.2f} h per generation, {GENERATIONS * total / 3600:7.1f} h for "
            f"{GENERATIONS}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[*CASES, *SAMPLE_CASES],
        default=None,
        help=f"default: all but {', '.join(PAPER_CASES)} on a CPU, all on CUDA",
    )
    parser.add_argument("--stories", type=int, default=None, help="sample cases: stories")
    parser.add_argument("--sample-batch", type=int, default=None, help="sample cases: slots")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="sample cases: cap")
    parser.add_argument(
        "--sample-precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="sample cases: the model's arithmetic (sample.precision; fp32 on a CPU)",
    )
    parser.add_argument("--train-batch", type=int, default=None, help="train cases: batch")
    parser.add_argument("--train-seq", type=int, default=None, help="train cases: length")
    parser.add_argument("--paper-stories", type=int, default=1_000_000)
    parser.add_argument(
        "--story-tokens", type=int, default=156, help="mean tokens per story, EOS included"
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="train cases: also time ours compiled as train.compile does (inductor)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="sample cases: also time our slots replaying CUDA graphs (sample.cuda_graphs)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"precision={autocast_dtype('auto', device) or 'fp32'} "
        f"sample-precision={autocast_dtype(args.sample_precision, device) or 'fp32'} "
        f"repeats={args.repeats}"
    )
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    cases = args.cases or [
        c for c in [*CASES, *SAMPLE_CASES] if device.type == "cuda" or c not in PAPER_CASES
    ]
    hardware = measure_hardware(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the measurement's buffers
    trained: dict[str, dict[str, float]] = {}
    sampled: dict[str, dict[str, float]] = {}
    for name in cases:
        if name in SAMPLE_CASES:
            case = SAMPLE_CASES[name]
            case = SampleCase(
                case.model,
                case.vocab,
                args.stories or case.stories,
                args.sample_batch or case.slots,
                args.max_new_tokens or case.max_new_tokens,
            )
            amp = autocast_dtype(args.sample_precision, device)
            sampled[name.removeprefix("sample-")] = run_sampling(
                name, case, device, hardware, amp, args.cuda_graphs
            )
        else:
            case = CASES[name]
            if case.train:
                case = Case(
                    case.model,
                    case.vocab,
                    args.train_batch or case.batch,
                    args.train_seq or case.seq,
                    train=True,
                )
            rates = run_case(name, case, device, args.repeats, hardware, args.compile)
            if case.train:
                trained[name.removeprefix("train-")] = rates
    for model in trained.keys() & sampled.keys():
        project(model, trained[model], sampled[model], args)


if __name__ == "__main__":
    main()
