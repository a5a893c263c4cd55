"""`make run` (`slopbox dev`): the demo of issue 10 for enforcement and notifications.

The demo user's local VPS runs; usage over the starter plan is written into `vps_usage_periods` (what
the collectors accumulate); one `EnforceUsage` run on the stack's own Temporal and worker stops the
VPS and notifies the user, in the API and by email to the stack's local SMTP sink (logs/mail.log);
raising the budget lets them start again. Also: the sink on its own, over real SMTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from billing.plans import month_start
from db.models import Notification
from notifications.email import build_message, send
from notifications.sink import LoggingHandler, serve
from settings import Settings
from tests.conftest import free_port
from workflows.contracts import EnforceUsageInput, EnforceUsageResult

ROOT = Path(__file__).resolve().parent.parent
HOUR_MS = 3_600_000


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Outside pytest's basetemp (see tests/test_dev_stack.py for why)."""
    path = Path(tempfile.mkdtemp(prefix="slopbox-dev-enf-"))
    yield path / "data"
    shutil.rmtree(path, ignore_errors=True)


def _wait(check: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()  # type: ignore[operator]
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def _vps(api: str, auth: dict[str, str], agent: str, *states: str) -> dict[str, object] | None:
    vps = httpx.get(f"{api}/agents/{agent}", headers=auth).json()["vps"]
    return vps if vps and vps["state"] in states and not vps.get("operation_id") else None  # type: ignore[no-any-return]


def test_dev_stack_stops_an_over_budget_user_once_and_mails_the_sink(tmp_path: Path, data_dir: Path) -> None:
    ports = {name: str(free_port()) for name in ("API_PORT", "PROXY_PORT", "FORWARD_PROXY_PORT", "TEMPORAL_PORT",
                                                  "TEMPORAL_UI_PORT", "EMBEDDED_POSTGRES_PORT",
                                                  "SLOPBOX_MAIL_SINK_PORT")}
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(ports, SLOPBOX_DATA_DIR=str(data_dir), SLOPBOX_GATEWAY="simulator")
    out_path = tmp_path / "dev.out"
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "dev"], cwd=ROOT, env=env,
                            stdout=out_path.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait(lambda: proc.poll() is None and "Slopbox is up." in out_path.read_text() or proc.poll() is not None,
              120, "the stack never came up")
        text = out_path.read_text()
        assert proc.poll() is None, text
        assert f"Mail sink     smtp://127.0.0.1:{ports['SLOPBOX_MAIL_SINK_PORT']}" in text
        user_id = next(line.split()[3] for line in text.splitlines() if "Demo user id" in line)
        key = next(line.split()[2] for line in text.splitlines() if "API key" in line)
        auth = {"Authorization": f"Bearer {key}", "X-User-Id": user_id}
        api = f"http://127.0.0.1:{ports['API_PORT']}"

        plans = httpx.get(f"{api}/plans", headers=auth).json()
        config = next(c["id"] for p in plans if p["name"] == "starter" for c in p["vps_configs"]
                      if c["provider"] == "local")
        agent = httpx.post(f"{api}/agents", json={"name": "greedy"}, headers=auth).json()["id"]
        assert httpx.post(f"{api}/agents/{agent}/vps", json={"vps_config_id": config},
                          headers=auth).status_code == 202
        vps = _wait(lambda: _vps(api, auth, agent, "running", "error"), 120, "provisioning never settled")
        assert vps["state"] == "running", vps  # type: ignore[index]

        db = f"postgresql://postgres@127.0.0.1:{ports['EMBEDDED_POSTGRES_PORT']}/slopbox"
        with psycopg.connect(db, autocommit=True) as sql:
            max_cpu = sql.execute("SELECT max_cpu_ms FROM plans WHERE name = 'starter'").fetchone()[0]  # type: ignore[index]
            sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, cpu_ms) VALUES (%s, %s, %s)",
                        (vps["id"], month_start(), max_cpu + 10 * HOUR_MS))  # type: ignore[index]  # 30 cents over

        async def enforce_twice() -> list[EnforceUsageResult]:
            client = await Client.connect(f"127.0.0.1:{ports['TEMPORAL_PORT']}",
                                          data_converter=pydantic_data_converter)
            inp = EnforceUsageInput(period_start=month_start(), user_ids=[])
            return [await client.execute_workflow("EnforceUsage", inp, id=f"enforce-demo-{i}-{uuid.uuid4().hex[:6]}",
                                                  task_queue="slopbox", result_type=EnforceUsageResult)
                    for i in range(2)]

        first, second = asyncio.run(enforce_twice())
        assert [o.outcome for o in first.stops] == ["submitted"]
        # The second run sees the stop still on its way (the same operation) or already done (nothing to stop).
        assert [o.outcome for o in second.stops] in ([], ["known"])
        vps = _wait(lambda: _vps(api, auth, agent, "stopped", "error"), 60, "the stop never settled")
        assert vps["state"] == "stopped", vps  # type: ignore[index]
        with psycopg.connect(db, autocommit=True) as sql:
            assert sql.execute("SELECT count(*) FROM vps_operations WHERE kind = 'stop'").fetchone() == (1,)

        notes = httpx.get(f"{api}/users/me/notifications", headers=auth).json()
        assert {n["kind"] for n in notes["items"]} == {"overage_stop", "usage_warning"}
        mail_log = data_dir / "logs" / "mail.log"
        mails = _wait(lambda: [json.loads(line) for line in mail_log.read_text().splitlines()
                               if '"mail received"' in line] if mail_log.exists() else [], 30, "no mail in the sink")
        subjects = sorted(m["subject"] for m in mails)  # type: ignore[union-attr]
        assert len(subjects) == 2 and any("stopped" in s for s in subjects), subjects
        assert all(m["rcpt_to"] == ["demo@slopbox.local"] for m in mails)  # type: ignore[union-attr]

        refused = httpx.post(f"{api}/agents/{agent}/vps/start", headers=auth)
        assert refused.status_code == 402 and refused.json()["required_budget_cents"] == 30
        assert httpx.put(f"{api}/users/me/overage-budget", json={"budget_cents": 30}, headers=auth).status_code == 200
        assert httpx.post(f"{api}/agents/{agent}/vps/start", headers=auth).status_code == 202
        vps = _wait(lambda: _vps(api, auth, agent, "running", "error"), 60, "the start never settled")
        assert vps["state"] == "running", vps  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, out_path.read_text()


