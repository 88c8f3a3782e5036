"""Seeded blocks of torch's global generator, alone and from concurrent threads."""

from __future__ import annotations

import threading
import time

import torch

from collapse.seeding import seeded_torch


def _draws(seed: int, out: dict[int, list[float]]) -> None:
    values = []
    with seeded_torch(seed):
        for _ in range(5):
            values.append(torch.rand(1).item())
            time.sleep(0.01)  # let the other thread run mid-block
    out[seed] = values


def test_concurrent_seeded_blocks_draw_what_they_draw_alone():
    alone: dict[int, list[float]] = {}
    for seed in (1, 2):
        _draws(seed, alone)
    together: dict[int, list[float]] = {}
    threads = [threading.Thread(target=_draws, args=(seed, together)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone
    assert alone[1] != alone[2]


def test_a_seeded_block_leaves_the_global_stream_as_it_was():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with seeded_torch(5):
        torch.rand(7)
    assert torch.equal(torch.rand(3), expected)
