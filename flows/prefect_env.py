"""Prefect settings for the CLI, applied to the environment before prefect is imported."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

UI_STATE = "ui-server.json"


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
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
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
