"""Seeds derived from the run seed and a path of names, stable across processes and machines."""

from __future__ import annotations

import hashlib


def derive_seed(root: int, *parts: int | str) -> int:
    """A 63-bit seed from (root, *parts), e.g. derive_seed(42, "sample", 3, 17).

    Hash-based rather than `root + offset` so that nearby generations or shards never share
    streams, and so that adding a new consumer never shifts the seeds of existing ones.
    """
    text = "/".join(str(p) for p in (root, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1
