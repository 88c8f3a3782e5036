"""Data regimes: which documents each generation trains on, keyed and recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from collapse.config import Config, ConfigError, TrainConfig, load_config
from collapse.context import Context, open_run
from collapse.pipeline import run_stage, stage_key
from collapse.regimes import describe, select_documents

LENGTHS = {0: np.full(100, 10), 1: np.full(60, 7), 2: np.full(50, 5)}


def _lengths(gen: int) -> np.ndarray:
    return LENGTHS[gen]


@pytest.mark.parametrize("regime", ["replace", "accumulate", "mix"])
def test_generation_1_trains_on_the_human_corpus_under_every_regime(regime: str):
    assert select_documents(1, TrainConfig(regime=regime), _lengths, 0) == [(0, None)]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.55, 1.0])
def test_mix_holds_the_real_fraction_and_the_previous_corpus_size(fraction: float):
    cfg = TrainConfig(regime="mix", real_fraction=fraction)
    selection = select_documents(3, cfg, _lengths, seed=1)
    counts = {gen: len(idx) for gen, idx in selection}
    assert sum(counts.values()) == 50  # the size of generation 2's corpus
    assert abs(counts.get(0, 0) - fraction * 50) <= 1
    for gen, idx in selection:
        assert len(set(idx.tolist())) == len(idx) and idx.max() < len(LENGTHS[gen])
    assert select_documents(3, cfg, _lengths, seed=1)[0][1].tolist() == selection[0][1].tolist()


def test_accumulate_takes_every_corpus_so_far_or_a_seeded_token_budget():
    everything = select_documents(3, TrainConfig(regime="accumulate"), _lengths, 0)
    assert everything == [(0, None), (1, None), (2, None)]
    assert describe(everything, _lengths) == [
        {"generation": 0, "documents": 100, "tokens": 1000},
        {"generation": 1, "documents": 60, "tokens": 420},
        {"generation": 2, "documents": 50, "tokens": 250},
    ]
    budget = TrainConfig(regime="accumulate", accumulate_tokens=600)
    chosen = select_documents(3, budget, _lengths, 7)
    tokens = sum(row["tokens"] for row in describe(chosen, _lengths))
    # the seeded order is cut at the first document that meets the budget (longest: 10 tokens)
    assert 600 <= tokens < 600 + 10
    assert len({g for g, _ in chosen}) == 3  # drawn from every corpus


def test_regime_settings_are_checked(tiny_config_file: Path):
    with pytest.raises(ConfigError, match="train.regime"):
        load_config(tiny_config_file, ["train.regime=recycle"])
    with pytest.raises(ConfigError, match="train.real_fraction"):
        load_config(tiny_config_file, ["train.regime=mix", "train.real_fraction=1.5"])


def test_accumulate_trains_on_both_earlier_corpora_and_keys_them(tiny_run: Context, tmp_path):
    shutil.copytree(tiny_run.store.run_dir, tmp_path / "tiny-accumulate")
    store = open_run(tmp_path / "tiny-accumulate").store
    data = tiny_run.config.model_dump(mode="json")
    data["train"]["regime"] = "accumulate"
    ctx = Context(Config.model_validate(data), store, log=lambda _: None)
    assert stage_key(ctx, 1, "train") != stage_key(tiny_run, 1, "train")  # the setting differs
    record = run_stage(ctx, 2, "train")
    assert not record["reused"]
    human = tiny_run.store.read_manifest(0)["stages"]["corpus"]["info"]["train_documents"]
    assert record["info"]["corpora"] == [
        {"generation": 0, "documents": human, "tokens": record["info"]["corpora"][0]["tokens"]},
        {"generation": 1, "documents": 120, "tokens": record["info"]["corpora"][1]["tokens"]},
    ]
    replaced = tiny_run.store.read_manifest(2)["stages"]["train"]["info"]
    assert replaced["corpora"] == [record["info"]["corpora"][1]]  # replace: generation 1 only
    assert record["info"]["blocks"] > replaced["blocks"]
