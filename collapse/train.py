"""Training one generation from scratch, resumable from checkpoints mid-run.

The data order is a pure function of (seed, epoch), and a checkpoint holds the model, optimizer,
scheduler, grad-scaler and RNG states plus the optimizer step, so a killed training restarted
from its checkpoint produces the same weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from collapse.device import arithmetic_name, autocast, autocast_dtype, deterministic_algorithms
from collapse.faults import crash_point
from collapse.objectives import training_loss
from collapse.seeding import TORCH_RNG_LOCK, derive_seed
from collapse.store import atomic_path

# torch.compile's backend for `train.compile` (tests swap in a faster-to-compile one).
COMPILE_BACKEND = "inductor"


def make_blocks(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a packed token stream into non-overlapping training sequences of `seq_len` tokens.

    The tail shorter than `seq_len` is dropped; a stream shorter than one block becomes one
    short block, so even a corpus that has collapsed to almost nothing can still be trained on.
    """
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        return stream[None, :].copy()
    return stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)


def total_steps(n_blocks: int, seq_len: int, cfg: Any) -> int:
    """Optimizer steps for `train.epochs` passes or a `train.token_budget`."""
    if cfg.token_budget is not None:
        return max(1, math.ceil(cfg.token_budget / (cfg.effective_batch * seq_len)))
    return max(1, round(cfg.epochs * n_blocks / cfg.effective_batch))


def _lr_lambda(cfg: Any, steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(1, steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        return 1.0

    return factor


class _Order:
    """Which block each global sample position reads: a fresh seeded permutation per epoch."""

    def __init__(self, n_blocks: int, seed: int):
        self.n_blocks, self.seed, self._perms = n_blocks, seed, {}

    def blocks(self, start: int, count: int) -> np.ndarray:
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // self.n_blocks):
            if epoch not in self._perms:
                rng = np.random.default_rng(derive_seed(self.seed, "epoch", int(epoch)))
                self._perms = {epoch: rng.permutation(self.n_blocks)}  # keep only the current one
            mask = positions // self.n_blocks == epoch
            out[mask] = self._perms[epoch][positions[mask] % self.n_blocks]
        return out


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_model(
    model: torch.nn.Module,
    blocks: np.ndarray,
    cfg: Any,
    *,
    data_seed: int,
    device: torch.device,
    checkpoint_path: Path,
    checkpoint_key: str,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    saved: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Train `model` in place on `blocks` for the steps `cfg` (a `TrainConfig`) asks for.

    Args:
        model: freshly initialised causal LM.
        blocks: int array [n_blocks, seq_len] of token ids.
        cfg: the `TrainConfig`.
        data_seed: seed of the data order.
        device: where to train.
        checkpoint_path: where mid-run checkpoints live; an existing one whose key matches
            `checkpoint_key` is resumed from, any other is ignored.
        checkpoint_key: identity of this training (stage key); guards against resuming a
            checkpoint made from other inputs.
        progress: show a progress bar.
        log: optional line logger.
        saved: called with `checkpoint_path` after each checkpoint is written (e.g. to upload
            it, `RunStore.save_partial`).

    Returns:
        Stats: steps, tokens, losses per step, resumed_from_step, seconds, tokens_per_second.
    """
    model.to(device)
    model.train()
    amp = autocast_dtype(cfg.precision, device)
    steps = total_steps(len(blocks), blocks.shape[1], cfg)
    accum = cfg.effective_batch // cfg.batch_size
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    losses: list[float] = []
    start_step, elapsed_before = 0, 0.0

    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if state.get("key") == checkpoint_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            with TORCH_RNG_LOCK:  # not inside another thread's seeded block
                torch.set_rng_state(state["rng_cpu"])
                if device.type == "cuda" and state.get("rng_cuda") is not None:
                    torch.cuda.set_rng_state(state["rng_cuda"])
            start_step, losses = state["step"], state["losses"]
            elapsed_before = state.get("seconds", 0.0)
            if log:
                log(f"resuming training from checkpoint at step {start_step}/{steps}")
        elif log:
            log("ignoring a checkpoint made from other inputs")

    order = _Order(len(blocks), data_seed)
    tokens_per_step = cfg.effective_batch * blocks.shape[1]
    started = time.perf_counter()
    bar = tqdm(total=steps, initial=start_step, disable=not progress, desc="train", unit="step")
    # Deterministic kernels only while training (other stages are not slowed down).
    trunk: contextlib.AbstractContextManager = contextlib.nullcontext()
    if cfg.compile:
        from collapse.models.gpt_neo_fast import compiled_trunk

        trunk = compiled_trunk(model, COMPILE_BACKEND)
    with deterministic_algorithms(cfg.deterministic), trunk:
        for step in range(start_step, steps):
            optimizer.zero_grad(set_to_none=True)
            # Summed on the device in float64 (exactly what summing `.item()`s did), so the host
            # waits for the device once per optimizer step, not once per micro-batch.
            summed = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(accum):
                first = step * cfg.effective_batch + micro * cfg.batch_size
                idx = order.blocks(first, cfg.batch_size)
                batch = torch.from_numpy(blocks[idx].astype(np.int64)).to(device, non_blocking=True)
                with autocast(device, amp):
                    loss = training_loss(model, batch, cfg) / accum
                scaler.scale(loss).backward()
                summed += loss.detach().double()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step_loss = float(summed)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < steps:
                with TORCH_RNG_LOCK:  # this thread's state, not another's seeded one
                    rng_cpu = torch.get_rng_state()
                    rng_cuda = torch.cuda.get_rng_state() if device.type == "cuda" else None
                _save_checkpoint(
                    checkpoint_path,
                    {
                        "key": checkpoint_key,
                        "step": done,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng_cpu": rng_cpu,
                        "rng_cuda": rng_cuda,
                        "losses": losses,
                        "seconds": elapsed_before + time.perf_counter() - started,
                    },
                )
                if saved is not None:
                    saved(checkpoint_path)
                crash_point("train", done // cfg.checkpoint_every)
                if log:
                    log(f"step {done}/{steps} loss {step_loss:.4f} (checkpoint saved)")
    bar.close()
    seconds = elapsed_before + time.perf_counter() - started
    trained_tokens = (steps - start_step) * tokens_per_step
    run_seconds = time.perf_counter() - started
    return {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "blocks": len(blocks),
        "seq_len": int(blocks.shape[1]),
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "resumed_from_step": start_step,
        "seconds": seconds,
        "tokens_per_second": trained_tokens / run_seconds if run_seconds > 0 else None,
        "precision": arithmetic_name(amp),
        "device": str(device),
    }
