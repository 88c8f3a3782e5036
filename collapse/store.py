"""The artifact store: one folder per run, one per generation, manifests with sha256 of outputs.

A stage is done iff its manifest entry exists, carries the stage's current key (which chains the
content hashes of its inputs) and every output file still has the recorded sha256. Everything is
written to a temporary name and renamed into place, and manifests are written after the outputs
they describe, so a killed process never leaves a file that passes for finished.

The artifact root may also be an fsspec URL (collapse.object_store): then the run folder here is
a local staging copy, each finished stage is published to the URL (outputs, then its record), and
a stage's inputs are fetched from the URL (and checked against their sha256) when it reads them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from collapse.errors import UserError, cause_text
from collapse.lease import Lease, LeaseHeldError
from collapse.object_store import (
    ObjectRoot,
    concurrently,
    is_url,
    record_rel,
    stages_in,
    staging_root,
    url_problem,
)
from collapse.staging import flocked
from collapse.staging import hold as hold_staging_copy

MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"
CONFIG_FILE = "config.yaml"

# A manifest update holds a thread lock (threads of one process) and a POSIX record lock on a
# file beside the manifest (other processes). Not flock: a flock belongs to the open file, which
# a process forked while a thread holds it shares, so the lock would outlive the thread's `with`
# and deadlock everyone (seen in a test). POSIX locks are not inherited by a fork, and the child
# gets fresh thread locks, since a fork copies locks held by threads that do not exist there.
_MANIFEST_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_MANIFEST_THREAD_LOCKS_GUARD = threading.Lock()


# The leases this process holds, by run location: every store of a held run checks the lease
# before it publishes, also those the run's tasks open for themselves (a Prefect task builds
# its own context), not only the store that took it. A forked child holds none.
_HELD_LEASES: dict[str, Lease] = {}


def _fresh_manifest_locks_after_fork() -> None:
    global _MANIFEST_THREAD_LOCKS_GUARD
    _MANIFEST_THREAD_LOCKS.clear()
    _MANIFEST_THREAD_LOCKS_GUARD = threading.Lock()
    _HELD_LEASES.clear()


os.register_at_fork(after_in_child=_fresh_manifest_locks_after_fork)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of the canonical JSON of `value`."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Below this much free space a failed write is taken for a full disk: torch's zip writer and
# pyarrow report ENOSPC as their own errors (e.g. "enforce fail at inline_container.cc"), so the
# errno is lost, but the partly written temporary file still fills the disk when we look.
FULL_BELOW_BYTES = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent (a failed write may leave no file behind)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding `path`."""
    current = _existing(path)
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on `path`'s filesystem, None if unknown."""
    try:
        stat = os.statvfs(_existing(path))
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def format_bytes(n: int) -> str:
    """A size for people: bytes, KiB, MiB or GiB."""
    if n < 1024:
        return f"{n} bytes"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


class StorageFullError(UserError):
    """A write failed because the filesystem (or the user's quota on it) is full.

    Nothing half-written is left behind (writes are atomic), so finished work stays valid and a
    rerun resumes once there is space again. `stage` is filled in by the pipeline, which knows
    which generation and stage the write served.
    """

    def __init__(self, path: str | Path, free_bytes: int | None = None, stage: str | None = None):
        # All constructor arguments go to `args`, so the exception pickles (e.g. from a worker).
        super().__init__(str(path), free_bytes, stage)
        self.path = Path(path)
        self.free_bytes = free_bytes
        self.stage = stage
        self.mount = _mount_point(self.path)

    def __str__(self) -> str:
        free = "" if self.free_bytes is None else f" ({format_bytes(self.free_bytes)} free)"
        during = f" in {self.stage}" if self.stage else ""
        return (
            f"storage full: the filesystem mounted at {self.mount}{free} has no room for "
            f"{self.path}{during}. Finished work is kept: free some space and run the same "
            "command again to resume."
        )

    def __repr__(self) -> str:
        # Prefect logs failures with repr(): make that the same readable sentence.
        return f"{type(self).__name__}({str(self)!r})"


