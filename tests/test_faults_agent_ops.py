"""A worker SIGKILLed inside every step of the operations on a running agent.

The lifecycle's steps have their own matrix (tests/test_faults.py); these are the operations a user
starts from the dashboard while the agent runs: a settings push, connecting and removing a channel,
a restart. The worker holds each activity open after its body has run (tests/fault_worker.py), so
the gateway has already taken the change when the worker dies; a fresh worker retries the step and
must finish the operation as if nothing happened: the same answer on the API, the same config on
the gateway, nothing applied twice.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from settings import Settings
from tests.conftest import truncate_user_data
from tests.fault_harness import HeldWorkers
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, Stack, running_stack, stop_local_vms
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")

STEPS = {
    "settings": ["push_config"],
    "connect": ["configure_channel", "await_channel"],
    "disconnect": ["remove_channel"],
    "restart": ["restart_gateway", "wait_gateway_ready"],
}
CASES = [(op, step) for op, steps in STEPS.items() for step in steps]
TELEGRAM = "123456789:AAH" + "x" * 32
SOUL = "# Soul\nSurvive the crash.\n"
# A killed attempt is given up after the heartbeat timeout and retried on the fresh worker.
TIMEOUTS = LifecycleTimeouts(**{**FAST.model_dump(), "heartbeat_s": 5})


@dataclass
class Case:
    op: str
    step: str
    user: uuid.UUID
    agent: str
    vps_id: str | None = None
    operation_id: str | None = None
    problem: str | None = None
    outcome: dict[str, Any] | None = None
    channels: list[dict[str, Any]] | None = None
    config: dict[str, Any] | None = None
    soul: str | None = None


async def _poll(cases: list[Case], check: Callable[[Case], Any], timeout: float) -> None:
    """Call `check` on every pending case (gently: two cores) until each returns truthy or time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(cases)
    while pending and time.monotonic() < deadline:
        for case in list(pending):
            if await check(case):
                pending.remove(case)
        await asyncio.sleep(0.2)


async def _operation(stack: Stack, case: Case) -> dict[str, Any]:
    resp = await stack.api.get(f"/agents/{case.agent}/operations/{case.operation_id}", headers=headers(case.user))
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def _connect_telegram(stack: Stack, case: Case) -> Any:
    return await stack.api.post(f"/agents/{case.agent}/channels", headers=headers(case.user),
                                json={"kind": "telegram", "credentials": {"bot_token": TELEGRAM}})


async def _trigger(stack: Stack, case: Case) -> None:
    hdrs = headers(case.user)
    if case.op == "settings":
        resp = await stack.api.patch(f"/agents/{case.agent}/settings", headers=hdrs, json={"files": {"SOUL.md": SOUL}})
    elif case.op == "connect":
        resp = await _connect_telegram(stack, case)
    elif case.op == "disconnect":
        resp = await stack.api.delete(f"/agents/{case.agent}/channels/telegram", headers=hdrs)
    else:
        resp = await stack.api.post(f"/agents/{case.agent}/restart", headers=hdrs)
    if resp.status_code != 202:
        case.problem = f"{case.op} answered {resp.status_code}: {resp.text}"
    else:
        case.operation_id = resp.json()["operation_id"]


async def _finished(stack: Stack, case: Case) -> bool:
    outcome = await _operation(stack, case)
    if outcome["status"] in ("queued", "running"):
        return False
    case.outcome = outcome
    return True


