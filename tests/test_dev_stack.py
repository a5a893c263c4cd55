"""`slopbox dev` as an operator runs it: everything comes up, SIGTERM leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_dev_stack_starts_serves_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: str(free_port()) for name in ("API_PORT", "PROXY_PORT", "FORWARD_PROXY_PORT", "TEMPORAL_PORT",
                                                  "TEMPORAL_UI_PORT", "EMBEDDED_POSTGRES_PORT")}
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(ports, SLOPBOX_DATA_DIR=str(tmp_path / "data"))
    out = (tmp_path / "dev.out").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "dev"], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Slopbox is up." not in (tmp_path / "dev.out").read_text():
            assert proc.poll() is None, (tmp_path / "dev.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "dev.out").read_text()
            time.sleep(0.2)
        text = (tmp_path / "dev.out").read_text()
        user_id = next(line.split()[3] for line in text.splitlines() if "Demo user id" in line)
        key = next(line.split()[2] for line in text.splitlines() if "API key" in line)
        api = f"http://127.0.0.1:{ports['API_PORT']}"
        assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{api}/readyz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ports['TEMPORAL_UI_PORT']}/").status_code == 200
        me = httpx.get(f"{api}/users/me", headers={"Authorization": f"Bearer {key}", "X-User-Id": user_id})
        assert me.status_code == 200 and me.json()["email"] == "demo@slopbox.local"
        created = httpx.post(f"{api}/agents", json={"name": "dev"},
                             headers={"Authorization": f"Bearer {key}", "X-User-Id": user_id})
        assert created.status_code == 201
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4  # postgres, temporal, worker, api, proxy (+ their helpers)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, (tmp_path / "dev.out").read_text()
    assert "stopped." in (tmp_path / "dev.out").read_text()
    leftovers = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []
    # The data outlives the stack: a second start finds the same database and demo user.
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").exists()
    assert (tmp_path / "data" / "temporal.db").exists()
