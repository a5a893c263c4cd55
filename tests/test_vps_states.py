"""Recoverable states (issue 8 #2, #3, #6, #7): `error` is no dead end, no VM outlives the knowledge
of it, every state write is a compare-and-set, failures are on the API, deterministic errors fail fast."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from activities.vps import VpsActivities
from db.encryption import configure_keys
from db.engine import make_engine
from db.models import Vps
from settings import Settings
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, Stack, operation_handle, running_stack
from workflows.contracts import (
    FinishInput,
    LifecycleTimeouts,
    OperationKind,
    OperationStatus,
    ReconcileInput,
    ReconcileReport,
)
from workflows.lifecycle import Reconcile

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def stack(settings: Settings, temporal_client: Client, db: str) -> AsyncIterator[Stack]:
    async with running_stack(settings, temporal_client) as s:
        yield s


async def reconcile(stack: Stack, name: str) -> ReconcileReport:
    return await stack.client.execute_workflow(  # type: ignore[no-any-return]
        Reconcile.run, ReconcileInput(), id=f"reconcile-{name}-{time.monotonic_ns()}",
        task_queue=stack.settings.temporal_task_queue, result_type=ReconcileReport)


async def running(stack: Stack, sql: psycopg.Connection, plan: str = "starter") -> tuple[Any, str, dict[str, Any]]:
    user = make_user(sql, plan=plan)
    agent = await stack.new_agent(user)
    assert (await stack.provision(user, agent)).status_code == 202
    vps = await stack.wait_vps(user, agent, "running", "error")
    assert vps["state"] == "running", vps["last_error"]
    return user, agent, vps


def fail_vps(sql: psycopg.Connection, vps_id: str, why: str = "stop failed: provider said no") -> None:
    """What a failed start/stop/destroy leaves: `error`, with the VM possibly still there."""
    sql.execute("UPDATE vpses SET state = 'error', last_error = %s WHERE id = %s", (why, vps_id))


async def test_error_vps_with_a_live_vm_blocks_a_new_one_and_counts_against_the_plan(
        stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, vps = await running(stack, sql)  # starter: max_vpses = 2
    fail_vps(sql, vps["id"])
    again = await stack.provision(user, agent)
    assert again.status_code == 409 and again.json()["vps_state"] == "error", again.text
    assert "destroy it first" in again.json()["detail"]
    second = await stack.new_agent(user, "second")
    assert (await stack.provision(user, second)).status_code == 202
    third = await stack.new_agent(user, "third")
    over = await stack.provision(user, third)
    assert over.status_code == 403 and over.json()["limit"] == "max_vpses", over.text
    assert over.json()["current"] == 2  # the error VPS counts: its VM may still be billed
    assert sql.execute("SELECT count(*) FROM vpses").fetchone() == (2,)
    await stack.wait_vps(user, second, "running", "error")
    await stack.api.delete(f"/agents/{second}/vps", headers=headers(user))
    await stack.wait_vps(user, second, "destroyed")
    managed = await stack.activities.provider("local").list_managed()
    assert [vm.vps_id for vm in managed] == [vps["id"]]  # the VM is still known, and still ours
    # Destroy works from error and removes the VM; then the agent can start over.
    assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
    await stack.wait_vps(user, agent, "destroyed")
    assert await stack.activities.provider("local").list_managed() == []
    assert (await stack.provision(user, agent)).status_code == 202
    await stack.wait_vps(user, agent, "running", "error")
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_reconcile_converges_error_from_what_the_provider_reports(stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, vps = await running(stack, sql)
    fail_vps(sql, vps["id"])
    report = await reconcile(stack, "error-running")
    assert any(vps["id"] in line and "error -> running" in line for line in report.drift_fixed), report
    now = (await stack.agent(user, agent))["vps"]
    assert now["state"] == "running" and now["last_error"] is None and now["observed_state"] == "running"

    local = stack.activities.provider("local")
    ref = sql.execute("SELECT provider_ref FROM vpses").fetchone()[0]  # type: ignore[index]
    await local.stop(ref)
    fail_vps(sql, vps["id"], "start failed: something")
    report = await reconcile(stack, "error-stopped")
    assert any("error -> stopped" in line for line in report.drift_fixed), report
    assert (await stack.agent(user, agent))["vps"]["state"] == "stopped"

    # Start works from error, not only from stopped.
    fail_vps(sql, vps["id"], "stop failed: whatever")
    resp = await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
    assert resp.status_code == 202, resp.text
    started = await stack.wait_vps(user, agent, "running", "error")
    assert started["state"] == "running", started["last_error"]
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_needs_cleanup_vm_is_removed_by_reconcile_and_the_flag_cleared(
        stack: Stack, sql: psycopg.Connection) -> None:
    """A failed compensation or destroy flags the VPS (no error-message string matching any more)."""
    user, agent, vps = await running(stack, sql)
    sql.execute("UPDATE vpses SET state = 'error', needs_cleanup = true, last_error = 'destroy failed: x' "
                "WHERE id = %s", (vps["id"],))
    report = await reconcile(stack, "cleanup")
    assert report.cleaned_up == [vps["id"]], report
    assert await stack.activities.provider("local").list_managed() == []
    row = sql.execute("SELECT state, needs_cleanup, observed_state FROM vpses").fetchone()
    assert row == ("error", False, "deleted")
    assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
    assert (await stack.wait_vps(user, agent, "destroyed"))["state"] == "destroyed"


async def test_reconcile_never_overwrites_a_state_it_read_before_it_changed(
        stack: Stack, sql: psycopg.Connection) -> None:
    """Reconcile read `running`, then the VPS was destroyed: its write must not land on the destroyed row."""
    user, agent, vps = await running(stack, sql)
    async with stack.activities.sessions() as s:
        stale = await s.get(Vps, vps["id"])
    assert stale is not None and stale.state == "running"
    assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
    await stack.wait_vps(user, agent, "destroyed")
    report = ReconcileReport()
    await stack.activities._converge(stale, stack.activities.provider("local"), [], stale.created_at,  # type: ignore[arg-type]
                                     ReconcileInput(), report)
    assert report.drift_fixed == []
    assert sql.execute("SELECT state, last_error FROM vpses").fetchone() == ("destroyed", None)


async def test_reconcile_leaves_a_vps_alone_while_an_operation_runs(stack: Stack, sql: psycopg.Connection,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOPBOX_SIM_READY_AFTER_S", "4")
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    assert (await stack.provision(user, agent)).status_code == 202
    deadline = time.monotonic() + 30
    while (await stack.agent(user, agent))["vps"]["step"] != "wait_gateway_ready":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    sql.execute("UPDATE vpses SET created_at = now() - interval '1 day'")  # old enough to look stuck
    report = await reconcile(stack, "busy")
    assert report.stuck_failed == [] and report.checked == 0, report
    assert (await stack.wait_vps(user, agent, "running", "error"))["state"] == "running"
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


def gateway_pid(stack: Stack, vps: dict[str, Any]) -> int:
    """The local VM's gateway process group (the whole "VM" of the local provider)."""
    return int(json.loads((stack.settings.data_dir / "vms" / vps["id"] / "gateway.pid").read_text())["pid"])


