"""The sampler: pure ancestral sampling, equal to transformers' generate, resumable by shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from collapse.config import SampleConfig
from collapse.corpus.parquet import shard_name
from collapse.sample import draw_tokens, sample_batch, sample_corpus, shard_sizes
from collapse.store import sha256_file


def test_draw_tokens_samples_the_exact_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.manual_seed(0)
    draws = torch.stack([draw_tokens(probs) for _ in range(20000)])
    assert set(draws[:, 1].tolist()) == {4}
    freq = torch.bincount(draws[:, 0], minlength=5).double() / len(draws)
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens are never drawn
    # within 5 standard errors of the true probabilities
    se = (probs[0] * (1 - probs[0]) / len(draws)).sqrt().double()
    assert torch.all((freq - probs[0].double()).abs() <= 5 * se + 1e-12)


def _draw_by_full_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The one-level inverse CDF over the whole vocabulary, as the reference."""
    cdf = probs.double().cumsum(dim=-1)
    found = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)
    return found.squeeze(1).clamp(max=probs.shape[1] - 1)


def test_two_level_draw_matches_the_full_cdf_on_a_gpt_sized_vocabulary():
    # 50257 tokens: 98 whole blocks and a short last one; peaked and flat distributions
    generator = torch.Generator().manual_seed(0)
    for sharpness in (1.0, 4.0, 12.0):
        probs = torch.softmax(torch.randn(1024, 50257, generator=generator) * sharpness, -1)
        u = torch.rand(1024, dtype=torch.float64, generator=generator)
        assert torch.equal(draw_tokens(probs, u), _draw_by_full_cdf(probs, u))
    # the extreme uniforms, and every target inside the short last block
    probs = torch.softmax(torch.randn(4, 50257, generator=generator), -1)
    probs[2] = 0.0
    probs[2, 50256] = 1.0
    u = torch.tensor([0.0, 1.0 - 2.0**-53, 0.5, 0.999999], dtype=torch.float64)
    assert torch.equal(draw_tokens(probs, u), _draw_by_full_cdf(probs, u))
    assert draw_tokens(probs, u)[2] == 50256


def test_two_level_draw_never_takes_a_token_without_mass():
    # top-k style rows: mass on a few scattered tokens, the rest exactly 0 (from -inf scores)
    generator = torch.Generator().manual_seed(1)
    scores = torch.full((64, 20000), float("-inf"))
    kept = torch.randint(0, 20000, (64, 3), generator=generator)
    scores.scatter_(1, kept, torch.randn(64, 3, generator=generator))
    probs = torch.softmax(scores, -1)
    for u in (torch.zeros(64), torch.full((64,), 1.0 - 2.0**-53), torch.rand(64)):
        drawn = draw_tokens(probs, u.double())
        assert bool((probs.gather(1, drawn[:, None]) > 0).all())


def test_first_token_follows_the_model_distribution(tiny_model):
    with torch.no_grad():
        probs = tiny_model(torch.zeros(1, 1, dtype=torch.long)).logits[0, -1].softmax(-1)
    torch.manual_seed(1)
    seqs, ended = sample_batch(tiny_model, 4000, 1, bos_id=0, eos_id=0)
    first = torch.tensor([s[0] if s else 0 for s in seqs])
    freq = torch.bincount(first, minlength=50).double() / 4000
    se = (probs * (1 - probs) / 4000).sqrt().double()
    assert torch.all((freq - probs.double()).abs() <= 5 * se + 1e-3)
    assert sum(ended) == sum(1 for s in seqs if not s)  # EOS first = empty, finished story


def test_top_k_restricts_the_support(tiny_model):
    torch.manual_seed(0)
    seqs, _ = sample_batch(tiny_model, 8, 1, bos_id=0, eos_id=0, top_k=1)
    with torch.no_grad():
        best = int(tiny_model(torch.zeros(1, 1, dtype=torch.long)).logits[0, -1].argmax())
    assert all(s == ([best] if best != 0 else []) for s in seqs)


class _Tok:
    bos_token_id = eos_token_id = 0

    def batch_decode(self, ids):
        return [" ".join(map(str, row)) for row in ids]


def _cfg(**kw):
    base = dict(
        num_sequences=10,
        max_new_tokens=12,
        batch_size=4,
        shard_size=4,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        rng="shard",
    )
    return SampleConfig(**{**base, **kw})


def test_shards_resume_byte_identical(tmp_path: Path, tiny_model):
    cpu = torch.device("cpu")
    full, part = tmp_path / "full", tmp_path / "part"
    sample_corpus(tiny_model, _Tok(), _cfg(), full, seed=1, progress_key="k", device=cpu)
    assert shard_sizes(10, 4) == [4, 4, 2]
    names = [shard_name(i) for i in range(3)]
    # the progress file stays until the caller has recorded the shards (and removes it)
    assert sorted(p.name for p in full.iterdir()) == ["_progress.json", *names]
    # a run that stopped after shard 0: progress file lists it; shards 1-2 absent
    sample_corpus(
        tiny_model, _Tok(), _cfg(num_sequences=4), part, seed=1, progress_key="k", device=cpu
    )
    (part / "_progress.json").write_text(
        json.dumps({"key": "k", "shards": {names[0]: sha256_file(part / names[0])}})
    )
    stats = sample_corpus(tiny_model, _Tok(), _cfg(), part, seed=1, progress_key="k", device=cpu)
    assert stats["shards_reused"] == 1
    for name in names:
        assert sha256_file(part / name) == sha256_file(full / name)
    table = pq.read_table(full / names[0])
    assert table.num_rows == 4
    lengths = table.column("length").to_pylist()
    assert all(n <= 12 for n in lengths)
    assert [len(x) for x in table.column("input_ids").to_pylist()] == lengths


