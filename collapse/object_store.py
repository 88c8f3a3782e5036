"""Artifact roots given as fsspec URLs (`s3://bucket/prefix`, `gs://...`, `file:///...`).

A run under a URL root works on a local staging copy of its folder (stages read and write local
files, as under a plain directory) and publishes each finished stage to the URL: its outputs
first, then its record, so a reader that sees the record sees complete outputs. Object stores
have no rename and no locks, so the layout differs from a plain directory in one place: each
stage's record is its own object, `gen-NNN/records/<stage>.json`, instead of an entry in one
`manifest.json` that writers would have to read, modify and write back (two workers finishing
stages of one generation together would lose one record). Writing an object is atomic on object
stores (a reader gets the old object or the whole new one); on filesystems reached through fsspec
(`file://`) it is a write to a temporary name and a rename.

Credentials come from the environment the filesystem reads (for S3: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for S3-compatible servers, or any fsspec setting as
`FSSPEC_S3_<KWARG>`), never from the URL or the config.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from collapse.lease import Lease, lease_seconds

RECORDS = "records"
RECORD_SUFFIX = ".json"
# The staging copies of URL roots: <base>/<scheme>/<bucket>/<prefix>/<run-id>.
# Objects fetched or uploaded at once (`concurrently`).
TRANSFERS = 16
STAGING_ENV = "COLLAPSE_STAGING"
DEFAULT_STAGING = Path("~/.cache/collapse/staging")


def is_url(root: str | Path) -> bool:
    """Whether an artifact root is an fsspec URL rather than a local path."""
    return isinstance(root, str) and "://" in root


def url_problem(url: str) -> str | None:
    """Why `url` cannot be an artifact root here (None when it can)."""
    import fsspec

    parts = urlsplit(url)
    if "@" in parts.netloc:
        return (
            "the URL carries credentials: remove them from it and set them in the environment "
            "instead (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3://)"
        )
    if not parts.scheme:
        return f"{url!r} has no scheme: give a local path or a URL such as s3://bucket/prefix"
    if parts.scheme != "file" and not parts.netloc:
        return f"{url!r} names no bucket: use {parts.scheme}://<bucket>/<prefix>"
    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ValueError:
        return f"{url!r}: fsspec knows no {parts.scheme!r} storage"
    except ImportError as exc:
        return (
            f"{url!r} needs a package that is not installed ({exc}); for s3:// install "
            "collapse[s3] (s3fs), for gs:// gcsfs"
        )
    return None


def staging_root(url: str, base: Path | None = None) -> Path:
    """The local folder that mirrors artifact root `url` (one per URL, stable across runs).

    Args:
        url: the artifact root.
        base: where staging copies live; default `$COLLAPSE_STAGING` or
            `~/.cache/collapse/staging`.
    """
    parts = urlsplit(url)
    inner = [p for p in f"{parts.netloc}/{parts.path}".split("/") if p not in ("", ".", "..")]
    return staging_base(base).joinpath(parts.scheme, *inner)


def staging_base(base: str | Path | None = None) -> Path:
    """The folder that holds every staging copy: `base`, else `$COLLAPSE_STAGING`, else
    `~/.cache/collapse/staging` (absolute)."""
    if base is None:
        base = os.environ.get(STAGING_ENV) or DEFAULT_STAGING
    return Path(base).expanduser().resolve()


class ObjectRoot:
    """One artifact root URL: the files of its runs as objects addressed by relative paths."""

    def __init__(self, url: str):
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.fs, self.base = url_to_fs(self.url)
        self.base = self.base.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        # A filesystem (not an object store): a write in place can be seen half done.
        self.renames = bool({"file", "local"} & set(protocols))
        # S3's conditional writes (If-None-Match, If-Match), which s3fs passes on: a lease
        # can lock a run there (collapse.lease).
        self.leases = bool({"s3", "s3a"} & set(protocols))

    def problem(self, write: bool = True) -> str | None:
        """Why this root cannot be used from here, None when it can.

        Args:
            write: check writing (a probe object is written and removed), else listing.
        """
        probe = f".collapse-probe-{uuid.uuid4().hex[:12]}"
        try:
            if write:
                self.put_bytes(b"", probe)
                self.remove(probe)
            else:
                self.fs.ls(self.base)
        except FileNotFoundError as exc:
            if not write:
                return None  # nothing there yet: no runs
            return f"{self.url}: {exc} (create the bucket, or correct the URL)"
        except PermissionError as exc:
            return f"{self.url}: access denied ({exc}): check the credentials in the environment"
        except Exception as exc:  # the filesystem library's own errors (botocore's, gcsfs's)
            if "credential" in f"{type(exc).__name__} {exc}".lower():
                return (
                    f"{self.url}: no credentials found: set them in the environment (for s3://: "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
                )
            return f"{self.url} cannot be {'written' if write else 'read'}: {exc}"
        return None

    def lease(self, rel: str, log: Callable[[str], None] | None = None) -> Lease:
        """A lease on object `rel` (not yet acquired); see `collapse.lease`."""
        return Lease(self.fs, self.path(rel), self.url_of(rel), lease_seconds(), log)

    def path(self, rel: str) -> str:
        """The filesystem path of `rel` (relative to the root)."""
        return f"{self.base}/{rel}" if rel else self.base

    def url_of(self, rel: str) -> str:
        """The URL of `rel`, for messages."""
        return f"{self.url}/{rel}" if rel else self.url

    def put(self, local: Path, rel: str) -> None:
        """Upload a file so that `rel` is the old object or the complete new one."""
        self._write(rel, lambda target: self.fs.put_file(str(local), target))

    def put_bytes(self, data: bytes, rel: str) -> None:
        """Write `data` to `rel` atomically (see `put`)."""
        self._write(rel, lambda target: self.fs.pipe_file(target, data))

    def _write(self, rel: str, write: Callable[[str], None]) -> None:
        """Run `write(path)` so that object `rel` is the old one or the complete new one: in
        place on an object store (a PUT is atomic), else to a temporary name then renamed."""
        target = self.path(rel)
        if not self.renames:
            write(target)
            return
        tmp = f"{target}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        try:
            write(tmp)
            self.fs.mv(tmp, target)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)

    def get(self, rel: str, local: Path) -> None:
        """Download `rel` to the local file `local` (the caller makes that atomic)."""
        self.fs.get_file(self.path(rel), str(local))

    def read(self, rel: str) -> bytes | None:
        """The bytes of `rel`, None when absent."""
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """The bytes of each of `rels` that exists, fetched concurrently where the store can."""
        if not rels:
            return {}
        paths = {self.path(rel): rel for rel in rels}
        found = self.fs.cat(list(paths), on_error="omit")
        return {paths[path]: blob for path, blob in found.items() if path in paths}

    def exists(self, rel: str) -> bool:
        """Whether object `rel` exists."""
        return self.fs.isfile(self.path(rel))

    def sizes(self, rel: str) -> dict[str, int]:
        """Every object under folder `rel` with its size, by path relative to `rel`."""
        prefix = self.path(rel).rstrip("/") + "/"
        self.fs.invalidate_cache()  # listings are cached; other workers write here
        try:
            found: dict[str, Any] = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {
            name[len(prefix) :]: int(info["size"])
            for name, info in found.items()
            if info.get("type") != "directory" and name.startswith(prefix)
        }

    def modified(self, rel: str) -> float | None:
        """When object `rel` was last written (seconds since the epoch, as the store keeps
        it: to the second on S3), None when it does not exist or the store does not say."""
        self.fs.invalidate_cache()
        try:
            info = self.fs.info(self.path(rel))
        except FileNotFoundError:
            return None
        for key in ("mtime", "LastModified", "updated", "last_modified"):  # by filesystem
            value = info.get(key)
            if isinstance(value, int | float):
                return float(value)
            if isinstance(value, datetime):
                return value.timestamp()
            if isinstance(value, str):
                try:
                    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
        return None

    def children(self, rel: str) -> list[str]:
        """Names directly under folder `rel` (objects and folders)."""
        self.fs.invalidate_cache()
        try:
            listed = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted({name.rstrip("/").rsplit("/", 1)[-1] for name in listed})

    def remove(self, rel: str) -> None:
        """Delete object `rel` if it exists (a folder of a filesystem is no object: kept)."""
        try:
            self.fs.rm_file(self.path(rel))
        except (FileNotFoundError, IsADirectoryError):
            pass


def concurrently(
    call: Callable[..., object], items: Iterable[tuple[Any, ...]], workers: int | None = None
) -> None:
    """`call(*item)` for every item, up to `workers` (default `TRANSFERS`) at once.

    Object stores answer each request in tens of milliseconds whatever its size, so a stage's
    hundreds of corpus shards move one after another spend most of their time waiting. Every
    call runs to its end; then the first error, if any, is raised.
    """
    items = list(items)
    workers = min(workers or TRANSFERS, len(items))
    if workers <= 1:
        for item in items:
            call(*item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="collapse-transfer") as pool:
        futures = [pool.submit(call, *item) for item in items]
    for future in futures:
        future.result()


def record_rel(generation_dir: str, stage: str) -> str:
    """Where a stage's record lives, relative to the run folder."""
    return f"{generation_dir}/{RECORDS}/{stage}{RECORD_SUFFIX}"


def stages_in(names: dict[str, int]) -> list[str]:
    """Stage names from the object names under a generation's records folder."""
    return sorted(n[: -len(RECORD_SUFFIX)] for n in names if n.endswith(RECORD_SUFFIX))
