"""Prefect settings for the CLI, applied to the environment before prefect is imported."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

UI_STATE = "ui-server.json"
START_LOCK = "server-start.lock"
SHARE_HINT = (
    "start `collapse ui` in another terminal so runs share one server, "
    "or set PREFECT_API_URL to a running Prefect server"
)


class PrefectUnreachable(Exception):
    """No Prefect API answers for this run; the message says what to do."""


def prefect_home() -> Path:
    """PREFECT_HOME: the environment's, else `.prefect` in the working directory (git-ignored)."""
    return Path(os.environ.get("PREFECT_HOME") or Path.cwd() / ".prefect").resolve()


def server_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect server answers at `api_url` (…/api)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def running_ui_api_url(home: Path) -> str | None:
    """The API URL of a `collapse ui` server started over this PREFECT_HOME, if it is up."""
    state = home / UI_STATE
    try:
        url = json.loads(state.read_text())["api_url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if server_healthy(url) else None


def configure() -> str | None:
    """Point Prefect at the project's home; use a running `collapse ui` server when there is one.

    Returns:
        The API URL in use, or None for Prefect's ephemeral in-process server.
    """
    home = prefect_home()  # made when a server needs it (`connect`): a refusal leaves none
    os.environ["PREFECT_HOME"] = str(home)
    # No network here and none wanted: never phone home.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "storage"))
    if not os.environ.get("PREFECT_API_URL"):
        url = running_ui_api_url(home)
        if url:
            os.environ["PREFECT_API_URL"] = url
    return os.environ.get("PREFECT_API_URL")


@contextlib.contextmanager
def server_start_lock(home: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock that lets one Prefect server at a time start over `home`'s database.

    Servers started at once over one SQLite database race each other's migrations (one fails
    and restarts), and an ephemeral server draws its port at random and binds it only after its
    migrations: two drawn together end with one run's client talking to the other run's server,
    which stops when that run ends ("All connection attempts failed"). Started one at a time,
    each finds the ports of those started before it taken.

    Args:
        home: the PREFECT_HOME whose database the server uses.
        on_wait: called with a message when another process holds the lock.
    """
    with open(home / START_LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"waiting for another process to start its Prefect server over {home}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def connect(on_wait: Callable[[str], None] | None = None) -> str:
    """Make sure this process reaches a Prefect API; start the ephemeral server if none is set.

    Call after `configure()` and before prefect is imported. With PREFECT_API_URL set, checks
    that the server answers; without, uses a `collapse ui` server that came up meanwhile, else
    starts Prefect's temporary local server (under `server_start_lock`), which the run's flows
    then use for the rest of the process.

    Args:
        on_wait: called with a message while another process is starting its server.

    Returns:
        The API URL in use.

    Raises:
        PrefectUnreachable: no server answers, or the temporary one did not start.
    """
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url:
        if not server_healthy(api_url, timeout=10):
            raise PrefectUnreachable(
                f"no Prefect server answers at PREFECT_API_URL={api_url}: start it, or unset "
                "PREFECT_API_URL to use a temporary local one, or start `collapse ui` in "
                "another terminal and unset PREFECT_API_URL"
            )
        return api_url
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with server_start_lock(home, on_wait):
        url = running_ui_api_url(home)  # a `collapse ui` may have come up while we waited
        if url:
            os.environ["PREFECT_API_URL"] = url  # prefect is not imported yet: it reads this
            return url
        import httpx
        from prefect.client.orchestration import get_client

        try:
            # The first client of the process starts the ephemeral server; the flows reuse it.
            with get_client(sync_client=True) as client:
                error = client.api_healthcheck()
                url = str(client.api_url)
        except (RuntimeError, OSError, httpx.HTTPError) as exc:
            error = exc
    if error is not None:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise PrefectUnreachable(
            f"Prefect's temporary local server did not start ({reason}): {SHARE_HINT}"
        )
    return url
