"""Staging copies under URL roots: listed with their size and use, removed only when unused,
and a removed copy costs nothing but fetching again."""

from __future__ import annotations

import gc
import multiprocessing
import re
from pathlib import Path

import pytest

from collapse.object_store import STAGING_ENV
from collapse.staging import remove, staging_copies
from collapse.store import RunStore, atomic_write_bytes
from flows.cli import main


@pytest.fixture
def url_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    (tmp_path / "bucket").mkdir()
    return f"file://{tmp_path / 'bucket'}"


def _finished_run(root: str) -> RunStore:
    store = RunStore(root, "run")
    folder = store.model_dir(1)
    atomic_write_bytes(folder / "weights", b"w" * 5000)
    store.record_stage(1, "train", "k", [folder])
    return store


def _hold_until_told(root: str, ready, done) -> None:  # another process with the run open
    store = RunStore(root, "run")
    ready.set()
    done.wait(30)
    del store


def test_a_copy_in_use_is_kept_and_an_unused_one_removed_then_fetched_again(
    url_root: str, tmp_path: Path
):
    store = _finished_run(url_root)
    (copy,) = staging_copies(tmp_path / "staging")
    assert copy.path == store.run_dir and copy.location == f"{url_root}/run"
    assert copy.bytes >= 5000 and copy.in_use
    assert not remove(copy) and (store.run_dir / "gen-001" / "model" / "weights").is_file()

    del store
    gc.collect()  # the store's hold on the copy ends with it
    (copy,) = staging_copies(tmp_path / "staging")
    assert not copy.in_use
    assert remove(copy) and not copy.path.exists()

    again = RunStore(url_root, "run")
    record = again.valid_record(1, "train", "k")
    assert record is not None  # the run lives at the URL: removing a copy loses nothing
    assert (again.pull(again.model_dir(1)) / "weights").read_bytes() == b"w" * 5000


def test_a_copy_another_process_has_open_is_not_removed(url_root: str, tmp_path: Path):
    _finished_run(url_root)  # and closed: nothing holds it
    gc.collect()
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=_hold_until_told, args=(url_root, ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        (copy,) = staging_copies(tmp_path / "staging")
        assert copy.in_use and not remove(copy)
    finally:
        done.set()
        holder.join(30)
    (copy,) = staging_copies(tmp_path / "staging")
    assert not copy.in_use and remove(copy)


def test_a_copy_made_before_copies_were_marked_is_listed_unused_and_removed(
    url_root: str, tmp_path: Path
):
    store = _finished_run(url_root)
    run_dir = store.run_dir
    del store
    gc.collect()
    (run_dir / ".staging").unlink()  # as a copy made by a version that did not mark them
    (copy,) = staging_copies(tmp_path / "staging")
    assert copy.path == run_dir and copy.location == f"{url_root}/run"
    assert not copy.in_use and copy.bytes >= 5000
    assert remove(copy) and not run_dir.exists()


def test_collapse_staging_lists_and_cleans(
    url_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    kept = _finished_run(url_root)
    other = RunStore(url_root, "other")
    other.write_run_file(other.config_path, b"x" * 3000)
    other_dir = other.run_dir
    del other
    gc.collect()
    assert main(["staging"]) == 0
    out = capsys.readouterr().out
    assert f"in use   {url_root}/run" in out and f"unused   {url_root}/other" in out
    assert main(["staging", "--clean"]) == 0
    out = capsys.readouterr().out
    assert f"removed  {url_root}/other" in out and f"in use   {url_root}/run" in out
    assert re.fullmatch(r"freed 3\.0 KiB; kept 5\.\d KiB \(in use\)", out.splitlines()[-1])
    assert kept.run_dir.is_dir() and not other_dir.exists()
    assert main(["staging", "--dir", str(tmp_path / "nowhere")]) == 0
    assert "no staging copies under" in capsys.readouterr().out


def test_a_store_that_only_reads_the_url_leaves_no_copy_and_one_that_fetches_holds_it(
    url_root: str, tmp_path: Path
):
    _finished_run(url_root)
    gc.collect()
    (copy,) = staging_copies(tmp_path / "staging")
    assert remove(copy)
    lister = RunStore(url_root, "run")  # as `collapse status` listing the runs of a root
    assert lister.generations_on_disk() == [1]
    assert not lister.run_dir.exists() and staging_copies(tmp_path / "staging") == []
    lister.pull(lister.model_dir(1))
    (copy,) = staging_copies(tmp_path / "staging")
    assert copy.in_use and not remove(copy)


def test_a_released_output_leaves_the_copy_and_is_fetched_again_checked(url_root: str):
    store = _finished_run(url_root)
    (rel,) = store.read_record(1, "train")["outputs"]
    assert store.release_local([rel]) == 5000
    assert not store.gen_dir(1).exists()  # the folders it emptied go too
    assert store.valid_record(1, "train", "k") is not None  # the run lives at the URL
    assert (store.pull(store.model_dir(1)) / "weights").read_bytes() == b"w" * 5000


def test_nothing_is_released_under_a_path_root(tmp_path: Path):
    store = _finished_run(str(tmp_path / "artifacts"))  # the run folder is the run itself
    (rel,) = store.read_record(1, "train")["outputs"]
    assert store.release_local([rel]) == 0
    assert (store.run_dir / rel).read_bytes() == b"w" * 5000
