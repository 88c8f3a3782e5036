"""Content fingerprints of the files a stage reads from outside its run, for its key.

A local corpus file or a downstream task's local data can be edited in place under the same
path. A key that held only the path would then reuse results computed from the old bytes, so
such a stage's key also holds a digest of the files' contents, and its result records that
digest (`RECORDED`). Where the files are not on this machine (a run resumed on a worker that
never had them), the recorded digest stands in: what was finished stays finished, as it did
before keys held contents, and what is not finished fails when it reads the missing file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from glob import glob
from pathlib import Path
from typing import Any

RECORDED = "input_sha256"  # the result field holding the digest a stage was computed from


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # Memoised on the file's identity (a key is computed several times per process, and a
    # corpus file may hold gigabytes); an edit changes its size or modification time.
    from collapse.store import sha256_file

    return sha256_file(Path(path))


def files_digest(files: Mapping[str, list[Path]]) -> str | None:
    """sha256 over the contents of named groups of files (e.g. a task's splits).

    Args:
        files: group name -> its files, in the order they are read.

    Returns:
        The digest, or None when a group has no files or one is not a readable file here.
    """
    from collapse.store import sha256_json

    contents: dict[str, list[str]] = {}
    for name, paths in files.items():
        if not paths:
            return None
        try:
            stats = [(str(p.resolve()), p.stat()) for p in paths]
        except OSError:
            return None
        if not all(os.path.isfile(p) for p, _ in stats):
            return None
        contents[name] = [_sha256(p, s.st_size, s.st_mtime_ns) for p, s in stats]
    return sha256_json(contents)


def matched(pattern: str) -> list[Path]:
    """The files a path or glob names (as `datasets` reads `data_files`), sorted."""
    return [Path(p) for p in sorted(glob(os.path.expanduser(pattern), recursive=True))]


def folder_files(folder: Path) -> list[Path]:
    """The files under a folder, sorted, without hidden ones (`.git`, caches), which hold no
    data that `datasets` loads."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def key_digest(files: Mapping[str, list[Path]], record: dict[str, Any] | None) -> list[str]:
    """The key part for files read from outside the run: their digest here, else the one
    `record` (the stage's earlier record, if any) was computed from, else nothing."""
    digest = files_digest(files)
    if digest is None and record is not None:
        digest = record.get("info", {}).get(RECORDED)
    return [digest] if digest else []