async def push_settings(stack: Stack, user: Any, agent: str, soul: str) -> tuple[dict[str, Any], list[int], float]:
    """PATCH a settings file and poll the operation like the web app does: (operation, attempts, seconds)."""
    started = time.monotonic()
    resp = await stack.api.patch(f"/agents/{agent}/settings", json={"files": {"SOUL.md": soul}}, headers=headers(user))
    assert resp.status_code == 202, resp.text
    op_url = resp.json()["status_url"]
    deadline = time.monotonic() + 150
    while (op := (await stack.api.get(op_url, headers=headers(user))).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, op
        await asyncio.sleep(0.2)
    handle = stack.client.get_workflow_handle(resp.json()["operation_id"])
    attempts = [e.activity_task_started_event_attributes.attempt async for e in handle.fetch_history_events()
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED]
    return op, attempts, time.monotonic() - started


async def test_a_failed_settings_push_is_visible_on_the_api(stack: Stack, sql: psycopg.Connection) -> None:
    """Issue 8 #6: it used to show `running`, `last_error: null`, the failure only in the workflow result.
    The gateway's VM died: the provider says so, and the push fails on that at once, not after
    waiting a gateway start (FAST: 30 s) for a gateway that cannot come back by itself."""
    user, agent, vps = await running(stack, sql)
    before = await stack.agent(user, agent)
    assert before["settings"]["in_sync"] is True
    os.killpg(gateway_pid(stack, vps), signal.SIGKILL)  # the gateway dies; the VPS row still says running
    op, attempts, _ = await push_settings(stack, user, agent, "lost?")
    assert op["status"] == "failed" and op["error"].startswith("settings not applied:"), op
    assert "the gateway's VM is not running: the local VM's state is error (the gateway process exited" \
        in op["error"], op
    assert attempts == [1, 1], attempts  # push_config once (final), then the outcome recorded
    after = await stack.agent(user, agent)
    assert after["vps"]["last_operation"]["id"] == op["id"]
    assert after["vps"]["last_operation"]["status"] == "failed"
    assert after["settings"] == {"saved_version": before["settings"]["saved_version"] + 1,
                                 "applied_version": before["settings"]["saved_version"], "in_sync": False}
    assert after["vps"]["state"] == "running"  # a config push never changes the lifecycle state
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_a_gateway_that_does_not_answer_on_a_running_vm(stack: Stack, sql: psycopg.Connection) -> None:
    """A running VM whose gateway does not answer may be restarting (a config change, systemd bringing
    it back): the push waits for it, applies once it answers, and only fails, once, after a gateway
    start's budget (FAST: 30 s). SIGSTOP freezes the gateway: its process and its listening socket
    stay, so the provider says running, as for a gateway that hangs or restarts on a live VM."""
    user, agent, vps = await running(stack, sql)
    pid = gateway_pid(stack, vps)
    os.killpg(pid, signal.SIGSTOP)
    try:
        thawed = asyncio.get_running_loop().call_later(4, os.killpg, pid, signal.SIGCONT)
        op, attempts, took = await push_settings(stack, user, agent, "patient")
        assert op["status"] == "succeeded", op  # waited out the 4 s freeze (the VM watch saw it running)
        assert took > 4 and attempts == [1, 1], (took, attempts)
        assert (await stack.agent(user, agent))["settings"]["in_sync"] is True
        thawed.cancel()

        os.killpg(pid, signal.SIGSTOP)  # now for longer than the budget
        op, attempts, took = await push_settings(stack, user, agent, "too late")
        assert op["status"] == "failed", op
        assert "the gateway did not answer within 30s" in op["error"], op
        assert attempts == [1, 1] and took >= 30, (attempts, took)  # once, not once per attempt
        assert (await stack.agent(user, agent))["settings"]["in_sync"] is False
    finally:
        os.killpg(pid, signal.SIGCONT)
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_deterministic_failures_are_not_retried_and_every_run_has_a_timeout(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOPBOX_SIM_NEVER_READY", "1")
    short = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 2})
    async with running_stack(settings, temporal_client, timeouts=short) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        op = (await stack.provision(user, agent)).json()
        vps = await stack.wait_vps(user, agent, "error", "running")
        assert vps["state"] == "error" and "did not become ready" in vps["last_error"]
        handle = stack.client.get_workflow_handle(op["operation_id"])
        attempts = [e.activity_task_started_event_attributes.attempt async for e in handle.fetch_history_events()
                    if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED]
        scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name
                     async for e in handle.fetch_history_events()
                     if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
        waits = [a for name, a in zip(scheduled, attempts, strict=True) if name == "vps.wait_gateway_ready"]
        assert waits == [1], (scheduled, attempts)  # GatewayNotReady is final: no second 2 s wait
        desc = await handle.describe()
        assert desc.raw_description.execution_config.workflow_execution_timeout.seconds == int(short.operation_s)
        entity = await stack.client.get_workflow_handle(f"vps-{vps['id']}").describe()
        assert entity.workflow_type == "Vps"
        assert entity.raw_description.execution_config.workflow_run_timeout.seconds == 7 * 24 * 3600