def _errno_full(exc: BaseException) -> bool:
    """Whether `exc` or an exception it was raised from or during is ENOSPC/EDQUOT."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def storage_full(
    exc: BaseException, path: Path, *, errno_only: bool = False
) -> StorageFullError | None:
    """A `StorageFullError` for `path` if `exc` means its filesystem is full, else None.

    Call it before removing any partial output: that output may be what fills the disk, and
    once it is gone free space looks normal again.

    Args:
        exc: the exception a write of `path` raised.
        path: the file or folder being written.
        errno_only: trust only ENOSPC/EDQUOT, not low free space (for errors that may not
            come from a write at all).
    """
    if isinstance(exc, StorageFullError):
        return exc
    free = _free_bytes(path)
    low = not errno_only and free is not None and free < FULL_BELOW_BYTES
    if low or _errno_full(exc):
        return StorageFullError(path, free)
    return None


# The temporary file `atomic_path` writes beside its target: `.<name>.<pid>.<8 hex>.tmp`.
# Never a stage's output; one another process wrote is what a process killed mid-write left
# (the run lock admits one process).
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    Raises:
        StorageFullError: the write failed and the filesystem is full (see `storage_full`).
    """
    # Not mkstemp: its files are 0600, and artifacts on shared storage must be readable by the
    # team (0666 minus the umask, as for any new file).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        # Here, not after `finally`: the partial temporary file must still be on disk.
        full = storage_full(exc, path)
        if full is None or full is exc:
            raise
        raise full from exc
    finally:
        with contextlib.suppress(OSError):  # e.g. its folder is a file: the error above counts
            tmp.unlink(missing_ok=True)


def _remove_unlisted(folder: Path, listed: set[Path]) -> None:
    """Remove the files under `folder` (if it is one) that `listed` does not hold: what an
    earlier computation left beside the recorded outputs. Not `atomic_path`'s temporaries: a
    write in flight (two evaluations of one generation pull its corpus at once in a pipelined
    run) or one a killed writer left, which `record_stage` clears."""
    if not folder.is_dir():
        return
    for stale in folder.rglob("*"):
        if stale not in listed and not _TEMPORARY.match(stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes so that `path` is either absent, the old file, or the complete new file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, value: Any) -> None:
    """Atomically write pretty, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success replace `path` with it.

    Raises:
        StorageFullError: the write failed and the filesystem is full (see `storage_full`).
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o777)  # minus the umask (mkdtemp would make it 0700)
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as exc:
        # Here, not after `finally`: the partial temporary folder must still be on disk.
        full = storage_full(exc, path)
        if full is None or full is exc:
            raise
        raise full from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def now_iso() -> str:
    """UTC timestamp for records."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def run_ids(root: str | Path) -> list[str]:
    """The runs under an artifact root (a path or URL): folders with a saved config."""
    if is_url(root):
        remote = ObjectRoot(str(root))
        return [n for n in remote.children("") if remote.exists(f"{n}/{CONFIG_FILE}")]
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())


def root_problem(root: str | Path, write: bool = True) -> str | None:
    """Why artifact root `root` cannot be used from here (a URL root: probed), else None.

    Args:
        root: a path or URL.
        write: whether this process will write there (else reading is checked).
    """
    if not is_url(root):
        existing = _existing(Path(root).expanduser())
        if not existing.is_dir():  # a file where the root, or a folder above it, should be
            return f"artifact root {str(root)!r}: {str(existing)!r} is a file, not a folder"
        return _local_write_problem(Path(root).expanduser(), existing) if write else None
    problem = url_problem(str(root))  # the scheme, a bucket, no credentials in the URL
    return problem or ObjectRoot(str(root)).problem(write)


def _generation_numbers(names: Iterable[str]) -> list[int]:
    """The sorted generation numbers of folder names `gen-NNN` among `names`."""
    return sorted(int(n[4:]) for n in names if n.startswith("gen-") and n[4:].isdigit())


def _local_write_problem(root: Path, existing: Path) -> str | None:
    """Why folder `root` cannot be created or written here, found by doing it: permissions do
    not tell (root may write anywhere yet not create folders under /proc, and a read-only mount
    says so only when written). The folders it had to create below `existing` (its nearest
    existing folder, `_existing`) and its probe file are removed."""
    target = Path(os.path.abspath(root))
    created = [target, *target.parents][: len(target.parts) - len(existing.parts)]  # deepest 1st
    try:
        for folder in reversed(created):
            folder.mkdir()
        probe = root / f".collapse-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"artifact root {str(root)!r} cannot be written ({cause_text(exc)})"
    finally:
        for folder in created:  # deepest first; one that was not made is not there
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


def child_root(root: str | Path, name: str) -> str:
    """`<root>/<name>` for a path or URL root."""
    return f"{str(root).rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


