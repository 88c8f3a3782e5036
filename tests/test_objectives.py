"""Training objectives: MLE limits are MLE bitwise, weights follow their formulas without
gradient, both model implementations, config errors and keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from collapse.config import ConfigError, ModelConfig, TrainConfig, load_config
from collapse.models import build_model, implementation_of
from collapse.models.loss import token_logprobs
from collapse.objectives import OBJECTIVES, training_loss, unlikelihood_term

TINY = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=64)
BATCH = torch.randint(0, 50, (4, 24), generator=torch.Generator().manual_seed(0))


def _grads(implementation: str, **train) -> tuple[float, dict[str, torch.Tensor]]:
    model = build_model(TINY.model_copy(update={"implementation": implementation}), 50, 0, 0, 1)
    loss = training_loss(model, BATCH, TrainConfig(**train))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("implementation", ["transformers", "fast"])
@pytest.mark.parametrize(
    "limit",
    [
        {"objective": "mixce", "eta": 1.0},
        {"objective": "tailr", "gamma": 0.0},
        {"objective": "unlikelihood", "alpha": 0.0},
    ],
)
def test_the_mle_limits_give_the_gradients_of_mle(implementation: str, limit: dict):
    mle_loss, mle = _grads(implementation)
    loss, grads = _grads(implementation, **limit)
    assert loss == mle_loss
    assert all(torch.equal(grads[n], mle[n]) for n in mle)


@pytest.mark.parametrize("implementation", ["transformers", "fast"])
def test_the_weighted_path_at_unit_weights_equals_mle(implementation: str):
    # eta = 1 - 1e-12 takes the weighted path with weights 1 up to 1e-12
    mle_loss, mle = _grads(implementation)
    loss, grads = _grads(implementation, objective="mixce", eta=1 - 1e-12)
    assert loss == pytest.approx(mle_loss, abs=1e-6)
    assert all(torch.allclose(grads[n], mle[n], atol=1e-6) for n in mle)


def test_weights_follow_their_formulas_on_hand_checked_values():
    q = torch.tensor([0.5, 0.1, 1.0, 0.0])
    mixce = OBJECTIVES["mixce"].weights(q, TrainConfig(eta=0.3))
    assert torch.allclose(mixce, torch.tensor([0.65, 0.37, 1.0, 0.3]))
    tailr = OBJECTIVES["tailr"].weights(q, TrainConfig(gamma=0.5))
    assert torch.allclose(tailr, torch.tensor([0.5 / 0.75, 0.1 / 0.55, 1.0, 0.0]))
    assert torch.equal(OBJECTIVES["tailr"].weights(q, TrainConfig(gamma=0.0)), torch.ones(4))


@pytest.mark.parametrize("implementation", ["transformers", "fast"])
def test_weights_carry_no_gradient(implementation: str):
    # the loss is -mean(w * log p) with w a constant: its gradient is that of a fixed weighting
    cfg = TrainConfig(objective="mixce", eta=0.3)
    model = build_model(TINY.model_copy(update={"implementation": implementation}), 50, 0, 0, 1)
    impl = implementation_of(model)
    training_loss(model, BATCH, cfg).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp = token_logprobs(impl.logits(model, BATCH), BATCH)
    fixed = (0.3 + 0.7 * logp.detach().exp()).clone()
    (-(fixed * logp).mean()).backward()
    assert all(torch.allclose(ours[n], p.grad, atol=1e-7) for n, p in model.named_parameters())
    # and differs from MLE (the weights matter)
    _, mle = _grads(implementation)
    assert not all(torch.allclose(ours[n], mle[n], atol=1e-6) for n in mle)


def test_objective_settings_are_checked_and_keyed_only_when_chosen(tiny_config_file: Path):
    from collapse.config import run_id_for

    with pytest.raises(ConfigError, match="train.objective"):
        load_config(tiny_config_file, ["train.objective=dpo"])
    for bad in ("train.eta=1.5", "train.gamma=-0.1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(tiny_config_file, [bad])
    base = run_id_for(load_config(tiny_config_file))
    assert run_id_for(load_config(tiny_config_file, ["train.eta=0.9"])) == base  # mle: unused
    mixce = run_id_for(load_config(tiny_config_file, ["train.objective=mixce"]))
    assert mixce != base
    assert (
        run_id_for(load_config(tiny_config_file, ["train.objective=mixce", "train.gamma=0.1"]))
        == mixce
    )
    assert (
        run_id_for(load_config(tiny_config_file, ["train.objective=mixce", "train.eta=0.9"]))
        != mixce
    )


def test_the_unlikelihood_term_on_a_sequence_with_a_repeated_token():
    # BOS=0, then 2, 3, 2 over 4 ids with uniform logits: every p = 1/4.
    # predicting 2 after [0]: candidates {} (0 is special); 3 after [0, 2]: {2};
    # 2 after [0, 2, 3]: {3} (the target 2 is not a negative). Two penalties of -log(3/4),
    # averaged over the 3 predicted positions.
    batch = torch.tensor([[0, 2, 3, 2]])
    logits = torch.zeros(1, 4, 4)
    expected = 2 * -torch.log(torch.tensor(0.75)) / 3
    assert torch.isclose(unlikelihood_term(logits, batch, {0}), expected)
    # a model sure of the repeated token pays more for it
    peaked = logits.clone()
    peaked[0, 1, 2] = 5.0  # after [0, 2] it puts most mass on 2 again
    assert unlikelihood_term(peaked, batch, {0}) > expected


@pytest.mark.parametrize("implementation", ["transformers", "fast"])
def test_unlikelihood_adds_its_penalty_to_mle(implementation: str):
    mle_loss, mle = _grads(implementation)
    loss, grads = _grads(implementation, objective="unlikelihood", alpha=0.5)
    model = build_model(TINY.model_copy(update={"implementation": implementation}), 50, 0, 0, 1)
    with torch.no_grad():
        term = unlikelihood_term(implementation_of(model).logits(model, BATCH), BATCH, {0})
    assert loss == pytest.approx(mle_loss + 0.5 * term.item(), rel=1e-5)
    assert not all(torch.allclose(grads[n], mle[n], atol=1e-6) for n in mle)
