"""Models built and loaded in concurrent threads (a pipelined run) are what they are alone."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from collapse.config import ModelConfig
from collapse.models import build_model, load_model, save_model

CFG = ModelConfig(num_layers=2, hidden_size=16, num_heads=2, max_position_embeddings=32)


def test_building_while_another_thread_loads_gives_the_same_weights(tmp_path: Path):
    save_model(build_model(CFG, vocab_size=40, start_id=0, end_id=0, seed=1), tmp_path / "m")
    alone = build_model(CFG, vocab_size=40, start_id=0, end_id=0, seed=2).state_dict()
    errors: list[BaseException] = []
    built: list[dict[str, torch.Tensor]] = []

    def run(fn) -> None:
        try:
            for _ in range(20):
                fn()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    def build() -> None:
        built.append(build_model(CFG, vocab_size=40, start_id=0, end_id=0, seed=2).state_dict())

    threads = [
        threading.Thread(target=run, args=(lambda: load_model(CFG, tmp_path / "m", "cpu"),)),
        threading.Thread(target=run, args=(build,)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(built) == 20
    for state in built:
        assert all(torch.equal(state[k], alone[k]) for k in alone)
