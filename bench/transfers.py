"""Publishing and fetching a stage's files under an S3 root: one at a time vs concurrently.

Starts moto's S3 server (the dev extra's `moto[server]`) on 127.0.0.1, writes `--files` files of
`--kib` KiB (a corpus's shards), then times, with `collapse.object_store.TRANSFERS` at 1 (one
object after another, as before) and at its default, `RunStore.record_stage` (upload, then the
record) and `RunStore.pull` of the folder into an empty staging copy (download and sha256
check). Each side runs `--repeats` times, interleaved; the best of each is compared. A local
server answers in about a millisecond; a real object store takes tens of milliseconds per
request, where running requests concurrently matters more than here.

    python bench/transfers.py
    python bench/transfers.py --files 1000 --kib 400    # a paper-scale corpus (1M stories)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import collapse.object_store as object_store
from collapse.store import RunStore, atomic_write_bytes


def _moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)  # noqa: S310
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"moto server did not start: {log.read_text()}")
            time.sleep(0.2)


def _round(root: str, files: int, kib: int, staging: Path) -> tuple[float, float]:
    """Seconds to publish `files` files as a stage, and to pull them elsewhere."""
    run = uuid.uuid4().hex[:8]
    store = RunStore(root, run, staging=staging / "writer")
    folder = store.corpus_dir(1)
    for i in range(files):
        atomic_write_bytes(folder / f"part-{i:05d}.parquet", os.urandom(kib * 1024))
    start = time.perf_counter()
    store.record_stage(1, "sample", "key", [folder])
    published = time.perf_counter() - start
    reader = RunStore(root, run, staging=staging / "reader")
    start = time.perf_counter()
    reader.pull(reader.corpus_dir(1))
    pulled = time.perf_counter() - start
    assert len(list(reader.corpus_dir(1).iterdir())) == files
    return published, pulled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--kib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import s3fs

    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = _moto(Path(tmp) / "moto.log")
        try:
            os.environ.update(
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT_URL=endpoint,
            )
            s3fs.S3FileSystem(anon=False).mkdir("bench")
            sides = {"one at a time": 1, f"{object_store.TRANSFERS} at once": None}
            default = object_store.TRANSFERS
            best = {side: [float("inf")] * 2 for side in sides}
            for repeat in range(args.repeats):
                for side, workers in sides.items():
                    object_store.TRANSFERS = workers or default
                    staging = Path(tmp) / f"staging-{repeat}-{workers}"
                    times = _round("s3://bench/root", args.files, args.kib, staging)
                    best[side] = [min(a, b) for a, b in zip(best[side], times, strict=True)]
            object_store.TRANSFERS = default
        finally:
            proc.terminate()
            proc.wait()
    print(f"{args.files} files of {args.kib} KiB, local S3 server (moto), best of {args.repeats}")
    for side, (published, pulled) in best.items():
        print(f"  {side:14s} publish {published:7.2f} s   pull {pulled:7.2f} s")
    (pub_1, pull_1), (pub_n, pull_n) = best.values()
    print(f"  speed-up: publish {pub_1 / pub_n:.2f}x, pull {pull_1 / pull_n:.2f}x")


if __name__ == "__main__":
    main()
