"""What `train.deterministic: true` costs, and whether it makes GPU training bitwise repeatable.

Trains the same model (`--preset`, default TinyStories-33M, vocabulary 50257) on the same random
token blocks twice with `train.deterministic` off and twice with it on, at the paper's shapes
(micro-batch 80 x 512, effective batch 320, bf16 autocast on CUDA), for `--steps` optimizer
steps. Each setting runs in a process of its own, since the cuBLAS workspace setting that
deterministic training needs (`CUBLAS_WORKSPACE_CONFIG`) is read once per process and would
slow the other setting down too. Prints, per setting, whether the two trainings gave the same
weights (sha256 of the state dict) and the training throughput, then the cost as a ratio.

    python bench/determinism.py --device cuda           # the question it answers is a GPU's
    python bench/determinism.py --preset tinystories-1m --steps 2 --batch 2 --seq 64  # on a CPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> dict:
    """Two trainings with one setting in this process: their digests and tokens/s."""
    deterministic = args.child == "on"
    if deterministic:
        from collapse.device import prepare_deterministic

        prepare_deterministic()  # before torch starts CUDA
    import numpy as np
    import torch

    from collapse.config import ModelConfig, TrainConfig
    from collapse.device import pick_device
    from collapse.models import build_model
    from collapse.train import train_model

    device = pick_device(args.device)
    effective = args.batch * args.accumulate
    cfg = TrainConfig(
        batch_size=args.batch,
        effective_batch=effective,
        seq_len=args.seq,
        epochs=None,
        token_budget=args.steps * effective * args.seq,
        lr=5e-4,
        deterministic=deterministic,
        checkpoint_every=10**9,
    )
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, args.vocab, size=(effective * args.steps, args.seq), dtype=np.int32)
    runs = []
    for _ in range(2):
        model = build_model(ModelConfig(preset=args.preset), args.vocab, 0, 0, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            stats = train_model(
                model,
                blocks,
                cfg,
                data_seed=0,
                device=device,
                checkpoint_path=Path(tmp) / "checkpoint.pt",
                checkpoint_key="bench",
            )
            seconds = time.perf_counter() - start
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        runs.append({"digest": digest.hexdigest(), "tokens_per_second": stats["tokens"] / seconds})
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": stats["precision"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default="tinystories-33m")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=80, help="micro-batch")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per training")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    results = {}
    for setting in ("off", "on"):
        argv = list(sys.argv[1:])
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--child", setting],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"train.deterministic {setting}: failed\n{done.stderr[-3000:]}")
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    first = results["off"]
    print(
        f"device={first['device']} gpu={first['gpu']} precision={first['precision']} "
        f"preset={args.preset} micro-batch {args.batch} x {args.seq}, effective "
        f"{args.batch * args.accumulate}, {args.steps} steps"
    )
    for setting, result in results.items():
        a, b = result["runs"]
        rate = max(a["tokens_per_second"], b["tokens_per_second"])
        same = "bitwise the same" if a["digest"] == b["digest"] else "DIFFERENT"
        print(
            f"  train.deterministic {setting:3s}: two trainings {same} "
            f"({a['digest'][:12]} / {b['digest'][:12]}), {rate:,.0f} tokens/s"
        )
    off = max(r["tokens_per_second"] for r in results["off"]["runs"])
    on = max(r["tokens_per_second"] for r in results["on"]["runs"])
    print(f"  cost of deterministic training: {off / on:.2f}x the time")


if __name__ == "__main__":
    main()
