"""Device and precision choice, shared by training, sampling and evaluation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# cuBLAS picks its reduction order per workspace; a fixed small workspace makes it repeatable
# (https://docs.nvidia.com/cuda/cublas/index.html#results-reproducibility).
CUBLAS_DETERMINISTIC = ":4096:8"


def pick_device(requested: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is visible")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means plain fp32.

    `auto` is bf16 on GPUs that support it, fp16 on older GPUs, and fp32 on the CPU (CPU bf16
    autocast is slow on most CPUs and changes results for no gain at our sizes).
    """
    if device.type != "cuda" or precision == "fp32":
        return None  # mixed precision is a GPU setting; CPU runs stay exact fp32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def arithmetic_name(dtype: torch.dtype | None) -> str:
    """How records and benchmarks name an arithmetic: `float32` for None (plain fp32, as
    `autocast_dtype` returns it), else the dtype's name (`bfloat16`, `float16`)."""
    return str(dtype or torch.float32).removeprefix("torch.")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for `dtype`, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_deterministic() -> None:
    """Set what deterministic GPU training needs before CUDA and cuBLAS start in this process.

    cuBLAS reads `CUBLAS_WORKSPACE_CONFIG` when it creates its handle, so this is called as
    early as possible (the CLI and each flow call it when `train.deterministic` is on).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within the block, torch uses only deterministic kernels (or raises where none exists).

    The process-wide setting is restored afterwards, so other stages are not slowed down.
    """
    if not enabled:
        yield
        return
    prepare_deterministic()
    before = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False  # autotuning may pick other kernels per run
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark = benchmark
