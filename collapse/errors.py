"""The one base of every error a user can fix."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file, a full disk, a run in use.

    The CLI prints its message as one `collapse: error: ...` line and exits with code 2,
    without a traceback; finished work stays valid. Every such error derives from this class,
    so the CLI needs no list of them.
    """