async def test_a_gateway_that_dies_while_booting_fails_the_provision_at_once(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for `/readyz` asks the provider too: a gateway that dies before it is ready fails the
    provision with the provider's reason in seconds, not after the whole readiness budget (30 s here,
    180 s in production) of polling a port nobody listens on."""
    monkeypatch.setenv("SLOPBOX_SIM_READY_AFTER_S", "120")  # alive, listening, not ready
    async with running_stack(settings, temporal_client) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        op = (await stack.provision(user, agent)).json()
        handle = await operation_handle(stack.client, op["operation_id"])  # the entity starts it a moment later
        deadline = time.monotonic() + 60
        while True:  # the VM is up and the provision is polling its /readyz
            assert time.monotonic() < deadline, "the provision never reached wait_gateway_ready"
            vps = (await stack.agent(user, agent))["vps"]
            pending = (await handle.describe()).raw_description.pending_activities
            if vps and (stack.settings.data_dir / "vms" / vps["id"] / "gateway.pid").exists() and \
                    any(p.activity_type.name == "vps.wait_gateway_ready" for p in pending):
                break
            await asyncio.sleep(0.1)
        os.killpg(gateway_pid(stack, vps), signal.SIGKILL)
        vps = await stack.wait_vps(user, agent, "error", "running", timeout=60)
        assert vps["state"] == "error", vps
        assert "the gateway's VM is not running: the local VM's state is error (the gateway process exited" \
            in vps["last_error"], vps  # not "did not become ready within 30s": the provider's answer


async def test_a_page_never_shows_a_vps_between_its_state_and_its_operation(
        api: httpx.AsyncClient, settings: Settings, sql: psycopg.Connection) -> None:
    """An operation's end writes the VPS's state and the operation's row in one transaction; a read of
    the agent must see both before it or both after it. CI once read a push that was powering off a
    weakened gateway as `running` with no operation in flight: the VPS row read before the push's end
    committed, its operations read after."""
    user, admin = make_user(sql), make_user(sql)
    sql.execute("UPDATE users SET is_admin = true WHERE id = %s", (admin,))
    config = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
    vps = sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, 'local', "
                      "'running') RETURNING id", (user, config)).fetchone()[0]  # type: ignore[index]
    agent = sql.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) VALUES "
                        "(%s, 'molty', %s, 'abcd', %s) RETURNING id",
                        (user, configure_keys(settings.secret_keys()).encrypt("t"), vps)).fetchone()[0]  # type: ignore[index]
    push = f"settings-{vps}-race"
    sql.execute("INSERT INTO vps_operations (id, vps_id, user_id, kind, status, step) "
                "VALUES (%s, %s, %s, 'settings', 'running', 'stop_vm_weakened')", (push, vps, user))
    engine = make_engine(settings)
    try:
        async with engine.connect() as worker_db:
            # Hold the operations table, so each read below stops after it has read the VPS row ...
            await worker_db.execute(text("LOCK TABLE vps_operations IN ACCESS EXCLUSIVE MODE"))
            one = asyncio.create_task(api.get(f"/agents/{agent}", headers=headers(user)))
            page = asyncio.create_task(api.get("/agents", headers=headers(user)))
            listing = asyncio.create_task(api.get("/admin/vpses", headers=headers(admin)))
            deadline = time.monotonic() + 10
            while sql.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                              "AND datname = current_database()").fetchone()[0] < 3:  # type: ignore[index]
                assert time.monotonic() < deadline and not any(t.done() for t in (one, page, listing)), "no wait"
                await asyncio.sleep(0.02)
            # ... and the push ends meanwhile, through the worker's own bookkeeping (committed with the unlock).
            sessions = async_sessionmaker(bind=worker_db, class_=AsyncSession, expire_on_commit=False,
                                          join_transaction_mode="create_savepoint")
            await VpsActivities(settings, sessions).finish_operation(FinishInput(
                vps_id=str(vps), user_id=str(user), operation=OperationKind.settings, operation_id=push,
                status=OperationStatus.failed, error="settings not applied: lockdown; the VM was stopped",
                state="error", expect=["running"], last_error="settings not applied: lockdown; the VM was stopped"))
            await worker_db.commit()
            seen = [(await one).json()["vps"], (await page).json()["items"][0]["vps"]]
            admin_view = (await listing).json()["items"][0]
    finally:
        await engine.dispose()
    for view in seen:
        before = view["state"] == "running" and view["operation_id"] == push and view["last_operation"] is None
        after = (view["state"] == "error" and view["operation_id"] is None
                 and view["last_operation"]["id"] == push and view["last_operation"]["status"] == "failed")
        assert before or after, (view["state"], view["operation_id"], view["last_operation"])
    assert (admin_view["state"], admin_view["operation_id"]) in (("running", push), ("error", None)), admin_view
