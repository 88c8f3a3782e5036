"""Runs under one artifact root share stages whose keys are equal (e.g. a sweep's generation 0)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from collapse.config import Config
from collapse.context import Context
from collapse.object_store import STAGING_ENV
from collapse.pipeline import freeze_config, stages_of

from .conftest import run_all, tiny_config_dict, write_story_file
from .object_roots import make_root


def _run(root: Path | str, corpus: Path, run_id: str, **train) -> tuple[Context, dict]:
    data = tiny_config_dict(corpus, root, generations=1)
    data["train"].update(train)
    data["run"]["run_id"] = run_id
    data["sample"].update(num_sequences=40)
    data["eval"] = {"metrics": ["entropy", "excerpts"]}
    config = Config.model_validate(data)
    from collapse.store import RunStore

    ctx = Context(config, RunStore(root, run_id), log=lambda _: None)
    freeze_config(ctx)
    return ctx, run_all(ctx)


@pytest.mark.parametrize("kind", ["path", "s3"])
def test_an_arm_takes_generation_0_from_a_sibling_and_computes_the_rest(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    corpus = write_story_file(tmp_path / "stories.txt", n=80)
    endpoint = request.getfixturevalue("s3_endpoint") if kind == "s3" else None
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    root = make_root(kind, tmp_path, endpoint).root
    first, _ = _run(root, corpus, "mle")
    second, records = _run(root, corpus, "mixce", objective="mixce", eta=0.5)
    for stage in stages_of(second, 0):
        assert records[(0, stage)]["copied_from"] == "mle", stage
        assert (
            records[(0, stage)]["digest"] == first.store.read_manifest(0)["stages"][stage]["digest"]
        )
    assert all("copied_from" not in records[(1, s)] for s in stages_of(second, 1))
    shard = "gen-000/corpus/part-00000.parquet"
    if kind == "path":  # hard links: one copy of the human corpus on disk
        assert os.path.samefile(first.store.run_dir / shard, second.store.run_dir / shard)
    else:  # published under the second run too
        assert second.store.valid_record(0, "corpus", None) is not None
        assert second.store.remote.exists(f"mixce/{shard}")


def test_a_sibling_output_that_changed_is_not_taken(tmp_path: Path):
    corpus = write_story_file(tmp_path / "stories.txt", n=80)
    root = tmp_path / "artifacts"
    first, _ = _run(root, corpus, "first")
    (first.store.validation_path()).write_bytes(b"edited")  # no longer its recorded sha256
    _, records = _run(root, corpus, "second", objective="tailr")
    assert "copied_from" not in records[(0, "corpus")]  # computed again, to the same digest
    # what depends only on that digest is still taken: its key is the same
    assert records[(0, "eval.entropy")]["copied_from"] == "first"


def test_taking_a_siblings_corpus_leaves_no_shard_of_an_earlier_one(tmp_path: Path):
    """Readers read a corpus folder's shards: one left from this run's own earlier computation
    (another `sample.shard_size`) must not be read beside the sibling's."""
    from collapse.store import RunStore, atomic_write_bytes

    sibling, mine = RunStore(tmp_path, "sibling"), RunStore(tmp_path, "mine")
    for i in range(2):
        atomic_write_bytes(sibling.corpus_dir(0) / f"part-{i:05d}.parquet", bytes([i]) * 10)
    record = sibling.record_stage(0, "corpus", "k", [sibling.corpus_dir(0)])
    for i in range(3):  # this run's earlier corpus: three smaller shards
        atomic_write_bytes(mine.corpus_dir(0) / f"part-{i:05d}.parquet", b"old")
    files = mine.adopt_outputs(sibling, record)
    assert sorted(p.name for p in mine.corpus_dir(0).iterdir()) == [p.name for p in files]
    assert [p.read_bytes() for p in files] == [bytes([0]) * 10, bytes([1]) * 10]
    # an evaluation's folder is every evaluation's: taking one leaves the others' results
    atomic_write_bytes(sibling.eval_path(0, "entropy"), b"{}")
    record = sibling.record_stage(0, "eval.entropy", "k", [sibling.eval_path(0, "entropy")])
    atomic_write_bytes(mine.eval_path(0, "oov"), b"{}")
    assert mine.adopt_outputs(sibling, record) == [mine.eval_path(0, "entropy")]
    assert mine.eval_path(0, "oov").is_file()
