"""Adding an evaluation is one module: a toy one, installed as a plugin package through the
`collapse.evaluations` entry point (no file of this project touched), shows up in the config's
choices, runs in a real `collapse run`, and appears in the CLI tables and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, tiny_config_dict, write_story_file

pytestmark = pytest.mark.slow

TOY_MODULE = '''
"""A toy evaluation: documents in the corpus times a configured factor."""

from pydantic import Field

from collapse.context import corpus_digest, corpus_shards
from collapse.evals.base import Column, Evaluation, Figure
from collapse.sections import Section


class ToyConfig(Section):
    """Toy settings (eval `toy`)."""

    factor: int = Field(3, description="Multiplier.")


def _key(ctx, gen):
    return [ctx.config.eval.toy.factor, corpus_digest(ctx, gen)]


def _run(ctx, gen):
    import pyarrow.parquet as pq

    docs = sum(pq.read_metadata(p).num_rows for p in corpus_shards(ctx, gen))
    return {"scaled_documents": docs * ctx.config.eval.toy.factor}, []


def _figure(runs):
    from collapse.plotting import has, new_figure, png, series

    if not has(runs, "toy_scaled"):
        return None
    fig = new_figure(4, 3)
    ax = fig.subplots()
    for run in runs:
        ax.plot(*series(run, "toy_scaled"), marker="o")
    return png(fig)


EVALUATION = Evaluation(
    name="toy",
    description="Documents times eval.toy.factor.",
    version=1,
    needs_gpu=False,
    on_human_corpus=True,
    key_parts=_key,
    run=_run,
    default=False,
    settings=ToyConfig,
    columns=(Column("toy_scaled", "scaled_documents", "toy-docs", "d"),),
    figures=(Figure("toy", _figure),),
    report_section=lambda run: "<p id='toy-section'>toy section</p>",
)
'''


def _plugin(root: Path) -> Path:
    """An installed-looking distribution that registers `toy_eval` as an evaluation."""
    root.mkdir()
    (root / "toy_eval.py").write_text(textwrap.dedent(TOY_MODULE))
    info = root / "toy_eval-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-eval\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[collapse.evaluations]\ntoy = toy_eval\n")
    return root


def _cli(tmp: Path, plugin: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "COLLAPSE_"))}
    env["PREFECT_HOME"] = str(tmp / "prefect-home")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([str(plugin)] if plugin else [])])
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=600,
    )


def test_a_plugin_evaluation_appears_in_config_run_tables_and_report(tmp_path: Path):
    plugin = _plugin(tmp_path / "plugin")
    data = tiny_config_dict(write_story_file(tmp_path / "stories.txt", n=120), tmp_path / "art", 1)
    data["sample"].update(num_sequences=40)
    data["eval"] = {"metrics": ["entropy", "toy"], "toy": {"factor": 5}}
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(data))

    # without the plugin the name is unknown; with it, it is one of the choices
    without = _cli(tmp_path, None, "run", str(config))
    assert without.returncode == 2 and "eval.toy: unknown key" in without.stderr
    bad = _cli(tmp_path, plugin, "run", str(config), "eval.metrics=[tea]")
    assert bad.returncode == 2 and "'toy'" in bad.stderr and "Traceback" not in bad.stderr

    run = _cli(tmp_path, plugin, "run", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "toy-docs" in run.stdout
    (run_dir,) = (tmp_path / "art").iterdir()
    for gen, docs in ((0, 114), (1, 40)):  # 95% of 120 human stories; 40 sampled ones
        result = json.loads((run_dir / f"gen-00{gen}" / "eval" / "toy.json").read_text())
        assert result["scaled_documents"] == 5 * docs
    status = _cli(tmp_path, plugin, "status", str(run_dir))
    assert status.returncode == 0 and "eval.toy:done" in status.stdout
    header, _, row0, row1 = status.stdout.strip().splitlines()[-4:]
    assert "toy-docs" in header and row0.split()[-2] == "570" and row1.split()[-2] == "200"

    report = _cli(tmp_path, plugin, "report", str(run_dir))
    assert report.returncode == 0, report.stderr
    page = (run_dir / "report.html").read_text()
    assert "toy-section" in page and "<th>toy-docs</th>" in page
    assert (run_dir / "figures" / "toy.png").read_bytes().startswith(b"\x89PNG")
