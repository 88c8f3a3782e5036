"""The sampler: pure ancestral sampling, equal to transformers' generate, resumable by shard."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import torch

from collapse.corpus.parquet import shard_name
from collapse.sample import sample_batch, sample_corpus, shard_sizes
from collapse.store import sha256_file


def test_same_tokens_as_generate_under_the_same_seed(tiny_model):
    torch.manual_seed(11)
    ours, ended = sample_batch(tiny_model, 6, 40, bos_id=0, eos_id=0)
    torch.manual_seed(11)
    ref = tiny_model.generate(
        torch.zeros(6, 1, dtype=torch.long),
        attention_mask=torch.ones(6, 1, dtype=torch.long),
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=40,
        pad_token_id=0,
        eos_token_id=0,
    )
    for row, seq, fin in zip(ref.tolist(), ours, ended, strict=True):
        generated = row[1:]
        expected = generated[: generated.index(0)] if 0 in generated else generated
        assert seq == expected
        assert fin == (0 in generated)


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
    )
    return SimpleNamespace(**{**base, **kw})


def test_shards_resume_byte_identical(tmp_path: Path, tiny_model):
    cpu = torch.device("cpu")
    full, part = tmp_path / "full", tmp_path / "part"
    sample_corpus(tiny_model, _Tok(), _cfg(), full, seed=1, progress_key="k", device=cpu)
    assert shard_sizes(10, 4) == [4, 4, 2]
    names = [shard_name(i) for i in range(3)]
    assert sorted(p.name for p in full.iterdir()) == names  # progress file removed at the end
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
