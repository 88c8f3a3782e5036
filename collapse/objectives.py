"""Training objectives, declared once: `train.objective` picks one by name.

Most objectives here reweight the log-likelihood per token: the loss is
-mean_t(w_t * log p(x_t | x_<t)), with w_t a function of q_t, the model's probability of the
target token, taken without gradient. Weights of 1 are MLE. This covers MixCE (Zhang et al.
2023, seed 001: w = eta + (1 - eta) q, the approximation of the mixture of forward and reverse
cross-entropy) and TaiLr (Ji et al. 2023: w = q / (gamma + (1 - gamma) q)). Token-level
unlikelihood (Welleck et al. 2020, seed 002) adds a penalty on the probability of tokens already
seen in the sequence, the repetition collapse produces. Adding one is one more entry in
`OBJECTIVES`; the config, the training stage's key and the training loop read it.
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
        loss: (model, batch, train config) -> the loss, for objectives that are not a
            reweighting; takes precedence over `weights`.
        is_mle: whether its settings make it MLE exactly (then MLE's own code path runs, so the
            gradients are bitwise those of MLE).
    """

    name: str
    description: str
    settings: tuple[str, ...] = ()
    weights: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    loss: Callable[[torch.nn.Module, torch.Tensor, Any], torch.Tensor] | None = None
    is_mle: Callable[[Any], bool] = lambda cfg: False


def _mixce(q: torch.Tensor, cfg: Any) -> torch.Tensor:
    return cfg.eta + (1 - cfg.eta) * q


def _tailr(q: torch.Tensor, cfg: Any) -> torch.Tensor:
    import torch

    denominator = cfg.gamma + (1 - cfg.gamma) * q
    # gamma = 0 and q underflowed to 0: the weight's limit is 1 (it is q / q)
    return torch.where(denominator > 0, q / denominator.clamp_min(1e-38), torch.ones_like(q))


def unlikelihood_term(logits: torch.Tensor, batch: torch.Tensor, special: set[int]) -> torch.Tensor:
    """Mean over predicted positions of sum_{c in C_t} -log(1 - p(c | x_<=t)).

    C_t, the negative candidates when predicting x_{t+1}, are the distinct tokens of
    x_0..x_t other than x_{t+1}, leaving out the special tokens (penalising the end token
    would teach the model not to end a story).

    Args:
        logits: [batch, seq, vocab] next-token logits of every position.
        batch: [batch, seq] the token ids.
        special: token ids never used as candidates.
    """
    import torch
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    seen = F.one_hot(batch, vocab).cumsum(dim=1)[:, :-1] > 0  # [batch, seq - 1, vocab]
    seen.scatter_(2, batch[:, 1:, None], False)  # the target itself is not a negative
    if special:
        seen[..., sorted(special)] = False
    probs = logits[:, :-1].float().softmax(dim=-1)
    # 1 - p, floored so a candidate the model is sure of gives a large, finite penalty
    penalty = -torch.log1p(-probs.clamp(max=1 - 1e-6)) * seen
    return penalty.sum(dim=-1).mean()


def _unlikelihood(model: torch.nn.Module, batch: torch.Tensor, cfg: Any) -> torch.Tensor:
    from collapse.models import implementation_of
    from collapse.models.loss import token_loss

    logits = implementation_of(model).logits(model, batch)
    special = {model.config.bos_token_id, model.config.eos_token_id} - {None}
    return token_loss(logits, batch) + cfg.alpha * unlikelihood_term(logits, batch, special)


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
        Objective(
            "unlikelihood",
            "Token-level unlikelihood: MLE plus alpha x the penalty on tokens already in the "
            "sequence (alpha = 0: MLE; computes the full logits).",
            settings=("alpha",),
            loss=_unlikelihood,
            is_mle=lambda cfg: cfg.alpha == 0,
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
    weights = objective.weights
    if objective.is_mle(cfg) or (weights is None and objective.loss is None):
        return impl.loss(model, batch)
    if objective.loss is not None:
        return objective.loss(model, batch, cfg)
    return impl.loss(model, batch, lambda q: weights(q, cfg))
