"""Every stage of a small run on one device, through the library (no Prefect), timed per stage.

What only a GPU shows beyond the throughput benchmarks: that each stage (bf16 training, the
samplers, perplexity, the downstream fine-tunes) runs end to end on CUDA, and what a stage costs
inside a run. Runs configs/demo.yaml for `--generations` generations twice, in two run folders
under a temporary root: the reference (`model.implementation=transformers sample.rng=shard
sample.precision=fp32`: the defaults before 2026-12-07, static batches) and the fast path (the
defaults: our model, continuous batching, bf16 autocast while sampling on a GPU), with
the evaluations that need no spaCy or judge. The fast run shares nothing with the reference
(`orchestration.share_across_runs=false`: its training key equals the reference's, as the
implementation is not part of it), and runs second, so the reference's first stages also pay
the imports' warm-up. Prints each stage's seconds for both, the sampled corpus's useful
tokens/s, and the metrics table of both runs (they differ: different sampling streams and, on a
GPU, kernels; the point is that both work and what they cost).

    python bench/gpu_run.py --device cuda
    python bench/gpu_run.py --device cpu --generations 1 --stories 300   # minutes on a CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from collapse.config import load_config
from collapse.context import Context
from collapse.pipeline import freeze_config, metrics_table, run_stage, stages_of, table_columns
from collapse.store import RunStore
from collapse.table import text_table

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "reference": ["model.implementation=transformers", "sample.rng=shard", "sample.precision=fp32"],
    "fast": [
        "model.implementation=fast",
        "sample.rng=story",
        "orchestration.share_across_runs=false",
    ],
}


def run_arm(name: str, overrides: list[str], root: Path) -> tuple[dict, Context]:
    """Every stage of every generation in order; (generation, stage) -> seconds."""
    config = load_config(REPO / "configs" / "demo.yaml", [f"run.artifact_root={root}", *overrides])
    ctx = Context(config, RunStore(root, name), log=lambda _: None)
    freeze_config(ctx)
    seconds: dict[tuple[int, str], float] = {}
    for gen in range(config.run.generations + 1):
        for stage in stages_of(ctx, gen):
            start = time.perf_counter()
            record = run_stage(ctx, gen, stage)
            seconds[gen, stage] = time.perf_counter() - start
            if stage == "sample":
                info = record["info"]
                rate = (info["tokens"] + info["sequences"]) / seconds[gen, stage]
                decode = info.get("decode")  # continuous batching: attention, CUDA graphs
                how = f"; decode {decode}" if decode else ""
                print(f"  gen {gen} sample: {rate:,.0f} useful tokens/s (EOS counted){how}")
    return seconds, ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--stories", type=int, default=None, help="corpus.num_stories")
    args = parser.parse_args()
    common = [
        f"run.generations={args.generations}",
        f"train.device={args.device}",
        f"sample.device={args.device}",
        f"eval.device={args.device}",
        "eval.metrics=[perplexity, entropy, diversity, downstream]",  # no spaCy on the GPU image
        f"eval.downstream.generations=[{args.generations}]",
    ]
    if args.stories:
        sequences = args.stories * 95 // 100
        common += [f"corpus.num_stories={args.stories}", f"sample.num_sequences={sequences}"]
    timings, contexts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, overrides in ARMS.items():
            print(f"{arm}: {' '.join(overrides)}")
            timings[arm], contexts[arm] = run_arm(arm, [*common, *overrides], Path(tmp))
        print(f"\n{'generation/stage':36s} {'reference s':>12s} {'fast s':>9s}")
        for gen, stage in timings["reference"]:
            ref, fast = (timings[arm][gen, stage] for arm in ARMS)
            print(f"{gen:3d} {stage:32s} {ref:12.2f} {fast:9.2f}")
        for arm, ctx in contexts.items():
            print(f"\n{arm}:")
            print(text_table(metrics_table(ctx), table_columns(ctx.config)))


if __name__ == "__main__":
    main()
