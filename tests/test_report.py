"""The report: PNG figures that are real images, a self-contained HTML page, overlays, the CLI."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from collapse.context import Context
from collapse.report import ReportError, load_run, report_figures, summary_markdown, write_report

from .conftest import REPO

# The tiny run's local corpus has no known source: every figure but source_fit's.
FIGURES = [figure.name for figure in report_figures() if figure.name != "source-fit"]


class _Page(HTMLParser):
    """Collects tags, images and the table cells of a page; fails on unbalanced tags."""

    VOID = {"meta", "img", "br", "link", "hr", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.tables = 0
        self.rows = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)
        self.tables += tag == "table"
        self.rows += tag == "tr"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> in {self.stack}"
        self.stack.pop()


def _parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text())
    assert parser.stack == [], parser.stack
    return parser


def _non_blank(png: bytes) -> bool:
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    return pixels.ndim == 3 and pixels.shape[0] > 100 and float(pixels.std()) > 0.01


def test_single_run_report_has_every_figure_and_table(tiny_run: Context):
    page = write_report([tiny_run.store.run_dir])
    assert page == tiny_run.store.run_dir / "report.html"
    for name in FIGURES:
        png = (tiny_run.store.run_dir / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and _non_blank(png), name
    parsed = _parse(page)
    assert len(parsed.images) == len(FIGURES)
    for src in parsed.images:  # self-contained: inline data, no file or network references
        assert src.startswith("data:image/png;base64,")
        assert _non_blank(base64.b64decode(src.split(",", 1)[1]))
    assert parsed.tables == 4  # metrics table, excerpts, judged completions, downstream tasks
    # header + 3 generations; 3 excerpts per generation; 2 judged completions per generation;
    # header + one row per downstream task
    assert parsed.rows == (1 + 3) + (1 + 3 * 3) + (1 + 3 * 2) + (1 + 2)


def test_overlay_of_two_runs_goes_to_its_own_folder(tiny_run: Context, tmp_path: Path):
    other = tiny_run.store.run_dir.parent / "tiny-copy"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(tiny_run.store.run_dir, other)
    page = write_report([tiny_run.store.run_dir, other])
    assert page == tiny_run.store.run_dir.parent / "reports" / "tiny+tiny-copy" / "report.html"
    parsed = _parse(page)
    assert len(parsed.images) == len(FIGURES) and parsed.tables == 8
    shutil.rmtree(other)


def test_summary_markdown_has_the_table_and_excerpts(tiny_run: Context):
    text = summary_markdown(load_run(tiny_run.store.run_dir))
    assert "| gen | perplexity |" in text and "## Excerpts of generation 2" in text


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path):
    with pytest.raises(ReportError, match="not a run directory"):
        load_run(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "not a run directory" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs a chromium binary")
def test_report_renders_in_headless_chromium(tiny_run: Context, tmp_path: Path):
    page = write_report([tiny_run.store.run_dir])
    shot = tmp_path / "shot.png"
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    proc = subprocess.run(
        [*command, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert _non_blank(shot.read_bytes())
    dom = subprocess.run(
        [*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    # the browser parsed the page and decoded every inline figure
    assert "<title>collapse report: tiny</title>" in dom
    assert dom.count("data:image/png;base64,") == len(FIGURES)


def test_generation_0_of_a_model_evaluation_is_marked_as_the_random_init_baseline():
    from collapse.config import load_config
    from collapse.pipeline import table_columns
    from collapse.table import BASELINE_NOTE, markdown_table, text_table

    columns = table_columns(load_config(REPO / "configs" / "demo.yaml"))
    marked = {c.key for c in columns if c.baseline_at_zero}
    assert "perplexity" not in marked and "entropy_bits" not in marked
    assert {"judge_grammar", "word_order_acc"} <= marked
    key = "word_order_acc"
    rows = [
        {"generation": g, key: v, "entropy_bits": 8.5, "stages_done": 1, "stages_total": 1}
        for g, v in ((0, 0.5), (1, 0.75))
    ]
    text = text_table(rows, columns)
    assert text.splitlines()[-1] == BASELINE_NOTE
    gen0, gen1 = text.splitlines()[2:4]
    assert "0.500*" in gen0 and "8.500 " in gen0 and "0.750*" not in gen1 and "0.750" in gen1
    assert "0.500\\*" in markdown_table(rows, columns)
    assert BASELINE_NOTE not in text_table(rows[1:], columns)  # nothing marked: no note