def canonical_root(root: str | Path) -> str:
    """One spelling per artifact root, to tell whether two configs name the same one."""
    return str(root).rstrip("/") if is_url(root) else str(Path(root).resolve())


def run_location(run: str, root: str | Path) -> str:
    """Where a run named on the command line is: a URL or folder as given, else `<root>/<run>`."""
    if is_url(run) or Path(run).is_dir():
        return run
    return child_root(root, run)


class RunLockedError(UserError, RuntimeError):
    """Another process holds the run's lock."""


class LeaseLostError(UserError):
    """This process no longer holds the run's lease: another may have taken the run over."""


class _MissingObject(Exception):
    """A recorded output's object is not at the URL (inside `RunStore._fetch`)."""


class CorruptArtifactError(UserError):
    """A published output that is missing or whose bytes differ from its record's sha256."""


class RunStore:
    """Paths, manifests and validity checks for one run folder.

    Under a URL root, `run_dir` is the run's local staging copy (see `pull` and `record_stage`).
    """

    def __init__(self, root: str | Path, run_id: str, staging: Path | None = None):
        """Args:
        root: the artifact root, a local path or an fsspec URL.
        run_id: the run folder's name.
        staging: under a URL root, where staging copies live (default: see
            `collapse.object_store.staging_root`).
        """
        self.remote = ObjectRoot(str(root)) if is_url(root) else None
        self.staging = staging
        self.root = staging_root(self.remote.url, staging) if self.remote else Path(root)
        self.run_id = run_id
        self.run_dir = self.root / run_id
        # Local copies whose sha256 was checked: path -> (sha256, size, mtime_ns).
        self._verified: dict[Path, tuple[str, int, int]] = {}
        # Files this store has on the URL already: run-relative path -> (size, mtime_ns) of
        # the local copy then (e.g. sample shards saved as they were written).
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._snapshot = threading.local()  # see `manifests_read_once`
        self._staging_hold: IO[str] | None = None
        if self.run_dir.is_dir():
            self._hold_copy()

    def _hold_copy(self) -> None:
        """Under a URL root, mark the staging copy in use while this store lives, so that
        `collapse staging --clean` leaves it alone (`collapse.staging`). Taken when the store
        opens an existing copy, and before its first local write otherwise: a store that only
        reads the URL (`collapse status` listing runs) leaves no copy behind."""
        if self.remote is not None and self._staging_hold is None:
            self._staging_hold = hold_staging_copy(self.run_dir, self.location)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_staging_hold"] = None  # an open file: the unpickled store takes its own
        state["_snapshot"] = None  # per thread, and only within a block
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshot = threading.local()
        if self.run_dir.is_dir():
            self._hold_copy()

    @classmethod
    def at(cls, location: str | Path, staging: Path | None = None) -> RunStore:
        """The store of a run folder given by its path or URL (`<root>/<run-id>`)."""
        text = str(location).rstrip("/")
        if is_url(text):
            parent, _, name = text.rpartition("/")
            return cls(parent, name, staging)
        path = Path(location)
        return cls(path.parent, path.name)

    @property
    def location(self) -> str:
        """Where the run lives: its absolute folder, or its URL under a URL root."""
        return self.remote.url_of(self.run_id) if self.remote else str(self.run_dir.resolve())

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.run_dir).as_posix()

    def _object(self, rel: str) -> str:
        return f"{self.run_id}/{rel}"

    def gen_dir(self, generation: int) -> Path:
        """Folder of generation `generation` (0 = the human corpus)."""
        return self.run_dir / f"gen-{generation:03d}"

    # --- the layout of a run folder (the one place paths are spelled) ---------------------

    @property
    def config_path(self) -> Path:
        """The run's frozen config (YAML)."""
        return self.run_dir / CONFIG_FILE

    @property
    def config_hash_path(self) -> Path:
        """The hash of the config the run was started with."""
        return self.run_dir / "config.sha256"

    def corpus_dir(self, generation: int) -> Path:
        """Generation's corpus shards: the human train split (0) or the sampled corpus."""
        return self.gen_dir(generation) / "corpus"

    def validation_path(self) -> Path:
        """The human validation set (generation 0)."""
        return self.gen_dir(0) / "validation.parquet"

    def tokenizer_dir(self) -> Path:
        """The run's tokenizer (generation 0)."""
        return self.gen_dir(0) / "tokenizer"

    def model_dir(self, generation: int) -> Path:
        """Generation's trained model (a transformers-loadable checkpoint)."""
        return self.gen_dir(generation) / "model"

    def train_stats_path(self, generation: int) -> Path:
        """Generation's training statistics (losses per step; nothing that varies between runs)."""
        return self.gen_dir(generation) / "train.json"

    def train_state_dir(self, generation: int) -> Path:
        """Mid-training checkpoints (removed once the model is saved)."""
        return self.gen_dir(generation) / "train-state"

    def sample_progress_path(self, generation: int) -> Path:
        """Which sampled shards are finished (removed once the corpus is complete)."""
        return self.corpus_dir(generation) / "_progress.json"

    def eval_dir(self, generation: int) -> Path:
        """Generation's evaluation results and their side files."""
        return self.gen_dir(generation) / "eval"

    def eval_path(self, generation: int, name: str) -> Path:
        """The result of evaluation `name` on generation `generation`."""
        return self.eval_dir(generation) / f"{name}.json"

    def shared_dir(self, name: str) -> Path:
        """A run-wide folder shared by generations (e.g. the judge's response cache)."""
        return self.run_dir / name

    def manifest_path(self, generation: int) -> Path:
        """The generation's manifest file."""
        return self.gen_dir(generation) / MANIFEST

    @contextlib.contextmanager
    def manifests_read_once(self) -> Iterator[None]:
        """Within the block, this thread reads each generation's manifest once and keeps it.

        For readers that look up many records (a table checks every stage's key, each key
        reads its inputs' records), where a URL root would otherwise be asked again for every
        lookup. Not for a block that writes records: it would not see its own writes.
        """
        outer = self._kept_manifests()
        if outer is None:
            self._snapshot.manifests = {}
        try:
            yield
        finally:
            if outer is None:
                self._snapshot.manifests = None

    def _kept_manifests(self) -> dict[int, dict[str, Any]] | None:
        """This thread's manifests kept by `manifests_read_once`, None outside such a block."""
        return getattr(self._snapshot, "manifests", None)

    def read_manifest(self, generation: int) -> dict[str, Any]:
        """The generation's manifest, or an empty one when absent or unreadable."""
        kept = self._kept_manifests()
        if kept is not None:
            if generation not in kept:
                kept[generation] = self._read_manifest(generation)
            return kept[generation]
        return self._read_manifest(generation)

    def _read_manifest(self, generation: int) -> dict[str, Any]:
        if self.remote is not None:
            gen_dir = self.gen_dir(generation).name
            listed = self.remote.sizes(self._object(f"{gen_dir}/records"))
            names = {stage: self._object(record_rel(gen_dir, stage)) for stage in stages_in(listed)}
            blobs = self.remote.read_many(list(names.values()))
            stages = {}
            for stage, name in names.items():
                with contextlib.suppress(KeyError, json.JSONDecodeError):
                    stages[stage] = json.loads(blobs[name])
            return {"generation": generation, "stages": stages}
        path = self.manifest_path(generation)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"generation": generation, "stages": {}}
        data.setdefault("stages", {})
        return data

    def generations_on_disk(self) -> list[int]:
        """Generation numbers that have a folder (under a URL root: at the URL)."""
        if self.remote is not None:
            return _generation_numbers(self.remote.children(self.run_id))
        return self.generations_here()

    def generations_here(self) -> list[int]:
        """Generation numbers that have a folder in `run_dir` (under a URL root: the staging
        copy, which may hold fewer than the URL)."""
        if not self.run_dir.is_dir():
            return []
        return _generation_numbers(c.name for c in self.run_dir.glob("gen-*") if c.is_dir())

    def record_stage(
        self,
        generation: int,
        stage: str,
        key: str,
        outputs: list[Path],
        info: dict[str, Any] | None = None,
        copied_from: str | None = None,
    ) -> dict[str, Any]:
        """Hash a finished stage's outputs and write its manifest entry (after the outputs).

        Args:
            generation: the generation.
            stage: the stage name.
            key: the stage key the outputs were made under.
            outputs: files or folders in this run.
            info: the stage's results and statistics.
            copied_from: the run the outputs were taken from, if they were.

        Returns:
            The stage record: key, outputs (run-relative path -> sha256), digest, info.
        """
        files: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for out in outputs:
            targets = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
            for file in targets:
                # A write cut short by a kill -9 leaves its temporary in the folder: not an
                # output (else a resumed stage's digest would differ from an uninterrupted one's).
                temporary = _TEMPORARY.match(file.name)
                if temporary:
                    if temporary[1] != str(os.getpid()):
                        file.unlink(missing_ok=True)
                    continue
                rel = str(file.relative_to(self.run_dir))
                files[rel] = self._hash_local(file)
                sizes[rel] = file.stat().st_size
        record = {
            "key": key,
            "outputs": files,
            "bytes": sizes,
            "digest": sha256_json(files),
            "info": info or {},
            "completed_at": now_iso(),
        }
        if copied_from is not None:
            record["copied_from"] = copied_from
        if self.remote is not None:
            self._hold_copy()
            self._check_lease(f"generation {generation}, stage {stage}")
            # Outputs first, the record last: whoever sees the record finds them complete.
            concurrently(
                self.remote.put,
                [
                    (self.run_dir / rel, self._object(rel))
                    for rel in files
                    if self._uploaded.get(rel) != _stamp(self.run_dir / rel)
                ],
            )
        self._write_record(generation, stage, record)
        return record

    def _write_record(
        self, generation: int, stage: str, record: dict[str, Any], replacing: str | None = None
    ) -> None:
        """Write a stage's record: its object at a URL root (the lease checked by the caller),
        else its entry in the manifest; with `replacing`, there only over a record of that key
        (at a URL root the run's lease keeps other writers out)."""
        if self.remote is not None:
            blob = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
            gen_dir = self.gen_dir(generation).name
            self.remote.put_bytes(blob, self._object(record_rel(gen_dir, stage)))
            return
        with self.manifest_update(generation):
            manifest = self.read_manifest(generation)
            if replacing is None or manifest["stages"].get(stage, {}).get("key") == replacing:
                manifest["stages"][stage] = record
                atomic_write_json(self.manifest_path(generation), manifest)

    def rekey(
        self, generation: int, stage: str, record: dict[str, Any], key: str
    ) -> dict[str, Any]:
        """Write a valid `record` again under `key`, its outputs untouched; the new record.

        For a record made under an earlier formula of the same stage's key
        (`collapse.pipeline.earlier_stage_keys`), so that later changes of what the formula
        no longer holds leave it valid.
        """
        rekeyed = {**record, "key": key}
        self._check_lease(f"generation {generation}, stage {stage}")  # no lease: no-op
        self._write_record(generation, stage, rekeyed, replacing=record.get("key"))
        return rekeyed

    @contextlib.contextmanager
    def manifest_update(self, generation: int) -> Iterator[None]:
        """Hold the generation's manifest for a read-modify-write.

        Evaluations of one generation run concurrently (threads of a pipelined run, and jobs on
        work-pool workers sharing the artifact root); without this, two stages finishing
        together would each write the manifest they read, and one record would be lost.
        """
        path = self.manifest_path(generation).resolve()
        with _MANIFEST_THREAD_LOCKS_GUARD:
            thread_lock = _MANIFEST_THREAD_LOCKS.setdefault(path, threading.Lock())
        with thread_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(MANIFEST_LOCK), "a") as fh:
                fcntl.lockf(fh, fcntl.LOCK_EX)  # released when the file closes
                yield

    def read_record(self, generation: int, stage: str) -> dict[str, Any] | None:
        """The stage's record as written (not checked), None when there is none."""
        if self.remote is None or self._kept_manifests() is not None:
            return self.read_manifest(generation)["stages"].get(stage)
        blob = self.remote.read(self._object(record_rel(self.gen_dir(generation).name, stage)))
        try:
            return None if blob is None else json.loads(blob)
        except json.JSONDecodeError:
            return None

    def valid_record(self, generation: int, stage: str, key: str | None) -> dict[str, Any] | None:
        """The stage's record if it is done: same key and every output matches its sha256.

        Under a URL root an output counts when its object exists with the recorded size (hashing
        it would mean downloading it); its sha256 is checked when it is fetched (`pull`).
        """
        record = self.read_record(generation, stage)
        if record is None or (key is not None and record.get("key") != key):
            return None
        if self.remote is not None:
            return record if self._published(record) else None
        for rel, digest in record["outputs"].items():
            path = self.run_dir / rel
            if not path.is_file() or sha256_file(path) != digest:
                return None
        return record

    def _published(self, record: dict[str, Any]) -> bool:
        """Whether every output of a record is an object of the recorded size."""
        listed: dict[str, dict[str, int]] = {}
        sizes = record.get("bytes", {})
        for rel in record["outputs"]:
            top, _, inner = rel.partition("/")
            if top not in listed:
                listed[top] = self.remote.sizes(self._object(top))
            size = listed[top].get(inner)
            if size is None or size != sizes.get(rel, size):
                return False
        return True

    def _hash_local(self, path: Path) -> str:
        """sha256 of a local file, remembered while its size and mtime stay the same."""
        stat = path.stat()
        seen = self._verified.get(path)
        if seen is not None and seen[1:] == (stat.st_size, stat.st_mtime_ns):
            return seen[0]
        digest = sha256_file(path)
        self._verified[path] = (digest, stat.st_size, stat.st_mtime_ns)
        return digest

    def pull(self, path: Path) -> Path:
        """Make the published outputs at or under `path` present here; returns `path`.

        A no-op under a local root. Under a URL root, each recorded output at or under `path`
        whose local copy is missing or differs is downloaded and checked against its sha256, and
        files under a pulled folder that no record lists (left from an earlier computation) are
        removed, so the folder holds exactly what was published.

        Raises:
            CorruptArtifactError: an output is missing or differs from its record; that record
                is dropped, so the next attempt recomputes the stage.
        """
        if self.remote is None:
            return path
        self._hold_copy()
        rel = self._rel(path)
        top = rel.split("/", 1)[0]
        if not (top.startswith("gen-") and top[4:].isdigit()):
            return path
        generation = int(top[4:])
        fetches = [
            (generation, stage, out, digest)
            for stage, record in self.read_manifest(generation)["stages"].items()
            for out, digest in record["outputs"].items()
            if out == rel or out.startswith(rel + "/")
        ]
        concurrently(self._fetch, fetches)
        wanted = {self.run_dir / out for _, _, out, _ in fetches}
        if wanted:
            _remove_unlisted(path, wanted)
        return path

    def _fetch(self, generation: int, stage: str, rel: str, digest: str) -> None:
        local = self.run_dir / rel
        if local.is_file() and self._hash_local(local) == digest:
            return
        try:
            with atomic_path(local) as tmp:
                try:
                    self.remote.get(self._object(rel), tmp)
                except FileNotFoundError as exc:  # the object, not a local file: it is missing
                    raise _MissingObject from exc
                if sha256_file(tmp) != digest:
                    raise CorruptArtifactError("sha256 differs")
        except (CorruptArtifactError, _MissingObject) as exc:
            self.drop_stage(generation, stage)
            problem = "is missing" if isinstance(exc, _MissingObject) else "differs"
            raise CorruptArtifactError(
                f"{self.remote.url_of(self._object(rel))} {problem} from what stage {stage} of "
                f"generation {generation} recorded; that record is dropped, so running again "
                "recomputes the stage"
            ) from None
        self._verified[local] = (digest, *_stamp(local))  # just checked: no second hashing

    def release_local(self, outputs: list[str]) -> int:
        """Remove this machine's copies of published outputs (run-relative paths); the bytes
        freed.

        Only under a URL root, where the run lives at the URL and the staging copy is a cache:
        `pull` fetches a removed file again (checked against its record) should a stage read
        it later. A no-op under a path root, where the run folder is the run itself.
        """
        if self.remote is None:
            return 0
        freed = 0
        folders = set()
        for rel in outputs:
            path = self.run_dir / rel
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
            self._verified.pop(path, None)
            folders.update(p for p in path.parents if self.run_dir in p.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: something else lives there
                folder.rmdir()
        return freed

    def save_partial(self, path: Path) -> None:
        """Upload a mid-stage file (a training checkpoint, a finished sample shard and the
        sampler's progress), so that a stage killed here resumes from it on another machine.

        A no-op under a path root. Such files are no stage's record: whoever reads them checks
        them (a checkpoint's key, a shard's sha256 in the progress file).
        """
        if self.remote is None:
            return
        self._hold_copy()
        rel = self._rel(path)
        self._check_lease(rel)
        self.remote.put(path, self._object(rel))
        self._stamp_as_published(path, rel)
        self._uploaded[rel] = _stamp(path)

    def _stamp_as_published(self, path: Path, rel: str) -> None:
        """Give the local copy of a saved mid-stage file its object's modification time, so
        that `restore_partial` can tell a newer one saved later by another machine."""
        published = self.remote.modified(self._object(rel))
        if published is not None:
            os.utime(path, (published, published))

    def held_lease(self) -> Lease | None:
        """The lease by which this process holds the run (see `lock`), if it does."""
        return _HELD_LEASES.get(self.location)

    def _check_lease(self, what: str) -> None:
        """Stop before publishing `what` if this process lost the run's lease (it stalled or
        was cut off for longer than the lease lives, and another process may be running the
        run now: two writers of one stage must not mix their files).

        Raises:
            LeaseLostError: the lease is no longer this process's for sure.
        """
        lease = self.held_lease()
        if lease is not None and not lease.held():
            raise LeaseLostError(
                f"run {self.run_id}: this process lost the run's lease ({lease.url}: not "
                f"renewed for {lease.ttl:.0f} s) and stopped before publishing {what}, as "
                "another process may have taken the run over. Finished work is kept: run the "
                "same command again (it resumes, or says which process has the run)."
            )

    def restore_partial(self, path: Path) -> bool:
        """Fetch a mid-stage file saved by `save_partial` elsewhere, unless the copy here is
        as new.

        A copy here carries the modification time of the object it was saved as or fetched
        from, or a later one if it was written since (and not saved: a kill came first). The
        object is taken when it is newer: another machine went on from here (this one trained
        to step 2 and was killed, another to step 10, and this one runs the stage again).

        Returns:
            Whether the file is here now.
        """
        if self.remote is None:
            return path.exists()
        self._hold_copy()
        rel = self._rel(path)
        if path.exists():
            published = self.remote.modified(self._object(rel))
            if published is None or published <= path.stat().st_mtime:
                return True
        try:
            with atomic_path(path) as tmp:
                self.remote.get(self._object(rel), tmp)
        except FileNotFoundError:
            return path.exists()
        self._stamp_as_published(path, rel)
        self._uploaded[rel] = _stamp(path)
        return True

    def discard_partial(self, path: Path) -> None:
        """Remove a mid-stage file or folder here and its saved copy (the stage is done, or
        must start over)."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if self.remote is not None:
            rel = self._rel(path)
            for name in self.remote.sizes(self._object(rel)):
                self.remote.remove(self._object(f"{rel}/{name}"))
            self.remote.remove(self._object(rel))

    def write_run_file(self, path: Path, data: bytes) -> None:
        """Write a run-level file (e.g. the frozen config) here and, under a URL root, there."""
        self._hold_copy()
        atomic_write_bytes(path, data)
        if self.remote is not None:
            self.remote.put(path, self._object(self._rel(path)))

    def read_run_file(self, path: Path) -> bytes | None:
        """A run-level file's bytes (from the URL under a URL root), None when absent."""
        if self.remote is not None:
            return self.remote.read(self._object(self._rel(path)))
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def started(self) -> bool:
        """Whether the run has a frozen config (it was started at least once)."""
        if self.remote is not None:
            return self.remote.exists(self._object(CONFIG_FILE))
        return self.config_path.is_file()

    def publish(self, path: Path) -> str:
        """Upload a file or folder of the run that is no stage's output (e.g. the report).

        Returns:
            Where it now is: its URL under a URL root, else its path.
        """
        if self.remote is None:
            return str(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            self.remote.put(file, self._object(self._rel(file)))
        return self.remote.url_of(self._object(self._rel(path)))

    def sibling_runs(self) -> list[RunStore]:
        """The other runs under the same artifact root (folders with a saved config)."""
        root = self.remote.url if self.remote is not None else self.root
        return [RunStore(root, name, self.staging) for name in run_ids(root) if name != self.run_id]

    def adopt_outputs(self, other: RunStore, record: dict[str, Any]) -> list[Path] | None:
        """Hard-link (or copy) another run's recorded outputs to the same places in this run.

        Returns:
            The files, or None when one no longer has its recorded sha256 (then nothing of
            this stage is kept).
        """
        files = []
        for rel, digest in record["outputs"].items():
            if other.remote is not None:
                try:
                    other.pull(other.run_dir / rel)
                except CorruptArtifactError:
                    return None
            target = self.run_dir / rel
            try:
                with atomic_path(target) as tmp:
                    tmp.unlink()
                    try:
                        os.link(other.run_dir / rel, tmp)
                    except FileNotFoundError:
                        raise
                    except OSError:  # another filesystem, or links not allowed
                        shutil.copyfile(other.run_dir / rel, tmp)
            except FileNotFoundError:  # the other run's process released its copy meanwhile
                for done in files:
                    done.unlink(missing_ok=True)
                return None
            if sha256_file(target) != digest:
                for done in [*files, target]:
                    done.unlink(missing_ok=True)
                return None
            files.append(target)
        # A chain stage's folders (a corpus, a model, the tokenizer: each one stage's alone, not
        # `eval/`, which every evaluation shares) now hold exactly what it recorded, as a
        # computed stage's do: files left there by an earlier computation (more corpus shards,
        # under another `sample.shard_size`) would otherwise be read beside the adopted ones.
        owned = {self.corpus_dir(0).name, self.model_dir(0).name, self.tokenizer_dir().name}
        folders = {
            self.run_dir.joinpath(*parts[:2])
            for parts in (Path(rel).parts for rel in record["outputs"])
            if len(parts) > 2 and parts[1] in owned
        }
        for folder in folders:
            _remove_unlisted(folder, set(files))
        return files

    def drop_stage(self, generation: int, stage: str) -> None:
        """Forget a stage (its outputs stay until overwritten)."""
        if self.remote is not None:
            gen_dir = self.gen_dir(generation).name
            self._check_lease(f"the removal of generation {generation}'s {stage} record")
            self.remote.remove(self._object(record_rel(gen_dir, stage)))
            return
        with self.manifest_update(generation):
            manifest = self.read_manifest(generation)
            if manifest["stages"].pop(stage, None) is not None:
                atomic_write_json(self.manifest_path(generation), manifest)

    def invalidate_from(self, generation: int) -> list[int]:
        """Remove the manifests of `generation` and every later one, so all are recomputed."""
        dropped = []
        for gen in self.generations_on_disk():
            if gen >= generation and self.remote is not None:
                gen_dir = self.gen_dir(gen).name
                stages = stages_in(self.remote.sizes(self._object(f"{gen_dir}/records")))
                if stages:
                    self._check_lease(f"the removal of generation {gen}'s records")
                for stage in stages:
                    self.remote.remove(self._object(record_rel(gen_dir, stage)))
                if stages:
                    dropped.append(gen)
            elif gen >= generation and self.manifest_path(gen).exists():
                with self.manifest_update(gen):
                    self.manifest_path(gen).unlink(missing_ok=True)
                dropped.append(gen)
        return dropped

    @contextlib.contextmanager
    def lock(self, log: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold an exclusive lock on the run folder for the duration of a run.

        A path root's lock is an flock on the run folder (shared file systems honour it across
        machines; a killed process drops it). Under a URL root the staging copy is flocked too
        (other processes of this machine), and the run's folder there: by flock on a `file://`
        root, by a lease object on S3 (`collapse.lease`; a killed holder's lease is taken over
        once it expires). Other object stores have no conditional writes that fsspec passes on,
        so there the lock keeps out this machine's processes only.

        Args:
            log: where to say that this process lost its lease (it stalled past the lease's
                time to live and another process took the run over).

        Raises:
            RunLockedError: another process holds the run.
        """
        self._hold_copy()
        with _flock(self.run_dir / ".lock", self.run_id):
            if self.remote is None:
                yield
            elif self.remote.renames:  # a file system reached by URL: lock it there too
                with _flock(Path(self.remote.path(self._object(".lock"))), self.run_id):
                    yield
            elif self.remote.leases:
                lease = self.remote.lease(self._object(".lease"), log)
                try:
                    lease.acquire()
                except LeaseHeldError as exc:
                    raise RunLockedError(
                        f"run {self.run_id} is in use by another process: {exc}"
                    ) from None
                _HELD_LEASES[self.location] = lease
                try:
                    yield
                finally:
                    _HELD_LEASES.pop(self.location, None)
                    lease.release()
            else:
                yield

    def locked(self) -> bool | None:
        """Whether a process holds the run's lock (see `lock`); None when it cannot be told
        from here (no lock file yet, or an object store without leases)."""
        if self.remote is None:
            return flocked(self.run_dir / ".lock")
        if self.remote.renames:
            return flocked(Path(self.remote.path(self._object(".lock"))))
        if self.remote.leases:
            return self.remote.lease(self._object(".lease")).live()
        return None


@contextlib.contextmanager
def _flock(path: Path, run_id: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing).

    Raises:
        RunLockedError: another process holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "w")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"run {run_id} is in use by another process (lock: {fh.name})"
            ) from None
        yield
    finally:
        fh.close()
