"""Data regimes, declared once: which documents generation g trains on (`train.regime`).

- `replace` (the paper): generation g-1's corpus.
- `accumulate` (Gerstgrasser et al. 2024): the human corpus and every generated corpus so far,
  optionally a seeded subsample of them to `train.accumulate_tokens` tokens.
- `mix` (Shumailov et al. 2024, keeping real data): as many documents as generation g-1's
  corpus holds, `train.real_fraction` of them human stories, the rest generated ones, both
  drawn without replacement by a seeded choice.

Generation 1 trains on the human corpus under every regime. A selection is a list of
(generation, sorted document indices or None for all), a pure function of the config, the
generation and the corpora's document counts; the training stage keys it with the digests of
the corpora it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Selection = list[tuple[int, "np.ndarray | None"]]


@dataclass(frozen=True)
class Regime:
    """A data regime.

    Attributes:
        name: the `train.regime` value.
        description: one line for the docs.
        settings: the `train.*` fields it reads (in the training key only when chosen).
        reads: generation g -> the generations whose corpora it may draw from (their digests
            go into the training key).
        select: (generation g >= 2, train config, per-generation document lengths, seed) ->
            the documents generation g trains on.
    """

    name: str
    description: str
    settings: tuple[str, ...]
    reads: Callable[[int], list[int]]
    select: Callable[[int, Any, Callable[[int], np.ndarray], int], Selection]


def _replace(gen: int, cfg: Any, lengths: Callable[[int], np.ndarray], seed: int) -> Selection:
    return [(gen - 1, None)]


def _accumulate(gen: int, cfg: Any, lengths: Callable[[int], np.ndarray], seed: int) -> Selection:
    if cfg.accumulate_tokens is None:
        return [(g, None) for g in range(gen)]
    # a seeded order over every (generation, document); keep documents until the budget is met
    owners = [np.full(len(lengths(g)), g) for g in range(gen)]
    indices = [np.arange(len(lengths(g))) for g in range(gen)]
    sizes = np.concatenate([lengths(g) for g in range(gen)])
    order = np.random.default_rng(seed).permutation(len(sizes))
    reached = np.searchsorted(np.cumsum(sizes[order]), cfg.accumulate_tokens)
    keep = order[: reached + 1]
    owner, index = np.concatenate(owners)[keep], np.concatenate(indices)[keep]
    return [(g, np.sort(index[owner == g])) for g in range(gen) if (owner == g).any()]


def _mix(gen: int, cfg: Any, lengths: Callable[[int], np.ndarray], seed: int) -> Selection:
    total = len(lengths(gen - 1))
    human = len(lengths(0))
    real = min(human, round(cfg.real_fraction * total))
    rng = np.random.default_rng(seed)
    parts: Selection = []
    if real:
        parts.append((0, np.sort(rng.choice(human, size=real, replace=False))))
    if total - real:
        parts.append((gen - 1, np.sort(rng.choice(total, size=total - real, replace=False))))
    return parts


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime(
            "replace",
            "Train on the previous generation's corpus (the paper).",
            (),
            lambda gen: [gen - 1],
            _replace,
        ),
        Regime(
            "accumulate",
            "Train on the human corpus plus every generated corpus so far (optionally "
            "subsampled to train.accumulate_tokens).",
            ("accumulate_tokens",),
            lambda gen: list(range(gen)),
            _accumulate,
        ),
        Regime(
            "mix",
            "As many documents as the previous corpus, train.real_fraction of them human.",
            ("real_fraction",),
            lambda gen: sorted({0, gen - 1}),
            _mix,
        ),
    )
}
REGIME_SETTINGS = tuple(sorted({s for r in REGIMES.values() for s in r.settings}))


def select_documents(
    gen: int, cfg: Any, lengths: Callable[[int], np.ndarray], seed: int
) -> Selection:
    """The documents generation `gen` trains on under `cfg.regime` (see the module docstring).

    Args:
        gen: the generation being trained (>= 1).
        cfg: the train config.
        lengths: generation -> token length of each of its corpus's documents.
        seed: the selection's seed (derived from the run seed and `gen`).
    """
    if gen == 1:
        return [(0, None)]
    return REGIMES[cfg.regime].select(gen, cfg, lengths, seed)


def describe(selection: Selection, lengths: Callable[[int], np.ndarray]) -> list[dict[str, int]]:
    """Per corpus: generation, documents and tokens taken (for the stage's manifest record)."""
    rows = []
    for gen, indices in selection:
        taken = lengths(gen) if indices is None else lengths(gen)[indices]
        rows.append({"generation": gen, "documents": len(taken), "tokens": int(taken.sum())})
    return rows


def unused_settings(regime: str) -> set[str]:
    """The regime settings `regime` does not read."""
    return set(REGIME_SETTINGS) - set(REGIMES[regime].settings)
