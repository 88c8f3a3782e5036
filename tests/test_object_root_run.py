"""A run under an S3 artifact root, every stage on a machine of its own, equals a local run."""

from __future__ import annotations

from pathlib import Path

import pytest

from collapse.config import config_to_dict, validate_config
from collapse.context import Context, open_run
from collapse.object_store import STAGING_ENV
from collapse.pipeline import freeze_config, metrics_table, run_stage, stages_of
from collapse.report import write_report
from collapse.store import RunStore

from .conftest import tiny_config_dict
from .object_roots import make_root

# Outputs whose bytes hold wall times (some evaluations' seconds) differ between two runs; the
# data chain's files and every metric value must not.
CHAIN_FILES = ("/corpus/", "/model/", "train.json", "/tokenizer/", "validation.parquet")


def _chain_files(ctx: Context) -> dict[str, str]:
    files = {}
    for gen in range(ctx.config.run.generations + 1):
        for record in ctx.store.read_manifest(gen)["stages"].values():
            files.update(
                {k: v for k, v in record["outputs"].items() if any(c in k for c in CHAIN_FILES)}
            )
    return files


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def test_every_stage_on_a_machine_of_its_own_over_s3_equals_a_local_run(
    tiny_run: Context, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    root = make_root("s3", tmp_path, s3_endpoint)
    data = config_to_dict(tiny_run.config)
    data["run"]["artifact_root"] = root.root
    config = validate_config(data)

    def machine(name: str) -> Context:
        """A context whose staging copy starts empty, as on a worker that never saw the run."""
        return Context(config, RunStore(root.root, "tiny", staging=tmp_path / name), log=print)

    freeze_config(machine("submitter"))
    workers = {}
    for gen in range(config.run.generations + 1):
        for stage in stages_of(tiny_run, gen):
            workers[gen, stage] = machine(f"worker-{len(workers)}")
            record = run_stage(workers[gen, stage], gen, stage)
            assert not record["reused"], (gen, stage)
    # each fetched what it read: generation 1's sampler the model trained on another machine
    sampler = workers[1, "sample"].store
    assert (sampler.model_dir(1) / "config.json").is_file()
    assert not sampler.train_stats_path(1).exists()  # not read, so not fetched

    again = machine("another")
    for gen in range(config.run.generations + 1):
        for stage in stages_of(again, gen):
            assert run_stage(again, gen, stage)["reused"], (gen, stage)
    # Deciding that everything is done downloaded nothing (not even a staging copy was made).
    assert not [p for p in (tmp_path / "another").rglob("*") if p.is_file()]

    assert _chain_files(again) == _chain_files(tiny_run)
    table = _without_timings(metrics_table(again, valid_only=True))
    assert table == _without_timings(metrics_table(tiny_run, valid_only=True))
    assert table[2]["perplexity"] is not None

    opened = open_run(again.store.location)  # `collapse report s3://.../tiny` reads it so
    assert opened.config == config and opened.store.location == f"{root.root}/tiny"
    page = write_report([opened.store.location])
    assert "report.html" in root.stored(opened.store)
    assert root.stored(opened.store)["report.html"] == page.read_bytes()


def test_training_killed_on_one_machine_resumes_from_its_checkpoint_on_another(
    s3_endpoint: str, story_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    root = make_root("s3", tmp_path, s3_endpoint)
    data = tiny_config_dict(story_file, root.root, generations=1)
    data["eval"] = {"metrics": ["entropy"]}
    config = validate_config(data)

    def machine(name: str, logs: list[str]) -> Context:
        return Context(config, RunStore(root.root, "run", staging=tmp_path / name), log=logs.append)

    first = machine("a", [])
    freeze_config(first)
    run_stage(first, 0, "corpus")
    save = RunStore.save_partial

    def saved_then_killed(store: RunStore, path: Path) -> None:
        save(store, path)
        raise KeyboardInterrupt  # the machine dies right after its first checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(RunStore, "save_partial", saved_then_killed)
        with pytest.raises(KeyboardInterrupt):
            run_stage(first, 1, "train")
    logs: list[str] = []
    second = machine("b", logs)
    run_stage(second, 1, "train")
    assert any("resuming training from checkpoint at step" in line for line in logs), logs
    assert not [n for n in root.stored(second.store) if "train-state" in n]

    local = Context(
        validate_config({**data, "run": {**data["run"], "artifact_root": str(tmp_path / "local")}}),
        RunStore(tmp_path / "local", "run"),
        log=lambda _: None,
    )
    freeze_config(local)
    run_stage(local, 0, "corpus")
    run_stage(local, 1, "train")
    resumed = second.store.read_manifest(1)["stages"]["train"]
    uninterrupted = local.store.read_manifest(1)["stages"]["train"]
    assert resumed["outputs"] == uninterrupted["outputs"]  # weights and statistics
    assert resumed["info"]["resumed_from_step"] > 0
    assert uninterrupted["info"]["resumed_from_step"] == 0


def _killed_while_recording(
    ctx: Context, gen: int, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run (gen, stage) in a process that dies as it records the stage (KeyboardInterrupt)."""
    record = RunStore.record_stage

    def killed(store: RunStore, generation: int, name: str, *args, **kwargs):
        if name == stage:
            raise KeyboardInterrupt
        return record(store, generation, name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(RunStore, "record_stage", killed)
        with pytest.raises(KeyboardInterrupt):
            run_stage(ctx, gen, stage)


def test_a_machine_killed_while_publishing_its_model_leaves_its_checkpoint_to_resume_from(
    s3_endpoint: str, story_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Publishing a trained model takes a while under a URL root; a machine killed meanwhile
    must not have thrown its checkpoint away already (else the next one trains from step 0)."""
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    root = make_root("s3", tmp_path, s3_endpoint)
    data = tiny_config_dict(story_file, root.root, generations=1)
    data["eval"] = {"metrics": ["entropy"]}
    config = validate_config(data)

    def machine(name: str) -> Context:
        return Context(config, RunStore(root.root, "run", staging=tmp_path / name), log=print)

    first = machine("a")
    freeze_config(first)
    run_stage(first, 0, "corpus")
    _killed_while_recording(first, 1, "train", monkeypatch)
    resumed = run_stage(machine("b"), 1, "train")
    assert resumed["info"]["resumed_from_step"] > 0
    assert not [n for n in root.stored(first.store) if "train-state" in n]


def test_a_run_killed_while_recording_its_corpus_resumes_with_every_shard_done(
    story_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Hashing and recording a sampled corpus takes a moment (seconds at paper scale); a kill
    meanwhile must find the progress file still there, not sample every shard again."""
    data = tiny_config_dict(story_file, str(tmp_path / "artifacts"), generations=1)
    data["eval"] = {"metrics": ["entropy"]}
    ctx = Context(validate_config(data), RunStore(tmp_path / "artifacts", "run"), log=print)
    freeze_config(ctx)
    for gen, stage in ((0, "corpus"), (1, "train")):
        run_stage(ctx, gen, stage)
    _killed_while_recording(ctx, 1, "sample", monkeypatch)
    resumed = run_stage(ctx, 1, "sample")
    assert resumed["info"]["shards_reused"] == resumed["info"]["shards"] == 3
    assert not ctx.store.sample_progress_path(1).exists()  # gone once the record is written
    assert sorted(resumed["outputs"]) == [f"gen-001/corpus/part-0000{i}.parquet" for i in range(3)]
