"""Seeds derived from the run seed and a path of names, stable across processes and machines."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def derive_seed(root: int, *parts: int | str) -> int:
    """A 63-bit seed from (root, *parts), e.g. derive_seed(42, "sample", 3, 17).

    Hash-based rather than `root + offset` so that nearby generations or shards never share
    streams, and so that adding a new consumer never shifts the seeds of existing ones.
    """
    text = "/".join(str(p) for p in (root, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


# torch's global generator is one per process: a pipelined run samples generation n+1's corpus
# while generation n's judge samples completions, in threads of one process, and two seeded
# blocks interleaving would each draw from the other's stream. Every block that seeds it, or
# reads or sets its state, holds this lock, so its draws are the same as in a run alone.
TORCH_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_torch(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Within the block, torch's global generator (and `device`'s, if CUDA) starts at `seed`.

    The previous states are restored afterwards (`torch.random.fork_rng`), and the block holds
    `TORCH_RNG_LOCK`, so concurrent threads never draw from each other's streams.

    Args:
        seed: the seed of the block's stream.
        device: the device the block samples on (its CUDA generator is forked too).
    """
    import torch  # here: the config and CLI import this module and must stay light

    cuda = device is not None and device.type == "cuda"
    with TORCH_RNG_LOCK, torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(seed)
        yield
