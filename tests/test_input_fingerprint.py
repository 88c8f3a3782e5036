"""Files read from outside a run are keyed by their contents: a local corpus or a task's local
data edited in place under the same path is recomputed, the same bytes rewritten are not, and a
machine without the files keeps what was finished from them."""

from __future__ import annotations

from pathlib import Path

from collapse.config import Config
from collapse.context import Context
from collapse.downstream.data import task_files
from collapse.downstream.tasks import task_spec
from collapse.fingerprint import RECORDED, files_digest
from collapse.pipeline import stage_key


def test_a_local_corpus_edited_in_place_is_a_new_corpus(tiny_run: Context):
    path = Path(tiny_run.config.corpus.path)
    original = path.read_bytes()
    recorded = tiny_run.store.read_record(0, "corpus")
    assert recorded["info"][RECORDED]
    try:
        path.write_bytes(original)  # rewritten with the same bytes: the same corpus
        assert stage_key(tiny_run, 0, "corpus") == recorded["key"]
        path.write_bytes(original.replace(b"was happy", b"was glad"))
        assert stage_key(tiny_run, 0, "corpus") != recorded["key"]
        path.unlink()  # a machine without the file: the corpus made from it stays done
        assert stage_key(tiny_run, 0, "corpus") == recorded["key"]
    finally:
        path.write_bytes(original)


def _with_task(ctx: Context, entry: dict) -> Context:
    data = ctx.config.model_dump(mode="json")
    data["eval"]["downstream"]["task_table"] = {"mine": entry}
    data["eval"]["downstream"]["tasks"] = ["mine"]
    return Context(Config.model_validate(data), ctx.store, log=lambda _: None)


def test_a_tasks_local_data_edited_in_place_is_fine_tuned_again(tiny_run: Context, tmp_path: Path):
    for split in ("train", "validation"):
        (tmp_path / f"{split}.csv").write_text("s,label\nthe cat sat,1\ncat the sat,0\n")
    files = {s: str(tmp_path / f"{s}.csv") for s in ("train", "validation")}
    ctx = _with_task(tiny_run, {"source": "local", "data_files": files, "text": ["s"]})
    stage = "eval.downstream/mine"
    before = stage_key(ctx, 1, stage)
    (tmp_path / "validation.csv").write_text("s,label\nthe cat sat,0\ncat the sat,1\n")
    assert stage_key(ctx, 1, stage) != before  # labels flipped: not the same task any more
    (tmp_path / "validation.csv").write_text("s,label\nthe cat sat,1\ncat the sat,0\n")
    assert stage_key(ctx, 1, stage) == before  # the same bytes again

    # a machine without the files keeps the fine-tune made from them (its recorded digest)
    digest = files_digest(task_files(task_spec("mine", ctx.config.eval.downstream.task_table)))
    ctx.store.record_stage(1, stage, before, [], {RECORDED: digest})
    try:
        (tmp_path / "train.csv").unlink()
        assert stage_key(ctx, 1, stage) == before
    finally:
        ctx.store.drop_stage(1, stage)


def test_a_tasks_local_folder_is_keyed_by_its_data_not_its_hidden_files(
    tiny_run: Context, tmp_path: Path
):
    folder = tmp_path / "glue"
    (folder / "sst2").mkdir(parents=True)
    (folder / "sst2" / "train.csv").write_text("sentence,label\na,0\nb,1\n")
    ctx = _with_task(tiny_run, {"source": "hub", "dataset": str(folder), "text": ["sentence"]})
    stage = "eval.downstream/mine"
    before = stage_key(ctx, 1, stage)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")  # `datasets`' own files: no data
    assert stage_key(ctx, 1, stage) == before
    (folder / "sst2" / "validation.csv").write_text("sentence,label\nc,0\n")
    assert stage_key(ctx, 1, stage) != before
