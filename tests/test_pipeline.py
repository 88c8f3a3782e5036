"""The library pipeline without Prefect: every registered evaluation on a tiny 2-generation run,
the metrics table, reuse, and the report built from it."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from collapse.config import Config, EvalConfig
from collapse.context import Context
from collapse.evals import registry
from collapse.judge.instruction import build_messages
from collapse.pipeline import metrics_table, stages_of, table_columns
from collapse.table import BASELINE_NOTE, text_table

from .conftest import PLANTED_KEY, run_all
from .judge_server import JudgeServer, grades_for


def test_every_registered_evaluation_is_offered_and_the_cheap_ones_on_by_default():
    names = ["perplexity", "entropy", "oov", "diversity", "source_fit", "excerpts", "judge"]
    assert list(registry()) == [*names, "downstream"]
    # chosen only: downstream needs the hub and hours, source_fit the synthetic corpus
    assert EvalConfig().metrics == [n for n in names if n != "source_fit"]


def test_every_evaluation_writes_its_result(tiny_run: Context):
    ctx = tiny_run
    assert stages_of(ctx, 0) == [
        "corpus",
        "eval.entropy",
        "eval.oov",
        "eval.diversity",
        "eval.excerpts",
        "eval.judge",  # the random-init baseline
        "eval.downstream/word_order",  # fine-tuned from the random-init baseline
        "eval.downstream/coherence",
    ]
    for gen in (0, 1, 2):
        for stage in stages_of(ctx, gen)[1 if gen == 0 else 2 :]:
            name = stage.removeprefix("eval.")
            result = json.loads((ctx.store.gen_dir(gen) / "eval" / f"{name}.json").read_text())
            assert result["metric"] == name and result["generation"] == gen
    lexicon = ctx.store.gen_dir(0) / "eval" / "lexicon.json"
    assert lexicon.is_file()
    # the human corpus's own names are words: the template stories have no non-words at all
    oov0 = json.loads((ctx.store.gen_dir(0) / "eval" / "oov.json").read_text())
    assert oov0["occurrences"] == 0 and oov0["words"] > 1000
    excerpts = json.loads((ctx.store.gen_dir(2) / "eval" / "excerpts.json").read_text())
    assert excerpts["count"] == 4 and all(e["text"] for e in excerpts["excerpts"])


def test_metrics_table_has_a_column_per_evaluation_value(tiny_run: Context):
    rows = metrics_table(tiny_run)
    columns = table_columns(tiny_run.config)
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert rows[0]["perplexity"] is None and rows[1]["perplexity"] > 1
    for column in columns:
        if column.key != "perplexity":
            assert all(r[column.key] is not None for r in rows), column.key
    assert all(r["stages_done"] == r["stages_total"] for r in rows)
    text = text_table(rows, columns)
    assert "OOV/1k" in text and "self-BLEU" in text and "grammar" in text
    assert len(text.splitlines()) == 6  # header, rule, 3 rows, the note on the judge's row 0
    assert text.splitlines()[-1] == BASELINE_NOTE


def test_a_second_pass_reuses_every_stage_and_asks_the_judge_nothing(
    tiny_run: Context, judge_server: JudgeServer
):
    before = judge_server.count
    assert all(record["reused"] for record in run_all(tiny_run).values())
    assert judge_server.count == before


def test_a_model_retrained_to_the_same_weights_recomputes_nothing_after_it(tiny_run: Context):
    """Training's wall times stay out of its hashed outputs: a model retrained to the same
    weights (here because its weights file was lost) keeps its train digest, so the
    generation's sampling and evaluations, whose keys chain that digest, are reused."""
    before = tiny_run.store.read_manifest(2)["stages"]["train"]
    (tiny_run.store.model_dir(2) / "model.safetensors").unlink()
    records = run_all(tiny_run)
    assert records[(2, "train")]["outputs"] == before["outputs"]
    assert sorted(k for k, r in records.items() if not r["reused"]) == [(2, "train")]
    assert records[(2, "train")]["digest"] == before["digest"]
    assert records[(2, "train")]["completed_at"] != before["completed_at"]


def test_a_recomputation_killed_midway_still_keeps_what_its_output_left_valid(
    tiny_run: Context, monkeypatch: pytest.MonkeyPatch
):
    """Killed while retraining a lost model, a run no longer knows the record it dropped; the
    retraining that finishes next, to the same weights, must still leave generation 2 (whose
    keys chain that digest) alone rather than recompute every later generation."""
    import collapse.train

    (tiny_run.store.model_dir(1) / "model.safetensors").unlink()

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(collapse.train, "train_model", killed)
        with pytest.raises(KeyboardInterrupt):
            run_all(tiny_run)
    assert tiny_run.store.read_record(1, "train") is None
    records = run_all(tiny_run)
    assert sorted(k for k, r in records.items() if not r["reused"]) == [(1, "train")]


