"""Continuous batching: a story's tokens do not depend on its slot, the pool size or its
neighbours; corpora sampled through slots resume byte-identical and follow the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from collapse.config import ModelConfig
from collapse.corpus.parquet import shard_name
from collapse.models import build_model, save_model
from collapse.models.gpt_neo_hf import IMPLEMENTATION as REFERENCE
from collapse.sample import sample_batch, sample_corpus
from collapse.slot_sampler import sample_stories
from collapse.store import sha256_file

from .test_sample import _cfg, _pairs, _Tok, generate_pairs, homogeneity_pvalue

# window 8 < story lengths: restarted rows must not see the ring buffer of a previous story
FAST = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    max_position_embeddings=64,
    window_size=8,
    implementation="fast",
)


@pytest.fixture(scope="module")
def fast_model() -> torch.nn.Module:
    return build_model(FAST, 50, 0, 0, seed=3).eval()


def _stories(model, n: int, **kw) -> dict[int, tuple[list[int], bool]]:
    found = sample_stories(
        model, list(range(n)), key=5, max_new_tokens=30, start_id=0, end_id=0, **kw
    )
    return {story: (tokens, ended) for story, tokens, ended in found}


def test_a_story_is_the_same_in_any_slot_pool_and_as_in_a_static_batch(fast_model):
    n = 40
    static, ended = sample_batch(fast_model, n, 30, 0, 0, stories=(5, torch.arange(n)))
    expected = {i: (static[i], ended[i]) for i in range(n)}
    assert 0 < sum(ended) < n  # some stories end with EOS, some hit the cap
    assert max(len(s) for s in static) == 30 and min(len(s) for s in static) < 10
    for slots, check_every in ((1, 1), (3, 1), (7, 1), (40, 1), (3, 8), (7, 5), (40, 30)):
        assert _stories(fast_model, n, slots=slots, check_every=check_every) == expected, (
            slots,
            check_every,
        )


def test_stories_are_handed_out_once_each_as_they_end(fast_model):
    order = [
        story
        for story, _, _ in sample_stories(
            fast_model, [5, 2, 9, 7], key=1, max_new_tokens=30, start_id=0, end_id=0, slots=2
        )
    ]
    assert sorted(order) == [2, 5, 7, 9]


def test_the_reference_implementation_is_refused(tiny_model):
    with pytest.raises(ValueError, match="cannot restart single rows"):
        next(
            sample_stories(tiny_model, [0], key=1, max_new_tokens=3, start_id=0, end_id=0, slots=1)
        )


def test_slot_corpora_do_not_depend_on_batch_size_and_resume_byte_identical(
    tmp_path: Path, fast_model
):
    cpu = torch.device("cpu")
    hashes = {}
    for batch, slots in ((1, None), (4, None), (10, None), (4, 7)):
        out = tmp_path / f"batch-{batch}-{slots}"
        cfg = _cfg(
            num_sequences=10,
            batch_size=batch,
            slots=slots,
            shard_size=4,
            rng="story",
            max_new_tokens=30,
        )
        sample_corpus(fast_model, _Tok(), cfg, out, seed=1, progress_key="k", device=cpu)
        hashes[batch, slots] = [sha256_file(out / shard_name(i)) for i in range(3)]
    assert hashes[1, None] == hashes[4, None] == hashes[10, None] == hashes[4, 7]
    hashes[4] = hashes[4, None]
    # a run that stopped after shard 1: the rest is sampled again, identically
    part = tmp_path / "part"
    cfg = _cfg(num_sequences=10, batch_size=4, shard_size=4, rng="story", max_new_tokens=30)
    sample_corpus(fast_model, _Tok(), cfg, part, seed=1, progress_key="k", device=cpu)
    (part / shard_name(0)).unlink()
    (part / shard_name(2)).write_bytes(b"truncated")
    progress = {shard_name(1): sha256_file(part / shard_name(1))}
    (part / "_progress.json").write_text(json.dumps({"key": "k", "shards": progress}))
    stats_ = sample_corpus(fast_model, _Tok(), cfg, part, seed=1, progress_key="k", device=cpu)
    assert stats_["shards_reused"] == 1
    assert [sha256_file(part / shard_name(i)) for i in range(3)] == hashes[4]


def test_a_saved_fast_model_samples_the_same_through_both_implementations(
    tmp_path: Path, fast_model
):
    # the sampled corpus depends on the weights, not on which code read the checkpoint
    save_model(fast_model, tmp_path)
    reference = REFERENCE.load(tmp_path, torch.device("cpu")).eval()
    n = 30
    ours = sample_batch(fast_model, n, 20, 0, 0, stories=(9, torch.arange(n)))
    theirs = sample_batch(reference, n, 20, 0, 0, stories=(9, torch.arange(n)))
    assert ours == theirs


def test_slot_sampling_follows_the_model_distribution(fast_model):
    """4000 samples through slots against `generate`: see `test_sample.homogeneity_pvalue`."""
    n = 4000
    found = sample_stories(
        fast_model, list(range(n)), key=3, max_new_tokens=2, start_id=0, end_id=0, slots=500
    )
    ours = _pairs([tokens for _, tokens, _ in found])
    reference = build_model(FAST.model_copy(update={"implementation": "transformers"}), 50, 0, 0, 3)
    assert homogeneity_pvalue(ours, generate_pairs(reference.eval(), n, seed=12)) > 1e-3


def test_under_bf16_autocast_a_story_still_does_not_depend_on_its_slot(fast_model):
    """What `sample.precision: bf16` runs on a GPU (autocast around the decode loop), here on
    the CPU: the cache holds bf16 keys and values, the logits are not fp32's, and a story is
    the same in any pool."""
    from collapse.models import implementation_of

    impl = implementation_of(fast_model)
    start = torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():
        exact, _ = impl.prefill(fast_model, start)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, state = impl.prefill(fast_model, start)
            pools = [_stories(fast_model, 12, slots=slots, check_every=4) for slots in (1, 4, 12)]
    assert state.keys[0].dtype == torch.bfloat16
    assert not torch.equal(low.float(), exact.float())
    assert pools[0] == pools[1] == pools[2]


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_the_cpu_samples_in_fp32_whatever_the_precision(tmp_path: Path, fast_model, precision):
    """Mixed precision is a GPU setting (as for training): a CPU corpus is exact fp32."""
    cpu = torch.device("cpu")
    hashes = {}
    for name in ("fp32", precision):
        cfg = _cfg(num_sequences=6, shard_size=6, rng="story", max_new_tokens=20, precision=name)
        stats = sample_corpus(
            fast_model, _Tok(), cfg, tmp_path / name, seed=1, progress_key="k", device=cpu
        )
        assert stats["precision"] == "float32"
        hashes[name] = sha256_file(tmp_path / name / shard_name(0))
    assert hashes[precision] == hashes["fp32"]


@pytest.mark.gpu
def test_on_a_gpu_auto_samples_under_bf16_autocast(tmp_path: Path):
    cuda = torch.device("cuda")
    model = build_model(FAST, 50, 0, 0, seed=3).eval().to(cuda)
    cfg = _cfg(num_sequences=40, shard_size=20, rng="story", max_new_tokens=30, precision="auto")
    stats = sample_corpus(model, _Tok(), cfg, tmp_path, seed=1, progress_key="k", device=cuda)
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert stats["precision"] == expected and stats["sequences"] == 40
    # the logits leave the head in fp32, not rounded to the autocast dtype
    from collapse.models import implementation_of

    start = torch.zeros(2, 1, dtype=torch.long, device=cuda)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, state = implementation_of(model).prefill(model, start)
        logits, _ = implementation_of(model).decode(model, start[:, 0], state)
    assert logits.dtype == torch.float32


def test_asked_for_cuda_graphs_where_none_can_run_the_steps_run_one_by_one(tmp_path: Path):
    """On the CPU (no CUDA, no flash attention) `sample.cuda_graphs` changes nothing but the
    record, which says why the graphs were off and how the pool attended."""
    model = build_model(FAST, 50, 0, 0, seed=3).eval()
    cpu = torch.device("cpu")
    records = {}
    for graphs in (False, True):
        cfg = _cfg(
            num_sequences=8, shard_size=8, rng="story", max_new_tokens=20, cuda_graphs=graphs
        )
        records[graphs] = sample_corpus(
            model, _Tok(), cfg, tmp_path / str(graphs), seed=1, progress_key="k", device=cpu
        )
    assert records[True]["decode"] == {
        "attention": "sdpa (cpu device (flash needs CUDA))",
        "cuda_graphs": "off: cpu device",
    }
    assert records[False]["decode"]["cuda_graphs"] == "off"
    hashes = {g: sha256_file(tmp_path / str(g) / shard_name(0)) for g in records}
    assert hashes[True] == hashes[False]


@pytest.mark.gpu
def test_replayed_cuda_graphs_sample_the_stories_of_step_by_step_decoding():
    cuda = torch.device("cuda")
    # head size 16: flash decode attention, which the graphs need
    fields = FAST.model_copy(update={"hidden_size": 64})
    model = build_model(fields, 50, 0, 0, seed=3).eval().to(cuda)
    runs, reports = [], []
    for graphs in (False, True):
        report: dict[str, str] = {}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            found = sample_stories(
                model,
                list(range(60)),
                key=5,
                max_new_tokens=30,
                start_id=0,
                end_id=0,
                slots=16,
                device=cuda,
                cuda_graphs=graphs,
                report=report,
            )
            runs.append({story: (tokens, ended) for story, tokens, ended in found})
        reports.append(report)
    assert reports[1] == {"attention": "flash", "cuda_graphs": "on"}, reports
    assert runs[0].keys() == runs[1].keys() == set(range(60))
    # the same kernels on the same inputs; should cuBLAS pick another GEMM algorithm while
    # recording, a bf16 logit moves and a story can fork at a near tie: a few may differ, a
    # graph replaying wrong inputs would change nearly all
    same = sum(runs[0][story] == runs[1][story] for story in runs[0])
    assert same >= 54, f"{same} of 60 stories the same"
