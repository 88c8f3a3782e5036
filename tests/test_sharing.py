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
