"""Staging copies of runs under URL roots: which are in use, and removing the others.

Under a URL artifact root every process works on a local copy of the run folder (see
`collapse.object_store.staging_root`); everything finished is published to the root, and
mid-stage state (training checkpoints, sample shards) is mirrored there as it is written, so a
copy no process is using is a cache: removing it loses nothing, and the next process that opens
the run fetches what it reads again. A live copy sheds each generation's model and corpus once
no stage still to run reads them (`collapse.pipeline.release_staged`); whole copies no process
uses are removed by `collapse staging --clean`.

"In use" is a shared flock on the copy's marker file `.staging`, taken for a `RunStore`'s life
by every store that opens an existing copy, or that writes into one (a store that only reads the
URL, like `collapse status` listing runs, makes no copy). The remover takes an exclusive one
without waiting, so it never removes a copy under a live process that holds it, and a process
that opens the copy meanwhile waits for the removal, then finds its marker gone and locks the
new one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MARKER = ".staging"


def hold(run_dir: Path, location: str) -> IO[str]:
    """Mark `run_dir` as a staging copy of `location` in use by this process, until the
    returned file is closed (or the process ends)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    while True:
        fh = open(marker, "a+")  # noqa: SIM115 (held by the caller)
        fcntl.flock(fh, fcntl.LOCK_SH)  # waits while a removal runs
        try:
            same = os.fstat(fh.fileno()).st_ino == os.stat(marker).st_ino
        except FileNotFoundError:
            same = False
        if same:
            if fh.tell() == 0:
                fh.write(location + "\n")
                fh.flush()
            return fh
        fh.close()  # the copy was removed while we waited: mark the new one
        run_dir.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class StagingCopy:
    """One staging copy: its folder, the run it mirrors, its size, whether a process uses it."""

    path: Path
    location: str
    bytes: int
    in_use: bool


def size_of(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 when it does not exist)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except FileNotFoundError:  # removed meanwhile by the process using the copy
            continue
    return total


def flocked(path: Path) -> bool | None:
    """Whether another process holds an flock on `path`; None when there is no such file."""
    if not path.is_file():
        return None
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False  # closing the file releases our probe


def staging_copies(base: Path) -> list[StagingCopy]:
    """Every staging copy under `base` (a `$COLLAPSE_STAGING` folder), sorted by path."""
    if not base.is_dir():
        return []
    copies = []
    for marker in sorted(base.rglob(MARKER)):
        location = marker.read_text().strip() or "?"
        in_use = flocked(marker) is True
        copies.append(StagingCopy(marker.parent, location, size_of(marker.parent), in_use))
    marked = [copy.path for copy in copies]
    for folder in _unmarked_runs(base, marked):
        # Made before copies were marked: every store of today's code that opens a copy marks
        # it first, so none uses this one.
        location = _location_of(base, folder)
        copies.append(StagingCopy(folder, location, size_of(folder), in_use=False))
    return sorted(copies, key=lambda copy: copy.path)


def _unmarked_runs(base: Path, marked: list[Path]) -> list[Path]:
    """Run folders under `base` without a marker: a `config.yaml` or a `gen-NNN` folder in
    them, and no marked copy around them."""
    found = {p.parent for p in base.rglob("config.yaml")}
    found |= {p.parent for p in base.rglob("gen-[0-9][0-9][0-9]") if p.is_dir()}
    return sorted(
        folder
        for folder in found
        if not any(folder == m or folder.is_relative_to(m) for m in marked)
        and not any(folder != f and folder.is_relative_to(f) for f in found)
    )


def _location_of(base: Path, folder: Path) -> str:
    """The URL a copy at `folder` mirrors, from `staging_root`'s layout (scheme/netloc/path)."""
    scheme, *rest = folder.relative_to(base).parts
    # file:// URLs have no host: their first part is the path's
    return f"{scheme}://{'/' if scheme == 'file' else ''}{'/'.join(rest)}"


def remove(copy: StagingCopy) -> bool:
    """Remove a staging copy unless a process uses it; whether it was removed."""
    marker = copy.path / MARKER
    try:
        fh = open(marker, "a")  # noqa: SIM115 (closed below, after the removal)
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(copy.path, ignore_errors=True)
        return True
