"""`collapse run` when no Prefect API can be reached: one line, exit 2, nothing written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def _run(tmp_path: Path, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    clean.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(config)],
        capture_output=True,
        text=True,
        env=clean,
        cwd=tmp_path,
        timeout=300,
    )


def _errors(stderr: str) -> list[str]:
    # Prefect's own log lines may precede ours; the explanation is the one `collapse:` line
    return [line for line in stderr.splitlines() if line.startswith("collapse: error:")]


def test_prefect_api_url_with_no_server_is_one_line_and_exit_2(
    tmp_path: Path, tiny_config_file: Path
):
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/api"
        proc = _run(tmp_path, tiny_config_file, PREFECT_API_URL=url)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (message,) = _errors(proc.stderr)
    assert f"no Prefect server answers at PREFECT_API_URL={url}" in message
    assert "collapse ui" in message
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()


def test_an_ephemeral_server_that_does_not_start_is_one_line_and_exit_2(
    tmp_path: Path, tiny_config_file: Path
):
    # a startup timeout of 0 s: Prefect gives up before its first health check
    proc = _run(tmp_path, tiny_config_file, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (message,) = _errors(proc.stderr)
    assert "Prefect's temporary local server did not start (Timed out" in message
    assert "start `collapse ui` in another terminal so runs share one server" in message
    assert "PREFECT_API_URL" in message
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()
