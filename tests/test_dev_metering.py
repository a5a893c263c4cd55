"""`make run` with METERING_INTERVAL_S=5: a local VPS accumulates CPU, memory, bandwidth and storage,
visible through GET /agents/{id}/usage (the dev stack as an operator runs it, nothing mocked)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="slopbox-dev-meter-"))
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


def _wait_for(proc: subprocess.Popen[bytes], out: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in out.read_text():
        assert proc.poll() is None, out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.2)


def test_local_vps_usage_accumulates_under_make_run(tmp_path: Path, data_dir: Path) -> None:
    ports = {name: str(free_port()) for name in ("API_PORT", "PROXY_PORT", "FORWARD_PROXY_PORT", "TEMPORAL_PORT",
                                                  "TEMPORAL_UI_PORT", "EMBEDDED_POSTGRES_PORT")}
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(ports, SLOPBOX_DATA_DIR=str(data_dir), SLOPBOX_GATEWAY="simulator", METERING_INTERVAL_S="5")
    out = tmp_path / "dev.out"
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "dev"], cwd=ROOT, env=env, stdout=out.open("w"),
                            stderr=subprocess.STDOUT)
    try:
        _wait_for(proc, out, "Slopbox is up.", 120)
        text = out.read_text()
        user_id = next(line.split()[3] for line in text.splitlines() if "Demo user id" in line)
        key = next(line.split()[2] for line in text.splitlines() if "API key" in line)
        auth = {"Authorization": f"Bearer {key}", "X-User-Id": user_id}
        api = f"http://127.0.0.1:{ports['API_PORT']}"
        plans = httpx.get(f"{api}/plans", headers=auth).json()
        config = next(c["id"] for p in plans if p["name"] == "starter" for c in p["vps_configs"]
                      if c["provider"] == "local")
        agent = httpx.post(f"{api}/agents", json={"name": "metered"}, headers=auth).json()["id"]
        assert httpx.post(f"{api}/agents/{agent}/vps", json={"vps_config_id": config},
                          headers=auth).status_code == 202
        deadline = time.monotonic() + 180
        while (vps := httpx.get(f"{api}/agents/{agent}", headers=auth).json()["vps"])["state"] != "running":
            assert vps["state"] != "error" and time.monotonic() < deadline, vps
            time.sleep(0.5)

        # Traffic through the gateway proxy (the proxies count bandwidth), signed in as the demo user.
        token = secrets.token_urlsafe(24)
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{ports['EMBEDDED_POSTGRES_PORT']}/slopbox",
                             autocommit=True) as conn:
            conn.execute('INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (%s, %s, %s)',
                         (user_id, datetime.now(UTC) + timedelta(hours=1), token))
        proxied = httpx.get(f"http://127.0.0.1:{ports['PROXY_PORT']}/agents/{agent}/gateway/",
                            cookies={"authjs.session-token": token})
        assert proxied.status_code == 200, proxied.text

        deadline = time.monotonic() + 120
        while True:
            usage = httpx.get(f"{api}/agents/{agent}/usage", headers=auth)
            assert usage.status_code == 200, usage.text
            res = usage.json()["resources"]
            if all(res[r]["agent_used"] > 0 for r in ("cpu_ms", "memory_mb_seconds", "storage_bytes",
                                                       "bandwidth_bytes")):
                break
            assert time.monotonic() < deadline, usage.json()
            time.sleep(1)
        body = usage.json()
        assert body["daily"] and body["daily"][-1]["cpu_ms"] > 0 and body["collected_until"] is not None
        # The schedules exist in Temporal (the UI lists them): MeteringCycle runs every 5 s.
        listed = subprocess.run([str(Path(sys.executable).with_name("temporal")), "schedule", "list", "--address",
                                 f"127.0.0.1:{ports['TEMPORAL_PORT']}"], capture_output=True, text=True, timeout=30)
        assert "slopbox-metering" in listed.stdout and "slopbox-close-month" in listed.stdout, listed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, out.read_text()
