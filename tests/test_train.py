"""Training: EOS is learned, checkpoints resume to the same weights, data order is seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from collapse.config import ModelConfig, TrainConfig
from collapse.models import build_model, logits
from collapse.train import make_blocks, total_steps, train_model

CPU = torch.device("cpu")


def _model(seed: int = 0):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64)
    return build_model(cfg, 20, 0, 0, seed)


def _blocks(n_docs: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    stream = [0]
    for _ in range(n_docs):
        stream += [*rng.integers(1, 20, size=rng.integers(3, 9)).tolist(), 0]
    return make_blocks(np.array(stream, dtype=np.int32), 16)


def test_blocks_and_step_counts():
    blocks = make_blocks(np.arange(50, dtype=np.int32), 16)
    assert blocks.shape == (3, 16) and blocks[1, 0] == 16
    assert make_blocks(np.arange(5, dtype=np.int32), 16).shape == (1, 5)
    cfg = TrainConfig(batch_size=4, effective_batch=8, epochs=2)
    assert total_steps(100, 16, cfg) == 25
    cfg = TrainConfig(batch_size=4, effective_batch=8, epochs=None, token_budget=1000)
    assert total_steps(100, 16, cfg) == 8  # ceil(1000 / (8 * 16))


def test_eos_is_a_trained_target(tmp_path: Path):
    stream = np.array([0, 5, 6, 7] * 64, dtype=np.int32)
    model = _model()
    cfg = TrainConfig(lr=1e-2, batch_size=8, effective_batch=8, seq_len=16, epochs=40)
    train_model(
        model,
        make_blocks(stream, 16),
        cfg,
        data_seed=0,
        device=CPU,
        checkpoint_path=tmp_path / "ck.pt",
        checkpoint_key="k",
    )
    with torch.no_grad():
        probs = logits(model, torch.tensor([[0, 5, 6, 7]]))[0, -1].softmax(-1)
    assert float(probs[0]) > 0.9  # the story ends after "5 6 7": EOS was not masked


@pytest.mark.parametrize("accum", [1, 2])
def test_resumed_training_equals_uninterrupted(tmp_path: Path, accum: int):
    cfg = TrainConfig(
        batch_size=4, effective_batch=4 * accum, seq_len=16, epochs=3, checkpoint_every=5, lr=3e-3
    )
    blocks = _blocks()
    full = _model()
    stats = train_model(
        full,
        blocks,
        cfg,
        data_seed=9,
        device=CPU,
        checkpoint_path=tmp_path / "ck.pt",
        checkpoint_key="k",
    )
    assert stats["resumed_from_step"] == 0 and stats["steps"] > 5
    saved = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert 0 < saved["step"] < stats["steps"]
    # a fresh process would build a fresh model and find this checkpoint
    resumed_model = _model()
    resumed = train_model(
        resumed_model,
        blocks,
        cfg,
        data_seed=9,
        device=CPU,
        checkpoint_path=tmp_path / "ck.pt",
        checkpoint_key="k",
    )
    assert resumed["resumed_from_step"] == saved["step"]
    assert resumed["losses"] == stats["losses"]
    for a, b in zip(full.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_from_other_inputs_is_not_resumed(tmp_path: Path):
    cfg = TrainConfig(batch_size=4, effective_batch=4, seq_len=16, epochs=2, checkpoint_every=3)
    train_model(
        _model(),
        _blocks(),
        cfg,
        data_seed=1,
        device=CPU,
        checkpoint_path=tmp_path / "ck.pt",
        checkpoint_key="old",
    )
    stats = train_model(
        _model(),
        _blocks(),
        cfg,
        data_seed=1,
        device=CPU,
        checkpoint_path=tmp_path / "ck.pt",
        checkpoint_key="new",
    )
    assert stats["resumed_from_step"] == 0


def test_data_order_depends_on_the_seed(tmp_path: Path):
    cfg = TrainConfig(batch_size=4, effective_batch=4, seq_len=16, epochs=1, checkpoint_every=99)
    a = train_model(
        _model(),
        _blocks(),
        cfg,
        data_seed=1,
        device=CPU,
        checkpoint_path=tmp_path / "a.pt",
        checkpoint_key="k",
    )
    b = train_model(
        _model(),
        _blocks(),
        cfg,
        data_seed=2,
        device=CPU,
        checkpoint_path=tmp_path / "b.pt",
        checkpoint_key="k",
    )
    assert a["losses"] != b["losses"]


def test_deterministic_training_is_the_same_on_cpu_and_leaves_the_global_setting_alone(
    tmp_path: Path,
):
    blocks = _blocks()
    weights = []
    for deterministic in (False, True):
        model = _model()
        cfg = TrainConfig(
            batch_size=8, effective_batch=8, seq_len=16, epochs=1, deterministic=deterministic
        )
        train_model(
            model,
            blocks,
            cfg,
            data_seed=0,
            device=CPU,
            checkpoint_path=tmp_path / f"{deterministic}.pt",
            checkpoint_key="k",
        )
        weights.append(model.state_dict())
        assert not torch.are_deterministic_algorithms_enabled()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.gpu
def test_deterministic_gpu_training_is_bitwise_repeatable(tmp_path: Path):
    cuda = torch.device("cuda")
    blocks = _blocks()
    cfg = TrainConfig(batch_size=8, effective_batch=8, seq_len=16, epochs=2, deterministic=True)
    runs = []
    for i in range(2):
        model = _model()
        train_model(
            model,
            blocks,
            cfg,
            data_seed=0,
            device=cuda,
            checkpoint_path=tmp_path / f"{i}.pt",
            checkpoint_key="k",
        )
        runs.append({k: v.cpu() for k, v in model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_compiled_trunk_trains_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """train.compile: the trunk and the loss's per-chunk elementwise work run through
    torch.compile. The aot_eager backend traces them as inductor does without generating
    kernels, so the weights are bitwise those of eager training (inductor's kernels round
    differently; their speed is measured by `bench/throughput.py --compile`)."""
    from torch._dynamo import lookup_backend

    import collapse.train

    graphs = []

    def aot_eager(graph, inputs):  # records that the trunk was compiled, then compiles it
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, inputs)

    monkeypatch.setattr(collapse.train, "COMPILE_BACKEND", aot_eager)
    cfg = TrainConfig(batch_size=4, effective_batch=8, seq_len=16, epochs=1, checkpoint_every=99)
    trained = {}
    for compiled in (False, True):
        model = _model()
        stats = train_model(
            model,
            _blocks(),
            cfg.model_copy(update={"compile": compiled}),
            data_seed=1,
            device=CPU,
            checkpoint_path=tmp_path / f"{compiled}.pt",
            checkpoint_key="k",
        )
        # the compiled functions are gone after training
        assert "hidden" not in vars(model) and "loss_gradient" not in vars(model)
        trained[compiled] = (stats["losses"], model.state_dict())
    (eager_losses, eager), (losses, state) = trained[False], trained[True]
    # one shape each: the trunk and the loss's chunk (60 tokens: one chunk), and nothing else
    assert len(graphs) == 2
    assert losses == eager_losses
    assert state.keys() == eager.keys() and all(torch.equal(state[k], eager[k]) for k in state)
    reference = build_model(
        ModelConfig(num_layers=2, hidden_size=32, num_heads=4, implementation="transformers"),
        20,
        0,
        0,
        0,
    )
    with pytest.raises(ValueError, match="train.compile needs model.implementation: fast"):
        train_model(
            reference,
            _blocks(),
            cfg.model_copy(update={"compile": True}),
            data_seed=1,
            device=CPU,
            checkpoint_path=tmp_path / "reference.pt",
            checkpoint_key="k",
        )