def test_judge_grades_are_aggregated_per_generation(tiny_run: Context):
    for gen in (0, 1, 2):
        result = json.loads((tiny_run.store.gen_dir(gen) / "eval" / "judge.json").read_text())
        assert result["baseline"] == (gen == 0)
        completions = pq.read_table(
            tiny_run.store.gen_dir(gen) / "eval" / "judge-completions.parquet"
        ).to_pylist()
        assert len(completions) == 3 * 2 == result["completions"]
        expected = [
            grades_for(build_messages(c["prompt"], c["completion"])[-1]["content"])
            for c in completions
        ]
        for name in ("grammar", "creativity", "consistency"):
            values = [e[name] for e in expected]
            assert result[f"{name}_mean"] == pytest.approx(sum(values) / len(values))
        assert result["failures"] == 0


def test_the_judge_key_is_written_nowhere(tiny_run: Context):
    for path in tiny_run.store.run_dir.rglob("*"):
        if path.is_file():
            assert PLANTED_KEY.encode() not in path.read_bytes(), path
    assert PLANTED_KEY not in "\n".join(tiny_run.log.__self__)  # the log lines


def test_judge_endpoint_settings_do_not_recompute_the_judge(tiny_run: Context):
    data = tiny_run.config.model_dump(mode="json")
    data["eval"]["judge"].update(max_concurrency=1, timeout_s=5)
    ctx = Context(Config.model_validate(data), tiny_run.store, log=lambda _: None)
    assert all(record["reused"] for record in run_all(ctx).values())


def test_changing_one_evaluation_setting_recomputes_only_that_evaluation(
    tiny_run: Context, tmp_path: Path
):
    data = tiny_run.config.model_dump(mode="json")
    data["eval"]["excerpts"]["count"] = 2
    ctx = Context(Config.model_validate(data), tiny_run.store, log=lambda _: None)
    records = run_all(ctx)
    recomputed = sorted(k for k, r in records.items() if not r["reused"])
    assert recomputed == [(0, "eval.excerpts"), (1, "eval.excerpts"), (2, "eval.excerpts")]
    run_all(tiny_run)  # restore for the other tests


@pytest.mark.parametrize(
    ("overrides", "overlap"),
    [
        ([], True),
        (["orchestration.pipeline=false"], False),
        # deterministic mode is process-wide: no evaluation beside the training in this process
        (["train.deterministic=true"], False),
        # ... but the chain's jobs run in processes of their own on a deployment's workers
        (["train.deterministic=true", "orchestration.generation_deployment=generation/gpu"], True),
    ],
)
def test_evaluations_run_beside_training_unless_it_is_deterministic_here(
    tiny_config_file: Path, overrides: list[str], overlap: bool
):
    from collapse.config import load_config
    from collapse.pipeline import overlaps_evaluations

    assert overlaps_evaluations(load_config(tiny_config_file, overrides)) is overlap


def test_a_judge_that_grades_nothing_stops_the_stage_instead_of_recording_it(
    tmp_path: Path, story_file: Path
):
    """An unreachable endpoint: every request fails. Recorded, the empty result would be
    reused by a run with a working endpoint (where the judge is reached is in no key)."""
    import socket

    from collapse.judge.client import JudgeStopped
    from collapse.pipeline import freeze_config, run_stage
    from collapse.store import RunStore

    from .conftest import tiny_config_dict

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tiny_config_dict(story_file, tmp_path / "artifacts", generations=1)
    data["eval"] = {
        "metrics": ["judge"],
        "judge": {
            "model": "m",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "api_key_env": "COLLAPSE_TEST_UNREACHABLE_KEY",
            "num_prompts": 2,
            "completions_per_prompt": 1,
            "max_new_tokens": 8,
            "max_attempts": 1,
        },
    }
    config = Config.model_validate(data)
    ctx = Context(config, RunStore(config.run.artifact_root, "j"), log=lambda _: None)
    freeze_config(ctx)
    run_stage(ctx, 0, "corpus")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLLAPSE_TEST_UNREACHABLE_KEY", "k")
        with pytest.raises(JudgeStopped, match="none of the 2 completions of generation 0"):
            run_stage(ctx, 0, "eval.judge")
    assert ctx.store.read_record(0, "eval.judge") is None
