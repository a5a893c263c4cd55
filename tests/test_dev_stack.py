"""`slopbox dev` as an operator runs it: everything comes up, SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """SLOPBOX_DATA_DIR outside pytest's basetemp: a concurrent pytest session resets the mode of
    /tmp/pytest-of-<user> to 0700, which locks the embedded PostgreSQL's own user out of its data."""
    path = Path(tempfile.mkdtemp(prefix="slopbox-dev-test-"))
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


def test_dev_stack_starts_serves_and_stops_cleanly(tmp_path: Path, data_dir: Path) -> None:
    ports = {name: str(free_port()) for name in ("API_PORT", "PROXY_PORT", "FORWARD_PROXY_PORT", "TEMPORAL_PORT",
                                                  "TEMPORAL_UI_PORT", "EMBEDDED_POSTGRES_PORT",
                                                  "SLOPBOX_MAIL_SINK_PORT", "WEB_PORT")}
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(ports, SLOPBOX_DATA_DIR=str(data_dir), SLOPBOX_GATEWAY="simulator")  # the supervisor, not the gateway
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
        banner = text.split("Slopbox is up.", 1)[1].strip().splitlines()
        web = f"http://127.0.0.1:{ports['WEB_PORT']}"
        assert banner[0].split()[:3] == ["Web", "app", web]  # the first thing a person opens
        landing = httpx.get(f"{web}/")
        assert landing.status_code == 200 and "Sign up" in landing.text
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
    assert (data_dir / "postgres" / "PG_VERSION").exists()
    assert (data_dir / "temporal.db").exists()


def _start(tmp_path: Path, env: dict[str, str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
    out_path = tmp_path / f"{name}.out"
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "dev"], cwd=ROOT, env=env,
                            stdout=out_path.open("w"), stderr=subprocess.STDOUT)
    _wait_for(proc, out_path, "Slopbox is up.", 120)
    return proc, out_path


def _wait_for(proc: subprocess.Popen[bytes], out_path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in out_path.read_text():
        assert proc.poll() is None, out_path.read_text()
        assert time.monotonic() < deadline, out_path.read_text()
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes], out_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode == 0, out_path.read_text()


def test_dev_stack_restarts_a_crashed_worker_and_brings_local_vms_back(tmp_path: Path, data_dir: Path) -> None:
    ports = {name: str(free_port()) for name in ("API_PORT", "PROXY_PORT", "FORWARD_PROXY_PORT", "TEMPORAL_PORT",
                                                  "TEMPORAL_UI_PORT", "EMBEDDED_POSTGRES_PORT",
                                                  "SLOPBOX_MAIL_SINK_PORT", "WEB_PORT")}
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(ports, SLOPBOX_DATA_DIR=str(data_dir), SLOPBOX_GATEWAY="simulator")  # the supervisor, not the gateway
    api = f"http://127.0.0.1:{ports['API_PORT']}"
    proc, out = _start(tmp_path, env, "first")
    try:
        text = out.read_text()
        user_id = next(line.split()[3] for line in text.splitlines() if "Demo user id" in line)
        key = next(line.split()[2] for line in text.splitlines() if "API key" in line)
        auth = {"Authorization": f"Bearer {key}", "X-User-Id": user_id}

        worker = next(p for p in psutil.Process(proc.pid).children() if p.cmdline()[-1:] == ["worker"])
        worker.kill()
        _wait_for(proc, out, "worker exited with code -9; restarting in 1s", 30)
        assert httpx.get(f"{api}/healthz").status_code == 200  # the rest of the stack keeps serving
        _wait_for(proc, out, "worker restarted", 30)
        for log in ("dev.log", "worker.log"):
            assert "worker exited with code -9; restarting in 1s" in (data_dir / "logs" / log).read_text()

        plans = httpx.get(f"{api}/plans", headers=auth).json()
        config = next(c["id"] for p in plans if p["name"] == "starter" for c in p["vps_configs"])
        agent = httpx.post(f"{api}/agents", json={"name": "crashy"}, headers=auth).json()["id"]
        resp = httpx.post(f"{api}/agents/{agent}/vps", json={"vps_config_id": config}, headers=auth)
        assert resp.status_code == 202, resp.text
        vps = _wait_vps(api, auth, agent)
        assert vps["state"] == "running", vps
        pid_file = data_dir / "vms" / vps["id"] / "gateway.pid"
        gateway = psutil.Process(json.loads(pid_file.read_text())["pid"])
    finally:
        _stop(proc, out)
    assert not gateway.is_running() or gateway.status() == psutil.STATUS_ZOMBIE  # nothing left behind

    # `make run` again: the VPS still says running, and it is: its gateway is back.
    proc, out = _start(tmp_path, env, "second")
    try:
        assert "local VMs: 1 running" in out.read_text()
        vps = httpx.get(f"{api}/agents/{agent}", headers=auth).json()["vps"]
        assert vps["state"] == "running", vps
        relaunched = psutil.Process(json.loads(pid_file.read_text())["pid"])
        assert relaunched.is_running() and relaunched.pid != gateway.pid
        port = json.loads((pid_file.parent / "vm.json").read_text())["port"]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        children = psutil.Process(proc.pid).children(recursive=True)
        # Infrastructure is not restarted: Temporal dying stops the whole stack, with a message.
        temporal = next(p for p in psutil.Process(proc.pid).children() if "start-dev" in p.cmdline())
        temporal.kill()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            _stop(proc, out)
    assert proc.returncode == 1
    assert "error: Temporal exited with code -9; stopping the stack" in out.read_text()
    assert "stopped." in out.read_text()
    leftovers = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []
    assert not relaunched.is_running() or relaunched.status() == psutil.STATUS_ZOMBIE


def test_supervised_child_restarts_with_backoff(tmp_path: Path) -> None:
    """A child that keeps exiting waits 1, 2, 4 ... 30 s between restarts; a minute up resets that."""
    from cli.dev import Service

    service = Service("flaky", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path, dict(os.environ))
    service.start()
    assert service.proc is not None
    service.proc.wait(30)
    events = []
    now = 1000.0
    service.started_at = now
    for _ in range(7):
        events.append(service.tick(now))
        assert service.restart_at is not None
        now = service.restart_at
        events.append(service.tick(now))
        assert service.proc is not None
        service.proc.wait(30)
        service.started_at = now
    assert [e for e in events if "exited" in (e or "")] == [
        f"flaky exited with code 3; restarting in {d}s" for d in (1, 2, 4, 8, 16, 30, 30)]
    assert all(e is not None and e.startswith("flaky restarted (pid ") for e in events[1::2])
    service.started_at = now - 61  # it stayed up a while before this exit
    assert service.tick(now) == "flaky exited with code 3; restarting in 1s"
    service.stop()


def _wait_vps(api: str, auth: dict[str, str], agent: str, timeout: float = 180) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        vps = httpx.get(f"{api}/agents/{agent}", headers=auth).json()["vps"]
        if vps and vps["state"] in ("running", "error") and not vps.get("operation_id"):
            return vps  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, vps
        time.sleep(0.5)
