"""Training objectives, declared once: `train.objective` picks one by name.

Each objective here is a per-token reweighting of the log-likelihood: the loss is
-mean_t(w_t * log p(x_t | x_<t)), with w_t a function of q_t, the model's probability of the
target token, taken without gradient. Weights of 1 are MLE. This covers MixCE (Zhang et al.
2023, seed 001: w = eta + (1 - eta) q, the approximation of the mixture of forward and reverse
cross-entropy) and TaiLr (Ji et al. 2023: w = q / (gamma + (1 - gamma) q)). Adding one is one
more entry in `OBJECTIVES`; the config, the training stage's key and the training loop read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a loss is computed: config validation reads this
    import torch


@dataclass(frozen=True)
class Objective:
    """A training objective.

    Attributes:
        name: the `train.objective` value.
        description: one line for the docs.
        settings: the `train.*` fields it reads (part of the training key only when chosen).
        weights: q (target probabilities, no gradient) and the train config -> per-token
            weights; None for plain MLE.
        is_mle: whether its settings make it MLE exactly (then MLE's own code path runs, so the
            gradients are bitwise those of MLE).
    """

    name: str
    description: str
    settings: tuple[str, ...] = ()
    weights: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    is_mle: Callable[[Any], bool] = lambda cfg: False


def _mixce(q: torch.Tensor, cfg: Any) -> torch.Tensor:
    return cfg.eta + (1 - cfg.eta) * q


def _tailr(q: torch.Tensor, cfg: Any) -> torch.Tensor:
    import torch

    denominator = cfg.gamma + (1 - cfg.gamma) * q
    # gamma = 0 and q underflowed to 0: the weight's limit is 1 (it is q / q)
    return torch.where(denominator > 0, q / denominator.clamp_min(1e-38), torch.ones_like(q))


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("mle", "Maximum likelihood (the paper)."),
        Objective(
            "mixce",
            "MixCE: token weights eta + (1 - eta) q (eta = 1: MLE).",
            settings=("eta",),
            weights=_mixce,
            is_mle=lambda cfg: cfg.eta == 1,
        ),
        Objective(
            "tailr",
            "TaiLr: token weights q / (gamma + (1 - gamma) q) (gamma = 0: MLE).",
            settings=("gamma",),
            weights=_tailr,
            is_mle=lambda cfg: cfg.gamma == 0,
        ),
    )
}
# Every `train.*` field some objective reads: kept out of the training key unless chosen.
OBJECTIVE_SETTINGS = tuple(sorted({s for o in OBJECTIVES.values() for s in o.settings}))


def unused_settings(objective: str) -> set[str]:
    """The objective settings `objective` does not read (they change nothing it computes)."""
    return set(OBJECTIVE_SETTINGS) - set(OBJECTIVES[objective].settings)


def training_loss(model: torch.nn.Module, batch: torch.Tensor, cfg: Any) -> torch.Tensor:
    """The loss of one micro-batch of full sequences under `cfg.objective`."""
    from collapse.models import implementation_of

    impl = implementation_of(model)
    objective = OBJECTIVES[cfg.objective]
    if objective.weights is None or objective.is_mle(cfg):
        return impl.loss(model, batch)
    logp = impl.target_logprobs(model, batch)
    weights = objective.weights(logp.detach().exp(), cfg)
    return -(weights * logp).mean()