async def test_the_sink_accepts_and_logs_real_smtp(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    handler = LoggingHandler()
    server = await serve("127.0.0.1", port, handler)
    settings = Settings(smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=False, database_url=None)
    note = Notification(id=uuid.uuid4(), user_id=uuid.uuid4(), kind="info", title="Hello", body="It works.")
    try:
        with caplog.at_level("INFO", logger="mail"):
            await send(settings, build_message(settings, "someone@example.com", note))
    finally:
        server.close()
        await server.wait_closed()
    assert [(m["rcpt_to"], m["subject"]) for m in handler.received] == [(["someone@example.com"], "[Slopbox] Hello")]
    assert "It works." in handler.received[0]["body"]
    assert any(r.getMessage() == "mail received" for r in caplog.records)


def test_the_image_ships_the_notifications_package_and_compose_passes_smtp() -> None:
    import yaml

    assert "COPY notifications ./notifications" in (ROOT / "Dockerfile").read_text()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["x-slopbox"]["environment"]
    assert {"SMTP_HOST", "SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD", "SMTP_FROM", "SMTP_STARTTLS"} <= set(env)
    # Blank values (the compose defaults) parse as "no email", not as a bad configuration.
    blank = Settings(smtp_host="", smtp_user="", smtp_password="", database_url=None)
    assert blank.smtp_host is None and blank.smtp_user is None and blank.smtp_password is None


def test_cli_user_exempt_switches_the_exemption(database_url: str, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
        return subprocess.run([sys.executable, "-m", "cli.main", "user", "exempt", *args], cwd=ROOT, text=True,
                              env={**clean, "DATABASE_URL": database_url, "SLOPBOX_DATA_DIR": str(tmp_path)},
                              capture_output=True, timeout=60)

    email = f"vip-{uuid.uuid4().hex[:6]}@example.com"
    with psycopg.connect(database_url, autocommit=True) as sql:
        user_id = sql.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", (email,)).fetchone()[0]  # type: ignore[index]
        try:
            on = run("--email", email.upper())
            assert on.returncode == 0, on.stderr
            assert on.stdout.strip().splitlines()[-1] == str(user_id) and "exempt" in on.stdout
            assert sql.execute("SELECT usage_exempt FROM users WHERE id = %s", (user_id,)).fetchone() == (True,)
            off = run("--email", email, "--off")
            assert off.returncode == 0 and "no longer exempt" in off.stdout
            assert sql.execute("SELECT usage_exempt FROM users WHERE id = %s", (user_id,)).fetchone() == (False,)
            missing = run("--email", "nobody@example.com")
            assert missing.returncode == 1 and "no user with email nobody@example.com" in missing.stderr
        finally:
            sql.execute("DELETE FROM users WHERE id = %s", (user_id,))