async def _prepare(stack: Stack, cases: list[Case]) -> None:
    """Every case needs a running agent; the removals a connected channel too (on the holding worker,
    before any hold is armed)."""
    for case in cases:
        resp = await stack.provision(case.user, case.agent)
        if resp.status_code != 202:
            case.problem = f"set-up provision answered {resp.status_code}: {resp.text}"
    for case in [c for c in cases if c.problem is None]:
        vps = await stack.wait_vps(case.user, case.agent, "running", "error", timeout=120)
        if vps["state"] != "running":
            case.problem = f"set-up provisioning did not reach running: {vps}"
        case.vps_id = vps["id"]
    for case in [c for c in cases if c.op == "disconnect" and c.problem is None]:
        resp = await _connect_telegram(stack, case)
        case.operation_id = resp.json().get("operation_id")
        await _poll([case], lambda c: _finished(stack, c), 60)
        if case.outcome is None or case.outcome["status"] != "succeeded":
            case.problem = f"set-up channel connect did not succeed: {case.outcome}"
        case.outcome = case.operation_id = None


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def crashed(settings: Settings, temporal_env: WorkflowEnvironment, database_url: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("crash-agent-ops")
    s = settings.model_copy(update={"data_dir": work / "data", "temporal_task_queue": f"tq-ops-{uuid.uuid4().hex[:8]}"})
    cases: dict[tuple[str, str], Case] = {}
    with psycopg.connect(database_url, autocommit=True) as sql:
        async with running_stack(s, temporal_env.client, worker=False, timeouts=TIMEOUTS) as stack:
            try:
                with HeldWorkers(s, work) as workers:
                    for op, step in CASES:
                        user = make_user(sql, plan="starter")
                        cases[(op, step)] = Case(op, step, user, await stack.new_agent(user, f"{op}-{step}"[:60]))
                    await _prepare(stack, list(cases.values()))
                    live = [c for c in cases.values() if c.problem is None]
                    workers.arm({str(c.user): c.step for c in live})
                    for case in live:
                        await _trigger(stack, case)
                    live = [c for c in live if c.problem is None]

                    async def at_step(c: Case) -> bool:
                        return workers.held(c.user, c.step)

                    await _poll(live, at_step, 120)
                    for case in live:
                        if not workers.held(case.user, case.step):
                            seen = await _operation(stack, case)
                            case.problem = f"the {case.op} was never held inside {case.step}: {seen}"
                    workers.kill_and_replace()
                    await _poll([c for c in cases.values() if c.problem is None], lambda c: _finished(stack, c), 180)
                    for case in cases.values():
                        if case.problem is not None or case.vps_id is None:
                            continue
                        state = s.data_dir / "vms" / case.vps_id / "state"
                        case.config = json.loads((state / "openclaw.json").read_text())
                        soul = state / "workspace" / "SOUL.md"
                        case.soul = soul.read_text() if soul.exists() else None
                        case.channels = (await stack.api.get(f"/agents/{case.agent}/channels",
                                                             headers=headers(case.user))).json()["items"]
            finally:
                await stop_local_vms(s)
    truncate_user_data(database_url)
    yield cases, work


@pytest.mark.parametrize(("op", "step"), CASES, ids=[f"{op}-{step}" for op, step in CASES])
async def test_worker_killed_inside_agent_operation_step(crashed: Any, op: str, step: str) -> None:
    cases, logs = crashed
    case: Case = cases[(op, step)]
    assert case.problem is None, case.problem
    outcome = case.outcome
    assert outcome is not None, f"the {op} never finished after the crash in {step} (logs in {logs})"
    assert outcome["status"] == "succeeded" and outcome["error"] is None, outcome
    assert case.config is not None and case.channels is not None
    channels = case.config.get("channels") or {}
    if op == "settings":
        assert case.soul == SOUL
    elif op == "connect":
        assert channels["telegram"]["botToken"] == TELEGRAM
        assert [(c["kind"], c["status"]) for c in case.channels] == [("telegram", "configured")]
    elif op == "disconnect":
        assert "telegram" not in channels
        assert case.channels == []
    else:
        assert case.soul != SOUL and "telegram" not in channels  # a restart changes nothing else


async def test_worker_killed_while_a_whatsapp_qr_is_on_screen(settings: Settings, temporal_env: WorkflowEnvironment,
                                                              sql: psycopg.Connection, tmp_path: Path) -> None:
    """The pairing's activity runs for minutes, waiting for the phone: a worker lost meanwhile must not
    lose the pairing. The next worker starts the login again, the page gets a fresh code, and a scan
    of that code pairs."""
    import httpx

    from db.encryption import keyring
    from tests.test_agent_ops import wait_qr

    queue = f"tq-wa-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(update={"data_dir": tmp_path / "data", "temporal_task_queue": queue})
    env = {"SLOPBOX_SIM_WHATSAPP": "1", "SLOPBOX_SIM_QR_ROTATE_S": "600"}  # no rotation: a new code is the retry's
    async with running_stack(s, temporal_env.client, worker=False, timeouts=TIMEOUTS) as stack:
        try:
            with HeldWorkers(s, tmp_path, env=env) as workers:  # nothing armed: the pairing is long by itself
                user = make_user(sql, plan="starter")
                agent = await stack.new_agent(user)
                assert (await stack.provision(user, agent)).status_code == 202
                vps = await stack.wait_vps(user, agent, "running", "error", timeout=120)
                assert vps["state"] == "running", vps["last_error"]
                resp = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "whatsapp"},
                                            headers=headers(user))
                assert resp.status_code == 202, resp.text
                shown = await wait_qr(stack, user, agent)
                assert shown["status"] == "awaiting_scan", shown

                workers.kill_and_replace()
                deadline = time.monotonic() + 90
                fresh = shown
                while fresh["version"] <= shown["version"] and time.monotonic() < deadline:
                    fresh = await wait_qr(stack, user, agent, after=shown["version"])
                assert fresh["status"] == "awaiting_scan" and fresh["version"] > shown["version"], fresh
                assert fresh["qr_data_url"] != shown["qr_data_url"]

                token = sql.execute("SELECT gateway_token FROM agents WHERE id = %s", (agent,)).fetchone()[0]  # type: ignore[index]
                port = sql.execute("SELECT gateway_port FROM vpses WHERE id = %s", (vps["id"],)).fetchone()[0]  # type: ignore[index]
                async with httpx.AsyncClient() as http:  # the phone scans the code on screen (simulator hook)
                    scan = await http.post(f"http://127.0.0.1:{port}/__simulator__/whatsapp/scan",
                                           headers={"Authorization": f"Bearer {keyring().decrypt(token)}"})
                    assert scan.json() == {"ok": True}
                case = Case("whatsapp", "whatsapp_login", user, agent, operation_id=resp.json()["operation_id"])
                await _poll([case], lambda c: _finished(stack, c), 60)
                assert case.outcome is not None and case.outcome["status"] == "succeeded", case.outcome
                done = (await stack.api.get(f"/agents/{agent}/channels/whatsapp/qr", headers=headers(user))).json()
                assert done["status"] == "connected" and done["qr_data_url"] is None
        finally:
            await stop_local_vms(s)
