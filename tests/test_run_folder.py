"""A run folder read back: moved inputs, dropped stages, configurable columns, stage details.

Each test here pins a defect found in review (issue #10); all share the session's tiny run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from collapse.config import Config
from collapse.context import Context, open_run
from collapse.metrics.entropy import corpus_entropy
from collapse.pipeline import invalidate_from, metrics_table, run_stage, table_columns
from collapse.report import write_report
from collapse.table import text_table

from .conftest import JUDGE_KEY_ENV, PLANTED_KEY, REPO, run_all


def _copy(ctx: Context, dest: Path) -> Context:
    shutil.copytree(ctx.store.run_dir, dest)
    return open_run(dest)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def test_a_run_whose_corpus_file_moved_still_opens_reports_and_resumes(
    tiny_run: Context, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(JUDGE_KEY_ENV, PLANTED_KEY)  # as in the session run: same judge key
    corpus = Path(tiny_run.config.corpus.path)
    moved = corpus.with_name("moved-away.txt")
    corpus.rename(moved)
    try:
        ctx = open_run(tiny_run.store.run_dir)
        assert all(record["reused"] for record in run_all(ctx).values())
        status = _cli("status", str(tiny_run.store.run_dir))
        assert status.returncode == 0, status.stderr
        assert "corpus:done" in status.stdout and "Traceback" not in status.stderr
        report = _cli("report", str(tiny_run.store.run_dir))
        assert report.returncode == 0, report.stderr
    finally:
        moved.rename(corpus)


class _Rows(HTMLParser):
    """The first cell of every row of the tables with class 'excerpts'."""

    def __init__(self) -> None:
        super().__init__()
        self.first_cells: list[str] = []
        self._in_table = self._want = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._in_table = dict(attrs).get("class") == "excerpts"
        if tag == "tr":
            self._want = True

    def handle_data(self, data):
        if self._in_table and self._want and data.strip():
            self.first_cells.append(data.strip())
            self._want = False


def test_after_from_generation_the_report_shows_only_valid_results(
    tiny_run: Context, tmp_path: Path
):
    ctx = _copy(tiny_run, tmp_path / "tiny-dropped")
    before = _Rows()
    before.feed(write_report([ctx.store.run_dir]).read_text())
    assert "2" in before.first_cells  # generation 2's excerpts and judged completions
    invalidate_from(ctx, 2)  # what `collapse run --from-generation 2` does first
    after = _Rows()
    after.feed(write_report([ctx.store.run_dir]).read_text())
    assert "2" not in after.first_cells, "files of dropped stages are shown"
    assert after.first_cells.count("1") == before.first_cells.count("1")
    assert metrics_table(ctx)[2]["perplexity"] is None


@pytest.mark.parametrize("n_max", [3, 5])
def test_the_diversity_columns_follow_n_max(tiny_run: Context, tmp_path: Path, n_max: int):
    ctx = _copy(tiny_run, tmp_path / f"tiny-n{n_max}")
    data = ctx.config.model_dump(mode="json")
    data["eval"]["diversity"]["n_max"] = n_max
    ctx = Context(Config.model_validate(data), ctx.store, log=lambda _: None)
    for gen in (0, 1, 2):
        run_stage(ctx, gen, "eval.diversity")
    keys = [c.key for c in table_columns(ctx.config)]
    assert f"distinct_{n_max}" in keys and f"rep_{n_max}" in keys and "distinct_4" not in keys
    rows = metrics_table(ctx)
    assert all(row[f"distinct_{n_max}"] is not None for row in rows)
    assert f"dist-{n_max}" in text_table(rows, table_columns(ctx.config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_judge_completions_run_on_the_eval_device(
    tiny_run: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(JUDGE_KEY_ENV, PLANTED_KEY)
    ctx = _copy(tiny_run, tmp_path / "tiny-devices")
    data = ctx.config.model_dump(mode="json")
    data["sample"]["device"] = "cuda"  # unusable here: the judge must not use it
    data["eval"]["device"] = "cpu"
    ctx = Context(Config.model_validate(data), ctx.store, log=lambda _: None)
    ctx.store.drop_stage(1, "eval.judge")
    record = run_stage(ctx, 1, "eval.judge")
    assert not record["reused"] and record["info"]["completions"] == 6


def test_the_sample_stage_counts_its_corpus_while_writing_it(
    tiny_run: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    ctx = _copy(tiny_run, tmp_path / "tiny-resample")
    ctx.store.drop_stage(2, "sample")

    def second_pass(*args, **kwargs):
        raise AssertionError("the sample stage read its corpus a second time")

    monkeypatch.setattr("collapse.metrics.entropy.corpus_entropy", second_pass)
    record = run_stage(ctx, 2, "sample")
    assert not record["reused"]
    monkeypatch.undo()
    shards = sorted(ctx.store.corpus_dir(2).glob("part-*.parquet"))
    expected = corpus_entropy(shards, 300)
    for name in ("tokens", "finished_fraction", "mean_length"):
        assert record["info"][name] == pytest.approx(expected[name]), name
    # the same corpus as the session's run (per-shard seeds): same counts as its record
    original = json.loads(tiny_run.store.manifest_path(2).read_text())["stages"]["sample"]
    assert record["digest"] == original["digest"]


def test_a_record_made_under_another_key_is_shown_stale_not_as_a_result(
    tiny_run: Context, tmp_path: Path
):
    """E.g. made by an earlier version of its evaluation: the next run recomputes it, so
    status, the table and the report must not present its values as today's."""
    from flows.cli import _progress_lines

    ctx = _copy(tiny_run, tmp_path / "tiny-stale")
    before = metrics_table(ctx)[1]
    assert before["entropy_bits"] is not None
    manifest_path = ctx.store.manifest_path(1)
    manifest = json.loads(manifest_path.read_text())
    manifest["stages"]["eval.entropy"]["key"] = "made-by-an-earlier-version"
    manifest_path.write_text(json.dumps(manifest))
    after = metrics_table(ctx)[1]
    assert after["entropy_bits"] is None and after["perplexity"] == before["perplexity"]
    assert after["stages_done"] == before["stages_done"] - 1
    assert "eval.entropy:stale" in _progress_lines(ctx)[1]
    assert "eval.entropy:done" in _progress_lines(ctx)[2]


def test_status_into_a_pipe_closed_early_ends_quietly(tiny_run: Context):
    """`collapse status RUN | head -1`: no BrokenPipeError traceback once head has its line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "status", str(tiny_run.store.run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
