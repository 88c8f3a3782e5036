"""Artifact roots of every kind for tests: a local path, a `file://` URL and a bucket on a real
S3-compatible server (moto in server mode, a separate process on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from collapse.object_store import ObjectRoot
from collapse.store import RunStore

ROOT_KINDS = ["path", "file", "s3"]
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def s3_server(log: Path) -> Iterator[str]:
    """Start moto's S3 server; yields its endpoint URL and sets the env s3fs reads to use it.

    The env is set for the whole process (workers forked or spawned by a test inherit it) and
    restored afterwards; the server is stopped whatever happens.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)  # noqa: S310
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
                time.sleep(0.2)
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Root:
    """One artifact root under test, with ways to reach its stored copies behind the store."""

    kind: str
    root: str
    staging: Path

    def store(self, run_id: str = "run") -> RunStore:
        """A store of its own (as each Prefect task builds one)."""
        return RunStore(self.root, run_id)

    def overwrite(self, store: RunStore, rel: str, data: bytes) -> None:
        """Change the stored copy of a run file (where readers of the root get it)."""
        if store.remote is None:
            (store.run_dir / rel).write_bytes(data)
        else:
            ObjectRoot(self.root).put_bytes(data, f"{store.run_id}/{rel}")

    def delete(self, store: RunStore, rel: str) -> None:
        """Delete the stored copy of a run file."""
        if store.remote is None:
            (store.run_dir / rel).unlink()
        else:
            ObjectRoot(self.root).remove(f"{store.run_id}/{rel}")

    def stored(self, store: RunStore) -> dict[str, bytes]:
        """Every stored file of a run (hidden ones included), by run-relative path."""
        if store.remote is None:
            files = [p for p in store.run_dir.rglob("*") if p.is_file()]
            return {p.relative_to(store.run_dir).as_posix(): p.read_bytes() for p in files}
        remote = ObjectRoot(self.root)
        blobs = remote.read_many([f"{store.run_id}/{n}" for n in remote.sizes(store.run_id)])
        return {name.removeprefix(f"{store.run_id}/"): blob for name, blob in blobs.items()}


def make_root(kind: str, tmp_path: Path, s3_endpoint: str | None) -> Root:
    """A fresh, empty artifact root of `kind`; the caller points $COLLAPSE_STAGING at
    `tmp_path / "staging"`."""
    staging = tmp_path / "staging"
    if kind == "path":
        return Root(kind, str(tmp_path / "artifacts"), staging)
    if kind == "file":
        return Root(kind, f"file://{tmp_path / 'artifacts'}", staging)
    assert s3_endpoint is not None
    import fsspec

    bucket = f"collapse-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return Root(kind, f"s3://{bucket}/artifacts", staging)
