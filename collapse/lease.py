"""A run's lock on an object store: a lease object that only one process can hold.

Object stores have no locks, but S3 (and S3-compatible servers) write an object conditionally:
`If-None-Match: *` creates it only if absent, `If-Match: <etag>` replaces it only if unchanged.
The lease object names its holder and an expiry; the holder renews it every third of its time to
live. A process that finds a live lease waits for it to expire (its holder may have been killed
with no chance to release it) and takes it over then, unless it was renewed meanwhile: then the
run is in use and it stops. A takeover is a conditional replace of the expired object, so of two
processes taking over together only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

LEASE_ENV = "COLLAPSE_LEASE_S"
DEFAULT_LEASE_S = 60.0


def lease_seconds() -> float:
    """The lease's time to live: `$COLLAPSE_LEASE_S`, default 60 s."""
    return float(os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S)


class LeaseHeldError(Exception):
    """Another live process holds the lease."""

    def __init__(self, holder: str, url: str):
        super().__init__(holder, url)
        self.holder = holder
        self.url = url

    def __str__(self) -> str:
        return f"held by {self.holder} (lease {self.url})"


class Lease:
    """An exclusive lease on `path` of an S3-like filesystem `fs`, renewed in the background.

    Args:
        fs: an fsspec filesystem whose writes take S3's `IfNoneMatch`/`IfMatch` arguments.
        path: the lease object's path in `fs`.
        url: the same as a URL, for messages.
        ttl: seconds a lease lives unless renewed.
        on_lost: called with a message if a renewal finds the lease taken over (this process
            stalled for longer than `ttl`).
    """

    def __init__(
        self,
        fs: Any,
        path: str,
        url: str,
        ttl: float,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.fs, self.path, self.url, self.ttl = fs, path, url, ttl
        self.on_lost = on_lost
        self.holder = f"{socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"
        self.etag: str | None = None
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._renewed_at = 0.0  # time.monotonic() of the last write of ours that took
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + self.ttl}).encode()

    def _write(self, **condition: str) -> bool:
        """Write our lease under `condition`; whether the condition held."""
        try:
            self.fs.pipe_file(self.path, self._body(), **condition)
        except FileExistsError:  # If-None-Match: the object exists
            return False
        except OSError as exc:  # If-Match: the object changed (s3fs: EINVAL, "pre-conditions")
            text = str(exc)
            if any(m in text for m in ("pre-condition", "Precondition", "ConditionalRequest")):
                return False
            raise
        self.fs.invalidate_cache(self.path)
        self.etag = self.fs.info(self.path)["ETag"]
        self._renewed_at = time.monotonic()
        return True

    def held(self) -> bool:
        """Whether this process still holds the lease for sure: no renewal found it taken,
        and the last renewal is younger than the time to live (after that, a renewal that
        keeps failing, e.g. cut off from the store, may have let another process take it)."""
        return not self._lost.is_set() and time.monotonic() - self._renewed_at < self.ttl

    def _current(self) -> tuple[str, dict[str, Any]] | None:
        """(etag, content) of the lease object, None when absent. The etag is read first, so
        the content is at least as new as it: a replace conditional on it never overwrites a
        renewal this process did not see."""
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path)["ETag"]
            content = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # not ours, or cut: treat as expired
            content = {"holder": "unknown", "expires": 0}
        return etag, content

    def live(self) -> bool:
        """Whether a lease is there and its stamp says it is unexpired (the holder's clock)."""
        current = self._current()
        return current is not None and float(current[1].get("expires", 0)) > time.time()

    def acquire(self) -> None:
        """Take the lease, waiting for an existing one to expire if need be.

        A lease counts as expired when its stamp says so, or when it stayed unchanged for a
        whole time to live as this process watched it (no clock of another machine involved).

        Raises:
            LeaseHeldError: another process holds the lease and renews it.
        """
        seen: str | None = None
        seen_at = 0.0
        while not self._write(IfNoneMatch="*"):
            current = self._current()
            if current is None:
                continue  # released meanwhile: try to create it again
            etag, content = current
            if etag != seen:
                if seen is not None:  # renewed (or taken) while we watched: it is alive
                    raise LeaseHeldError(str(content.get("holder")), self.url)
                seen, seen_at = etag, time.monotonic()
                expired = float(content.get("expires", 0)) < time.time()
            else:
                expired = time.monotonic() - seen_at > self.ttl
            if expired and self._write(IfMatch=etag):
                break
            time.sleep(self.ttl / 6)
        self._renewer = threading.Thread(target=self._renew, name="collapse-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                renewed = self._write(IfMatch=self.etag or "")
            except Exception:  # a network blip: try again at the next beat
                continue
            if not renewed:
                self._lost.set()
                if self.on_lost is not None:
                    self.on_lost(
                        f"lost the run's lease {self.url}: another process took it over after "
                        f"this one failed to renew it for {self.ttl:.0f} s"
                    )
                return

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        current = self._current()
        if current is not None and current[0] == self.etag:
            self.fs.rm_file(self.path)