def test_a_progress_file_from_other_inputs_is_ignored(tmp_path: Path, tiny_model):
    cpu = torch.device("cpu")
    sample_corpus(tiny_model, _Tok(), _cfg(), tmp_path, seed=1, progress_key="old", device=cpu)
    before = sha256_file(tmp_path / shard_name(0))
    (tmp_path / "_progress.json").write_text(
        json.dumps({"key": "old", "shards": {shard_name(0): before}})
    )
    stats = sample_corpus(
        tiny_model, _Tok(), _cfg(), tmp_path, seed=2, progress_key="new", device=cpu
    )
    assert stats["shards_reused"] == 0
    assert sha256_file(tmp_path / shard_name(0)) != before


def test_a_prefix_conditions_every_sequence_of_the_batch(tiny_model):
    prefix = [5, 6, 7]
    with torch.no_grad():
        probs = tiny_model(torch.tensor([[0, *prefix]])).logits[0, -1].softmax(-1).double()
        unconditioned = tiny_model(torch.tensor([[0]])).logits[0, -1].softmax(-1).double()
    n = 20000
    torch.manual_seed(2)
    seqs, _ = sample_batch(tiny_model, n, 1, bos_id=0, eos_id=0, prefix=prefix)
    first = torch.tensor([s[0] if s else 0 for s in seqs])
    freq = torch.bincount(first, minlength=50).double() / n
    tolerance = 5 * (probs * (1 - probs) / n).sqrt() + 1e-3
    assert torch.all((freq - probs).abs() <= tolerance)
    assert not torch.all((freq - unconditioned).abs() <= tolerance)  # the prefix mattered


def test_with_per_story_randomness_a_story_does_not_depend_on_the_batch(tmp_path: Path, tiny_model):
    cpu = torch.device("cpu")
    shards = {}
    for batch in (1, 3, 4, 10):
        out = tmp_path / f"batch-{batch}"
        cfg = _cfg(batch_size=batch, shard_size=10, rng="story", max_new_tokens=20)
        sample_corpus(tiny_model, _Tok(), cfg, out, seed=1, progress_key="k", device=cpu)
        shards[batch] = sha256_file(out / shard_name(0))
    assert len(set(shards.values())) == 1, shards
    # and stories are stories of their own: another seed, other stories
    other = tmp_path / "other-seed"
    cfg = _cfg(shard_size=10, rng="story", max_new_tokens=20)
    sample_corpus(tiny_model, _Tok(), cfg, other, seed=2, progress_key="k", device=cpu)
    assert sha256_file(other / shard_name(0)) != shards[1]


def _pairs(seqs: list[list[int]]) -> np.ndarray:
    """Each sample's first two new tokens, EOS (0) standing for 'ended'."""
    return np.array([(s + [0, 0])[:2] for s in seqs])


def generate_pairs(model: torch.nn.Module, n: int, seed: int) -> np.ndarray:
    """First two tokens of `n` samples of transformers' `generate(top_k=0, top_p=1.0)`."""
    torch.manual_seed(seed)
    with torch.no_grad():
        generated = model.generate(
            torch.zeros(n, 1, dtype=torch.long),
            attention_mask=torch.ones(n, 1, dtype=torch.long),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=2,
            pad_token_id=0,
            eos_token_id=0,
        )
    pairs = generated[:, 1:].numpy()
    return np.concatenate([pairs, np.zeros((n, 2 - pairs.shape[1]), dtype=pairs.dtype)], 1)


def homogeneity_pvalue(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Two-sample chi-square test of homogeneity on the joint law of the first two tokens.

    A cell is (first token, second token mod 5): 250 cells of ~32 pooled samples for 4000
    samples per side on a near-uniform random model with 50 ids; cells with a pooled count
    under 20 are merged into one, so every expected count is large enough for the chi-square
    approximation. Under the null (same distribution) p is uniform, so a correct sampler fails
    `p > 1e-3` with probability 1e-3 (seeds are fixed: deterministic here). A sampler that drops
    low-probability tokens fails it (checked by hand: top_k=45, dropping the 5 least likely of
    50 tokens, gives p ~ 1e-19; top_k=5 gives p = 0). It has little power against temperature
    on this near-uniform model (0.8 gave p = 0.54): temperature is transformers' own warper.
    """
    codes_ours, codes_theirs = (x[:, 0] * 5 + x[:, 1] % 5 for x in (ours, theirs))
    cells = np.unique(np.concatenate([codes_ours, codes_theirs]))
    a = np.array([(codes_ours == c).sum() for c in cells])
    b = np.array([(codes_theirs == c).sum() for c in cells])
    big = a + b >= 20
    table = np.array([[*a[big], a[~big].sum()], [*b[big], b[~big].sum()]])
    assert table.shape[1] > 100  # many cells: the test has power
    return float(stats.chi2_contingency(table).pvalue)


@pytest.mark.parametrize("rng", ["shard", "story"])
def test_ours_and_generate_sample_the_same_distribution(tiny_model, rng: str):
    """4000 samples each from ours and `generate`: see `homogeneity_pvalue`."""
    n = 4000
    torch.manual_seed(11)
    stories = (5, torch.arange(n)) if rng == "story" else None
    ours = _pairs(sample_batch(tiny_model, n, 2, bos_id=0, eos_id=0, stories=stories)[0])
    assert homogeneity_pvalue(ours, generate_pairs(tiny_model, n, seed=12)) > 1e-3
