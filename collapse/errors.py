"""The one base of every error a user can fix."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file, a full disk, a run in use.

    The CLI prints its message as one `collapse: error: ...` line and exits with code 2,
    without a traceback; finished work stays valid. Every such error derives from this class,
    so the CLI needs no list of them.
    """


def cause_text(exc: BaseException) -> str:
    """`Type: message` of the root cause of `exc`, on one line (at most ~300 characters).

    Libraries like `datasets` wrap the real error in one whose own message says only that "an
    error occurred"; what went wrong is in its cause.
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def logger_silenced(name: str) -> Iterator[None]:
    """Drop what logger `name` and its children log inside the block, for libraries that log
    an error they also raise (`datasets` logs every file it fails to parse): the caller reports
    it once, in its own words."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.CRITICAL + 1)  # children without a level of their own inherit it
    try:
        yield
    finally:
        logger.setLevel(before)
