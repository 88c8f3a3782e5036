"""The library pipeline without Prefect: every registered evaluation on a tiny 2-generation run,
the metrics table, reuse, and the report built from it."""

from __future__ import annotations

import json
from pathlib import Path

from collapse.config import EVALUATIONS, Config
from collapse.context import Context
from collapse.evals import REGISTRY
from collapse.pipeline import metrics_table, stages_of, table_columns
from collapse.table import text_table

from .conftest import run_all


def test_config_names_every_registered_evaluation():
    assert set(EVALUATIONS) == set(REGISTRY)


def test_every_evaluation_writes_its_result(tiny_run: Context):
    ctx = tiny_run
    assert stages_of(ctx, 0) == ["corpus", "eval.entropy", "eval.oov", "eval.diversity",
                                 "eval.excerpts"]
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
    assert "OOV/1k" in text and "self-BLEU" in text and len(text.splitlines()) == 5


def test_a_second_pass_reuses_every_stage(tiny_run: Context):
    assert all(record["reused"] for record in run_all(tiny_run).values())


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
