"""Usage enforcement end to end: usage written into `vps_usage_periods` (as the collectors do), the
`EnforceUsage` workflow on a real Temporal server, real local VMs (gateway processes) stopped through
their entity workflows, the API's start refusal and the budget that lifts it, the exemption, and a
worker SIGKILLed in the middle of the stop."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from temporalio.client import Client

from activities.enforcement import overage_operation_id
from billing.plans import month_start
from cli.users import set_usage_exempt
from db.engine import make_engine
from proxy.enforcement import UsageEnforcer
from proxy.metering import Meter
from settings import Settings
from tests.enforcement_harness import enforce, full_worker, mail_settings, plan_limits, until, write_usage
from tests.fault_harness import gateway_processes, start_worker, stop_process
from tests.helpers import headers, make_user
from tests.lifecycle_harness import Stack, running_stack, stop_local_vms

pytestmark = pytest.mark.asyncio(loop_scope="session")
HOUR_MS = 3_600_000


@asynccontextmanager
async def stack_for(settings: Settings, client: Client, tmp: Path, *, worker: bool = True) -> AsyncIterator[Stack]:
    s = mail_settings(settings, None).model_copy(update={"data_dir": tmp / "data"})
    async with running_stack(s, client, worker=False) as stack:
        try:
            if worker:
                async with full_worker(s, client):
                    yield stack
            else:
                yield stack
        finally:
            await stop_local_vms(s)


async def running_vps(stack: Stack, user: uuid.UUID) -> tuple[str, str]:
    agent = await stack.new_agent(user)
    resp = await stack.provision(user, agent)
    assert resp.status_code == 202, resp.text
    vps = await stack.wait_vps(user, agent, "running", "error", timeout=90)
    assert vps["state"] == "running", vps
    return agent, vps["id"]


def over_by_cents(sql: psycopg.Connection, vps_id: str, cents: int) -> None:
    """CPU over the starter plan by `cents` worth (3 cents per hour over)."""
    limits = plan_limits(sql, "starter")
    assert limits["cpu_rate"] == 3
    write_usage(sql, vps_id, cpu_ms=limits["cpu"] + cents * HOUR_MS // 3)


def stop_rows(sql: psycopg.Connection, vps_id: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in sql.execute(
        "SELECT id, status FROM vps_operations WHERE vps_id = %s AND kind = 'stop'", (vps_id,)).fetchall()]


async def runs_with_id(client: Client, workflow_id: str) -> int:
    return len([wf async for wf in client.list_workflows(f'WorkflowId = "{workflow_id}"')])


async def test_stops_exactly_once_when_the_schedule_fires_twice_and_the_budget_lifts_it(
        settings: Settings, temporal_client: Client, sql: psycopg.Connection, tmp_path: Path) -> None:
    user = make_user(sql, plan="starter")
    async with stack_for(settings, temporal_client, tmp_path) as stack:
        agent, vps_id = await running_vps(stack, user)
        over_by_cents(sql, vps_id, 30)  # 30 cents over, no budget
        op = overage_operation_id(user, month_start(), 0, vps_id)

        # The schedule fires twice at once, and once more while the stop runs.
        first, second = await asyncio.gather(enforce(temporal_client, stack.settings),
                                             enforce(temporal_client, stack.settings, [user]))
        third = await enforce(temporal_client, stack.settings, [user])
        outcomes = [o.outcome for r in (first, second, third) for o in r.stops]
        assert outcomes.count("submitted") == 1, outcomes
        assert set(outcomes) <= {"submitted", "known"}, outcomes
        vps = await stack.wait_vps(user, agent, "stopped", "error", timeout=60)
        assert vps["state"] == "stopped", vps
        assert stop_rows(sql, vps_id) == [(op, "succeeded")]
        assert await runs_with_id(temporal_client, op) == 1  # one StopVps run, never a second
        ops = (await stack.api.get(f"/agents/{agent}/operations", headers=headers(user))).json()["items"]
        assert [(o["id"], o["detail"]) for o in ops if o["kind"] == "stop"] == [(op, {"reason": "overage"})]
        await enforce(temporal_client, stack.settings, [user])  # and after it finished: nothing new
        assert stop_rows(sql, vps_id) == [(op, "succeeded")]
        assert not gateway_processes(stack.settings.data_dir / "vms")

        rows = sql.execute("SELECT decision, vps_ids, overage_cents, budget_cents FROM usage_enforcements "
                           "WHERE user_id = %s", (user,)).fetchall()
        assert rows == [("stop", [vps_id], 30, 0)]
        notices = sql.execute("SELECT kind, title, data FROM notifications WHERE user_id = %s ORDER BY kind",
                              (user,)).fetchall()
        assert [n[0] for n in notices] == ["overage_stop", "usage_warning"], notices
        assert notices[0][2]["required_budget_cents"] == 30 and notices[1][2]["threshold"] == 100
        listed = (await stack.api.get("/users/me/notifications", headers=headers(user))).json()
        assert listed["unread_count"] == 2

        # Starting again is refused with a body that says why and what budget would do.
        refused = await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
        assert refused.status_code == 402, refused.text
        problem = refused.json()
        assert problem["required_budget_cents"] == 30 and problem["overage_cents"] == 30
        assert "PUT /users/me/overage-budget" in problem["detail"] and "CPU time" in problem["detail"]
        too_low = await stack.api.put("/users/me/overage-budget", json={"budget_cents": 29}, headers=headers(user))
        assert too_low.status_code == 200
        assert (await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))).status_code == 402
        # A new VPS would be stopped at the next run too: provisioning is refused the same way, nothing made.
        other = await stack.new_agent(user, "second")
        new_vps = await stack.provision(user, other)
        assert new_vps.status_code == 402 and "Cannot provision" in new_vps.json()["detail"], new_vps.text
        assert (await stack.agent(user, other))["vps"] is None

        # Raising the budget to cover the cost makes the start allowed, and the next run leaves it running.
        assert (await stack.api.put("/users/me/overage-budget", json={"budget_cents": 30},
                                    headers=headers(user))).status_code == 200
        started = await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
        assert started.status_code == 202, started.text
        vps = await stack.wait_vps(user, agent, "running", "error", timeout=60)
        assert vps["state"] == "running", vps
        after = await enforce(temporal_client, stack.settings, [user])
        assert after.stops == [] and stop_rows(sql, vps_id) == [(op, "succeeded")]

        # Over the new budget (a new budget revision): stopped again, with a new operation.
        over_by_cents(sql, vps_id, 31)
        again = await enforce(temporal_client, stack.settings, [user])
        assert [o.outcome for o in again.stops] == ["submitted"]
        assert again.stops[0].operation_id != op
        vps = await stack.wait_vps(user, agent, "stopped", "error", timeout=60)
        assert vps["state"] == "stopped", vps
        assert len(stop_rows(sql, vps_id)) == 2
        assert sql.execute("SELECT count(*) FROM notifications WHERE user_id = %s AND kind = 'overage_stop'",
                           (user,)).fetchone() == (2,)


async def test_exempt_user_is_never_stopped_nor_refused(settings: Settings, temporal_client: Client,
                                                         sql: psycopg.Connection, tmp_path: Path) -> None:
    email = f"exempt-{uuid.uuid4().hex[:6]}@example.com"
    user = make_user(sql, plan="starter", email=email)
    async with stack_for(settings, temporal_client, tmp_path) as stack:
        agent, vps_id = await running_vps(stack, user)
        over_by_cents(sql, vps_id, 500)
        set_usage_exempt(stack.settings.sqlalchemy_url, email=email.upper(), exempt=True)
        assert (await stack.api.get("/users/me", headers=headers(user))).json()["usage_exempt"] is True
        for _ in range(2):
            result = await enforce(temporal_client, stack.settings, [user])
            assert [d.decision for d in result.decisions] == ["exempt"] and result.stops == []
        assert stop_rows(sql, vps_id) == []
        assert (await stack.agent(user, agent))["vps"]["state"] == "running"
        assert sql.execute("SELECT decision, vps_ids FROM usage_enforcements WHERE user_id = %s",
                           (user,)).fetchall() == [("exempt", [])]
        assert sql.execute("SELECT count(*) FROM notifications WHERE user_id = %s AND kind = 'overage_stop'",
                           (user,)).fetchone() == (0,)
        # The forward proxy's decision is the same one: exempt lets tunnels through.
        engine = make_engine(stack.settings)
        try:
            enforcer = UsageEnforcer(engine, Meter(engine), ttl_s=0.0)
            verdict = await enforcer.check(user)
            assert verdict.allowed and verdict.exempt and verdict.overage_cents == 500
            # The exemption ends: the proxy refuses, and the next run stops the VPS.
            set_usage_exempt(stack.settings.sqlalchemy_url, email=email, exempt=False)
            verdict = await enforcer.check(user)
            assert not verdict.allowed and "budget of 0 cents" in (verdict.reason or "")
        finally:
            await engine.dispose()
        result = await enforce(temporal_client, stack.settings, [user])
        assert [d.decision for d in result.decisions] == ["stop"]
        vps = await stack.wait_vps(user, agent, "stopped", "error", timeout=60)
        assert vps["state"] == "stopped"


async def test_under_the_limits_or_in_a_past_month_nothing_is_stopped(settings: Settings, temporal_client: Client,
                                                                      sql: psycopg.Connection,
                                                                      tmp_path: Path) -> None:
    user = make_user(sql, plan="starter")
    async with stack_for(settings, temporal_client, tmp_path) as stack:
        agent, vps_id = await running_vps(stack, user)
        limits = plan_limits(sql, "starter")
        write_usage(sql, vps_id, cpu_ms=limits["cpu"])  # exactly at the limit: 100% warning, no overage
        result = await enforce(temporal_client, stack.settings, [user])
        assert [(d.decision, d.warnings) for d in result.decisions] == [("ok", 1)]
        last_month = (month_start() - timedelta(days=1)).replace(day=1)
        write_usage(sql, vps_id, cpu_ms=limits["cpu"] * 10, period=last_month)
        result = await enforce(temporal_client, stack.settings, [user], period=last_month)
        assert [d.decision for d in result.decisions] == ["past-period"] and result.stops == []
        assert stop_rows(sql, vps_id) == []
        assert (await stack.agent(user, agent))["vps"]["state"] == "running"
        assert (await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))).status_code == 409  # running


async def test_worker_killed_mid_stop_still_stops_exactly_once(settings: Settings, temporal_client: Client,
                                                               sql: psycopg.Connection, tmp_path: Path) -> None:
    """The stop's `stop_vm` activity has done its work and is held open; the worker gets SIGKILL;
    the schedule fires again meanwhile; a fresh worker finishes. One stop, one StopVps run."""
    user = make_user(sql, plan="starter")
    hold = tmp_path / "hold.json"
    hold.write_text("{}")
    first: subprocess.Popen[bytes] | None = None
    second: subprocess.Popen[bytes] | None = None
    async with stack_for(settings, temporal_client, tmp_path, worker=False) as stack:
        s = stack.settings
        try:
            first = start_worker(s, tmp_path / "worker1.log", hold_file=hold)
            agent, vps_id = await running_vps(stack, user)
            over_by_cents(sql, vps_id, 10)
            op = overage_operation_id(user, month_start(), 0, vps_id)
            hold.write_text(json.dumps({str(user): "stop_vm"}))
            result = await enforce(temporal_client, s, [user])
            assert [o.outcome for o in result.stops] == ["submitted"]
            marker = tmp_path / "held" / str(user)
            await until(lambda: marker.exists() and marker.read_text() == "stop_vm", 60, "stop held in stop_vm")
            first.send_signal(signal.SIGKILL)
            first.wait()
            # The schedule fires again while no worker runs: the run waits for a worker like everything else.
            again = asyncio.create_task(enforce(temporal_client, s, [user]))
            second = start_worker(s, tmp_path / "worker2.log")
            repeat = await asyncio.wait_for(again, 120)
            assert [o.outcome for o in repeat.stops] in (["known"], [])  # still on its way, or done
            vps = await stack.wait_vps(user, agent, "stopped", "error", timeout=120)
            assert vps["state"] == "stopped", (vps, (tmp_path / "worker2.log").read_text()[-3000:])
            assert stop_rows(sql, vps_id) == [(op, "succeeded")]
            assert await runs_with_id(temporal_client, op) == 1
            assert not gateway_processes(s.data_dir / "vms")
            assert sql.execute("SELECT count(*) FROM notifications WHERE user_id = %s AND kind = 'overage_stop'",
                               (user,)).fetchone() == (1,)
            assert sql.execute("SELECT count(*) FROM usage_enforcements WHERE user_id = %s",
                               (user,)).fetchone() == (1,)
        finally:
            stop_process(first)
            stop_process(second)


async def test_a_stop_that_ran_is_never_submitted_again_after_the_entity_forgot_it(
        settings: Settings, temporal_client: Client, sql: psycopg.Connection, tmp_path: Path) -> None:
    """The entity answers repeats only while it remembers them (it idles out after an hour). A run that
    still sees the VPS running (a stale read) must find the operation's row and not stop it twice."""
    user = make_user(sql, plan="starter")
    async with stack_for(settings, temporal_client, tmp_path) as stack:
        agent, vps_id = await running_vps(stack, user)
        over_by_cents(sql, vps_id, 5)
        op = overage_operation_id(user, month_start(), 0, vps_id)
        await enforce(temporal_client, stack.settings, [user])
        assert (await stack.wait_vps(user, agent, "stopped", "error", timeout=60))["state"] == "stopped"
        await temporal_client.get_workflow_handle(f"vps-{vps_id}").terminate("the entity idled out")
        sql.execute("UPDATE vpses SET state = 'running' WHERE id = %s", (vps_id,))  # what a stale read saw
        result = await enforce(temporal_client, stack.settings, [user])
        assert [(o.operation_id, o.outcome) for o in result.stops] == [(op, "known")]
        assert await runs_with_id(temporal_client, op) == 1
        assert stop_rows(sql, vps_id) == [(op, "succeeded")]
