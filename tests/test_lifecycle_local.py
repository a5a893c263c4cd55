"""VM lifecycle end to end with the local provider: API -> Temporal -> activities -> gateway process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from temporalio.client import Client

from orchestration.search_attributes import VPS_ID
from settings import Settings
from tests.fault_harness import gateway_processes
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, Stack, operation_outcome, running_stack
from workflows.contracts import LifecycleTimeouts, ReconcileInput, ReconcileReport
from workflows.lifecycle import Reconcile

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def stack(settings: Settings, temporal_client: Client, db: str) -> AsyncIterator[Stack]:
    async with running_stack(settings, temporal_client) as s:
        yield s


def vm_dirs(settings: Settings) -> list[Path]:
    root = settings.data_dir / "vms"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def gateway_pid(settings: Settings, vps_id: str) -> int | None:
    pid_file = settings.data_dir / "vms" / vps_id / "gateway.pid"
    if not pid_file.exists():
        return None
    return int(json.loads(pid_file.read_text())["pid"])


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


async def test_provision_stop_start_destroy(stack: Stack, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    resp = await stack.provision(user, agent)
    assert resp.status_code == 202, resp.text
    op = resp.json()
    assert op["operation"] == "ProvisionVps" and op["operation_id"].startswith("provision-")

    vps = await stack.wait_vps(user, agent, "running", "error")
    assert vps["state"] == "running", vps["last_error"]
    assert vps["provider"] == "local" and vps["step"] is None and vps["last_error"] is None
    vps_id = vps["id"]
    pid = gateway_pid(stack.settings, vps_id)
    assert alive(pid)
    # The agent's egress goes through our forward proxy, authenticated as agent_id:gateway_token.
    gateway_env = json.loads((stack.settings.data_dir / "vms" / vps_id / "env.json").read_text())
    proxy_url = gateway_env.get("OPENCLAW_PROXY_URL") or gateway_env.get("env", {}).get("OPENCLAW_PROXY_URL")
    assert proxy_url.startswith(f"http://{agent}:") and proxy_url.endswith(
        f"@127.0.0.1:{stack.settings.forward_proxy_port}")

    # The run is findable in Temporal by its search attributes.
    handle = stack.client.get_workflow_handle(op["operation_id"])
    desc = await handle.describe()
    assert desc.typed_search_attributes.get(VPS_ID) == vps_id
    assert await handle.query("step") == "done"

    # The gateway token never appears in the workflow history.
    history = (await handle.fetch_history()).to_json()
    token = sql.execute("SELECT gateway_token FROM agents WHERE id = %s", (agent,)).fetchone()
    from db.encryption import keyring
    assert keyring().decrypt(token[0]) not in history  # type: ignore[index]

    resp = await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))
    assert resp.status_code == 202, resp.text
    assert (await stack.wait_vps(user, agent, "stopped"))["state"] == "stopped"
    assert not alive(pid)

    resp = await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
    assert resp.status_code == 202, resp.text
    assert (await stack.wait_vps(user, agent, "running"))["state"] == "running"
    assert alive(gateway_pid(stack.settings, vps_id))

    resp = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    assert resp.status_code == 202, resp.text
    assert (await stack.wait_vps(user, agent, "destroyed"))["state"] == "destroyed"
    assert not (stack.settings.data_dir / "vms" / vps_id).exists()
    # The final collection ran before the VM went: storage is the allocation accrued for the minutes the
    # VPS existed (never the whole month's), the gateway process's CPU and memory are in.
    usage = sql.execute("SELECT storage_bytes, cpu_ms, memory_mb_seconds FROM vps_usage_periods WHERE vps_id = %s",
                        (vps_id,)).fetchall()
    assert len(usage) == 1, usage
    storage, cpu, memory = usage[0]
    assert 0 < storage < 5 * 1024**3 // 1000, usage  # minutes of a month: well under a thousandth of it
    assert cpu > 0 and memory > 0, usage

    # Destroying twice is fine; the agent can then get a new VPS.
    again = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    assert again.status_code == 200 and again.json()["state"] == "destroyed"
    resp = await stack.provision(user, agent)
    assert resp.status_code == 202
    assert (await stack.wait_vps(user, agent, "running", "error"))["state"] == "running"
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_idempotency_key_returns_the_same_operation(stack: Stack, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    first = await stack.provision(user, agent, **{"Idempotency-Key": "create-1"})
    second = await stack.provision(user, agent, **{"Idempotency-Key": "create-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["operation_id"] == second.json()["operation_id"]
    assert first.json()["vps_id"] == second.json()["vps_id"]
    assert sql.execute("SELECT count(*) FROM vpses").fetchone() == (1,)
    await stack.wait_vps(user, agent, "running", "error")
    stop1 = await stack.api.post(f"/agents/{agent}/vps/stop", headers={**headers(user), "Idempotency-Key": "s"})
    stop2 = await stack.api.post(f"/agents/{agent}/vps/stop", headers={**headers(user), "Idempotency-Key": "s"})
    assert stop1.status_code == stop2.status_code == 202
    assert stop1.json()["operation_id"] == stop2.json()["operation_id"]
    await stack.wait_vps(user, agent, "stopped")
    # Replayed after the operation finished and another ran (issue 8 #5: this was a 500): the original.
    start = await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
    assert start.status_code == 202, start.text
    await stack.wait_vps(user, agent, "running")
    stop3 = await stack.api.post(f"/agents/{agent}/vps/stop", headers={**headers(user), "Idempotency-Key": "s"})
    assert stop3.status_code == 202, stop3.text
    assert stop3.json()["operation_id"] == stop1.json()["operation_id"] and stop3.json()["status"] == "succeeded"
    assert (await stack.agent(user, agent))["vps"]["state"] == "running"  # nothing ran again
    # The same key on another route is a clear 409, not a second operation.
    other = await stack.api.post(f"/agents/{agent}/restart", headers={**headers(user), "Idempotency-Key": "s"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["title"], other.text
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")
    # Replaying the key answers with the original operation and creates nothing...
    replay = await stack.provision(user, agent, **{"Idempotency-Key": "create-1"})
    assert replay.status_code == 202 and replay.json()["operation_id"] == first.json()["operation_id"]
    assert replay.json()["status"] == "succeeded"
    assert sql.execute("SELECT count(*) FROM vpses").fetchone() == (1,)
    # ...even once the agent has moved on to another VPS: still the original, nothing new.
    assert (await stack.provision(user, agent)).status_code == 202
    await stack.wait_vps(user, agent, "running", "error")
    reused = await stack.provision(user, agent, **{"Idempotency-Key": "create-1"})
    assert reused.status_code == 202 and reused.json()["operation_id"] == first.json()["operation_id"]
    assert sql.execute("SELECT count(*) FROM vpses").fetchone() == (2,)
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_operations_during_provisioning_conflict_or_queue(stack: Stack, sql: psycopg.Connection,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop/start during a provision are 409 naming it; settings and destroy queue behind it, in order,
    and the destroy cancels the provision (the settings, saved, then wait for the next start)."""
    monkeypatch.setenv("SLOPBOX_SIM_READY_AFTER_S", "3")  # a gateway that takes a while to boot
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    op = (await stack.provision(user, agent)).json()
    resp = await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))
    assert resp.status_code == 409, resp.text
    assert resp.json().get("running_operation_id") == op["operation_id"], resp.text
    assert resp.json()["running_operation"] == "ProvisionVps" and "ProvisionVps" in resp.json()["detail"]
    again = await stack.provision(user, agent)
    assert again.status_code == 409 and again.json()["vps_state"] == "provisioning"
    settings = await stack.api.patch(f"/agents/{agent}/settings", json={"files": {"SOUL.md": "queued"}},
                                     headers=headers(user))
    assert settings.status_code == 202, settings.text
    destroy = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    assert destroy.status_code == 202, destroy.text
    twice = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    assert twice.json()["operation_id"] == destroy.json()["operation_id"]  # one destroy is enough
    assert (await stack.agent(user, agent))["vps"]["operation_id"] == op["operation_id"]
    await stack.wait_vps(user, agent, "destroyed")
    ops = (await stack.api.get(f"/agents/{agent}/operations", headers=headers(user))).json()["items"]
    ran = [(o["operation"], o["status"]) for o in sorted(ops, key=lambda o: o["finished_at"])]
    assert ran == [("ProvisionVps", "cancelled"), ("PushConfig", "succeeded"), ("DestroyVps", "succeeded")]
    pushed = next(o for o in ops if o["operation"] == "PushConfig")
    assert pushed["error"] == ("the agent is not running (its VPS is error); the settings are applied at the "
                               "next start"), pushed


async def test_gateway_that_never_gets_ready_leaves_no_vm(settings: Settings, temporal_client: Client, db: str,
                                                         sql: psycopg.Connection,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOPBOX_SIM_NEVER_READY", "1")
    short = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 3})
    async with running_stack(settings, temporal_client, timeouts=short) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent)).status_code == 202
        vps = await stack.wait_vps(user, agent, "error", "running")
    assert vps["state"] == "error"
    assert "gateway did not become ready within 3s" in vps["last_error"]
    assert not (settings.data_dir / "vms" / vps["id"]).exists()  # compensated: nothing left behind


async def test_a_destroy_cancels_a_provision_that_is_still_waiting(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway never gets ready and the budget is ten minutes: the user destroys the VPS instead of
    waiting. The provision stops inside its wait (the cancel reaches the activity with a heartbeat),
    removes its VM and ends `cancelled`; the destroy follows, long before the budget is spent."""
    monkeypatch.setenv("SLOPBOX_SIM_NEVER_READY", "1")
    patient = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 600})
    async with running_stack(settings, temporal_client, timeouts=patient) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        provision = (await stack.provision(user, agent)).json()
        deadline = time.monotonic() + 60
        while (await stack.agent(user, agent))["vps"]["step"] != "wait_gateway_ready":
            assert time.monotonic() < deadline, await stack.agent(user, agent)
            await asyncio.sleep(0.1)
        destroy = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        assert destroy.status_code == 202, destroy.text
        vps = await stack.wait_vps(user, agent, "destroyed", timeout=120)
        listed = await stack.api.get(f"/agents/{agent}/operations", headers=headers(user))
        ops = {o["id"]: o for o in listed.json()["items"]}
        assert ops[provision["operation_id"]]["status"] == "cancelled", ops
        assert ops[provision["operation_id"]]["error"] == "provisioning was cancelled", ops
        assert ops[destroy.json()["operation_id"]]["status"] == "succeeded", ops
    assert not (settings.data_dir / "vms" / vps["id"]).exists()
    assert not gateway_processes(settings.data_dir / "vms").get(vps["id"])


async def test_a_destroy_cancels_a_start_that_is_still_waiting(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection) -> None:
    """The same for a start whose gateway never gets ready: the start ends `cancelled`, the VPS is destroyed."""
    patient = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 600})
    async with running_stack(settings, temporal_client, timeouts=patient) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent)).status_code == 202
        assert (await stack.wait_vps(user, agent, "running", "error"))["state"] == "running"
        assert (await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))).status_code == 202
        vps = await stack.wait_vps(user, agent, "stopped")
        # The gateway the start launches never gets ready (the VM's environment, kept on its disk).
        env_file = settings.data_dir / "vms" / vps["id"] / "env.json"
        env_file.write_text(json.dumps({**json.loads(env_file.read_text()), "SLOPBOX_SIM_NEVER_READY": "1"}))
        start = await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
        assert start.status_code == 202, start.text
        deadline = time.monotonic() + 60
        while (await stack.agent(user, agent))["vps"]["step"] != "wait_gateway_ready":
            assert time.monotonic() < deadline, (await stack.agent(user, agent))["vps"]
            await asyncio.sleep(0.1)
        page = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        assert page.status_code == 202, page.text
        vps = await stack.wait_vps(user, agent, "destroyed", timeout=120)
        started = (await stack.api.get(start.json()["status_url"], headers=headers(user))).json()
        assert (started["status"], started["error"]) == ("cancelled", "the start was cancelled"), started
    assert not (settings.data_dir / "vms" / vps["id"]).exists()
    assert not gateway_processes(settings.data_dir / "vms").get(vps["id"])


async def test_cancel_a_provision_through_the_api(settings: Settings, temporal_client: Client, db: str,
                                                   sql: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST .../operations/{op}/cancel: a running provision stops and ends `cancelled` (VPS `error`, no VM);
    a settings push queued behind it is not cancellable (409); a finished one is 409; another user's 404."""
    monkeypatch.setenv("SLOPBOX_SIM_NEVER_READY", "1")
    patient = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 600})
    async with running_stack(settings, temporal_client, timeouts=patient) as stack:
        user, other = make_user(sql, plan="starter"), make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        provision = (await stack.provision(user, agent)).json()
        push = await stack.api.patch(f"/agents/{agent}/settings", json={"files": {"SOUL.md": "x"}},
                                     headers=headers(user))
        assert push.status_code == 202, push.text
        url = f"/agents/{agent}/operations/{provision['operation_id']}/cancel"
        assert (await stack.api.post(url, headers=headers(other))).status_code == 404
        refused = await stack.api.post(f"/agents/{agent}/operations/{push.json()['operation_id']}/cancel",
                                       headers=headers(user))
        assert refused.status_code == 409 and refused.json()["title"] == "Not cancellable", refused.text
        accepted = await stack.api.post(url, headers=headers(user))
        assert accepted.status_code == 202, accepted.text
        assert accepted.json() == {"operation_id": provision["operation_id"], "status": "cancelling",
                                   "status_url": f"/agents/{agent}/operations/{provision['operation_id']}"}
        vps = await stack.wait_vps(user, agent, "error", "running", timeout=120)
        assert vps["state"] == "error" and vps["last_error"] == "provisioning was cancelled", vps
        done = (await stack.api.get(accepted.json()["status_url"], headers=headers(user))).json()
        assert done["status"] == "cancelled", done
        late = await stack.api.post(url, headers=headers(user))
        assert late.status_code == 409 and late.json()["title"] == "Operation finished", late.text
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")
    assert not gateway_processes(settings.data_dir / "vms").get(vps["id"])


async def test_plan_limits_on_vpses(stack: Stack, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="free")  # one VPS, hetzner and local configs only
    agent = await stack.new_agent(user)
    fly_config = str(sql.execute("SELECT id FROM vps_configs WHERE provider = 'fly'").fetchone()[0])  # type: ignore[index]
    resp = await stack.api.post(f"/agents/{agent}/vps", json={"vps_config_id": fly_config}, headers=headers(user))
    assert resp.status_code == 403 and resp.json()["limit"] == "vps_config"
    assert "free" in resp.json()["detail"]
    resp = await stack.api.post(f"/agents/{agent}/vps", json={"vps_config_id": "nope"}, headers=headers(user))
    assert resp.status_code == 422
    assert sql.execute("SELECT count(*) FROM vpses").fetchone() == (0,)

    starter = make_user(sql, plan="starter")  # max_vpses = 2
    agents = [await stack.new_agent(starter, f"a{i}") for i in range(3)]
    for a in agents[:2]:
        assert (await stack.provision(starter, a)).status_code == 202
    resp = await stack.provision(starter, agents[2])
    assert resp.status_code == 403, resp.text
    assert resp.json()["limit"] == "max_vpses" and resp.json()["max"] == 2
    for a in agents[:2]:
        await stack.wait_vps(starter, a, "running", "error")
        await stack.api.delete(f"/agents/{a}/vps", headers=headers(starter))
        await stack.wait_vps(starter, a, "destroyed")
    # Destroyed VPSes no longer count.
    assert (await stack.provision(starter, agents[2])).status_code == 202
    await stack.wait_vps(starter, agents[2], "running", "error")
    await stack.api.delete(f"/agents/{agents[2]}/vps", headers=headers(starter))
    await stack.wait_vps(starter, agents[2], "destroyed")


async def test_other_users_vps_is_invisible(stack: Stack, sql: psycopg.Connection) -> None:
    alice, bob = make_user(sql), make_user(sql)
    agent = await stack.new_agent(alice)
    for method, path in [("POST", f"/agents/{agent}/vps/stop"), ("POST", f"/agents/{agent}/vps/start"),
                         ("DELETE", f"/agents/{agent}/vps")]:
        resp = await stack.api.request(method, path, headers=headers(bob))
        assert resp.status_code == 404
    resp = await stack.provision(bob, agent)
    assert resp.status_code == 404
    resp = await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(alice))
    assert resp.status_code == 404 and "no VPS" in resp.json()["detail"]


async def test_reconcile_repairs_drift_and_removes_orphans(stack: Stack, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    await stack.provision(user, agent)
    vps = await stack.wait_vps(user, agent, "running")
    # Drift: the gateway process dies behind our back.
    pid = gateway_pid(stack.settings, vps["id"])
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    await asyncio.sleep(0.3)
    # Orphan: a VM carrying our label that no VPS row knows about.
    from openclaw.render import AgentRenderInput, render_local_files
    from providers import VmSpec

    local = stack.activities.provider("local")
    files = render_local_files(AgentRenderInput(agent_id="stray", agent_name="stray", bind="loopback",
                                                hooks_enabled=False, control_plane_public_url="http://127.0.0.1:1"))
    orphan = await local.create(VmSpec(vps_id="00000000-0000-4000-8000-00000000dead", agent_id="x", user_id="y",
                                       files=files, secret_env={"OPENCLAW_GATEWAY_TOKEN": "t" * 64}))  # type: ignore[dict-item]
    report = await stack.client.execute_workflow(
        Reconcile.run, ReconcileInput(orphan_grace_s=0), id=f"reconcile-test-{agent}",
        task_queue=stack.settings.temporal_task_queue, result_type=ReconcileReport)
    assert f"local:{orphan.provider_ref}" in report.orphans_destroyed
    assert any(vps["id"] in line and "running -> stopped" in line for line in report.drift_fixed), report
    assert await local.get(orphan.provider_ref) is None
    after = await stack.wait_vps(user, agent, "stopped")
    assert "outside Slopbox" in after["last_error"]
    # The user can start it again.
    assert (await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))).status_code == 202
    assert (await stack.wait_vps(user, agent, "running"))["state"] == "running"
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_start_reasserts_the_lockdown(stack: Stack, sql: psycopg.Connection) -> None:
    """A config weakened on the VM's disk while it was stopped is locked down again on start."""
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    await stack.provision(user, agent)
    vps = await stack.wait_vps(user, agent, "running")
    await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))
    await stack.wait_vps(user, agent, "stopped")
    config_file = stack.settings.data_dir / "vms" / vps["id"] / "state" / "openclaw.json"
    config = json.loads(config_file.read_text())
    config["agents"]["defaults"]["sandbox"]["mode"] = "off"
    config["tools"]["elevated"]["enabled"] = True
    # Nested keys the rendered sections do not have: a merge patch of the rendered sections kept them.
    config["agents"]["entries"]["main"] = {"sandbox": {"mode": "off", "docker": {"binds": ["/:/host"]}}}
    config["gateway"]["controlUi"]["dangerouslyAllowHostHeaderOriginFallback"] = True
    config["plugins"] = {"entries": {"admin-http-rpc": {"enabled": True}, "memory-core": {"enabled": True}}}
    config_file.write_text(json.dumps(config))
    await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
    vps = await stack.wait_vps(user, agent, "running", "error")
    assert vps["state"] == "running", vps["last_error"]
    healed = json.loads(config_file.read_text())
    assert healed["agents"]["defaults"]["sandbox"]["mode"] == "all"
    assert healed["tools"]["elevated"]["enabled"] is False
    assert healed["agents"]["entries"]["main"] == {}
    assert "dangerouslyAllowHostHeaderOriginFallback" not in healed["gateway"]["controlUi"]
    assert all("enabled" not in entry for entry in healed["plugins"]["entries"].values())
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_a_lockdown_the_push_cannot_restore_fails_the_operation(stack: Stack, sql: psycopg.Connection,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A gateway that keeps a forbidden key whatever the patch says (simulated: every write re-adds
    it) answers the push with success; the read-back catches it and the start fails, for good."""
    monkeypatch.setenv("SLOPBOX_SIM_STICKY_CONFIG", json.dumps({"plugins": {"entries": {"evil": {"enabled": True}}}}))
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    await stack.provision(user, agent)
    vps = await stack.wait_vps(user, agent, "running", "error")
    assert vps["state"] == "running", vps["last_error"]  # nothing written yet: the rendered file is clean
    await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))
    await stack.wait_vps(user, agent, "stopped")
    config_file = stack.settings.data_dir / "vms" / vps["id"] / "state" / "openclaw.json"
    config = json.loads(config_file.read_text())
    config["agents"]["entries"]["main"] = {"sandbox": {"mode": "off"}}  # makes the push write
    config_file.write_text(json.dumps(config))
    with caplog.at_level("ERROR", logger="activities.gateway"):
        resp = await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
        assert resp.status_code == 202, resp.text
        vps = await stack.wait_vps(user, agent, "running", "error")
    assert vps["state"] == "error"
    last = vps["last_operation"]
    assert last["status"] == "failed" and last["id"] == resp.json()["operation_id"]
    assert "LockdownViolation" in last["error"] or "still weakens the lockdown" in last["error"], last
    assert "plugins.entries.evil.enabled" in last["error"]
    assert any("lockdown violation" in r.getMessage() and "plugins.entries.evil.enabled" in r.getMessage()
               for r in caplog.records)
    # The tampering the gateway did accept is gone; only the key it keeps remains, and the weakened
    # gateway does not go on running: the VM was powered off.
    assert json.loads(config_file.read_text())["agents"]["entries"]["main"] == {}
    assert "the VM was stopped" in last["error"], last
    info = await stack.activities.provider("local").get(sql.execute("SELECT provider_ref FROM vpses").fetchone()[0])  # type: ignore[index]
    assert info is not None and info.state == "stopped"
    assert vps["observed_state"] == "stopped"
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_a_settings_push_that_cannot_hold_the_lockdown_powers_the_agent_off(
        stack: Stack, sql: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same gateway, caught by a settings push on a running agent: it does not keep running weakened."""
    monkeypatch.setenv("SLOPBOX_SIM_STICKY_CONFIG", json.dumps({"plugins": {"entries": {"evil": {"enabled": True}}}}))
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    await stack.provision(user, agent)
    # Nothing to write at provisioning (the rendered file is clean), so the sticky key is not there yet.
    assert (await stack.wait_vps(user, agent, "running", "error"))["state"] == "running"
    resp = await stack.api.patch(f"/agents/{agent}/settings", json={"model": "openai/gpt-6-astra"},
                                 headers=headers(user))
    assert resp.status_code == 202, resp.text
    push = resp.json()["operation_id"]
    # Polled like the dashboard from the 202 on: the push is in flight until the VPS shows how it ended
    # (CI once read `running` with nothing in flight: the state from before the push's end, its row from after).
    deadline = time.monotonic() + 60
    while (vps := (await stack.agent(user, agent))["vps"])["operation_id"] is not None:
        assert vps["operation_id"] == push and vps["state"] == "running", vps
        assert time.monotonic() < deadline, vps
        await asyncio.sleep(0.01)
    assert vps["state"] == "error" and vps["last_operation"]["id"] == push, vps
    outcome = await operation_outcome(stack.client, push)
    assert outcome["status"] == "failed", outcome
    vps = await stack.wait_vps(user, agent, "error", "running", "stopped")
    assert vps["state"] == "error" and vps["last_operation"]["operation"] == "PushConfig", vps
    assert "plugins.entries.evil.enabled" in vps["last_error"] and "the VM was stopped" in vps["last_error"]
    assert vps["observed_state"] == "stopped"
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")


async def test_reconcile_schedule_is_created_once(temporal_client: Client, settings: Settings) -> None:
    from orchestration.schedules import RECONCILE_SCHEDULE_ID, ensure_reconcile_schedule

    await ensure_reconcile_schedule(temporal_client, settings.temporal_task_queue)
    await ensure_reconcile_schedule(temporal_client, settings.temporal_task_queue)  # idempotent
    desc = await temporal_client.get_schedule_handle(RECONCILE_SCHEDULE_ID).describe()
    assert desc.schedule.spec.intervals[0].every.total_seconds() == 300
    assert desc.schedule.policy.overlap.name == "SKIP"
    await temporal_client.get_schedule_handle(RECONCILE_SCHEDULE_ID).delete()


async def test_reconcile_fails_provisioning_stuck_past_its_deadline(stack: Stack, sql: psycopg.Connection) -> None:
    """A provisioning whose run died unrecorded (terminated by an operator, say) does not stay
    `provisioning` forever: its operation expires, the VPS fails, and the user can destroy it and start over."""
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    vps_id = sql.execute(
        "INSERT INTO vpses (user_id, vps_config_id, provider, state, created_at) "
        "VALUES (%s, (SELECT id FROM vps_configs WHERE name = 'local-small'), 'local', 'provisioning', "
        "now() - interval '2 hours') RETURNING id", (user,)).fetchone()[0]  # type: ignore[index]
    sql.execute("INSERT INTO vps_operations (id, vps_id, user_id, kind, status, step, created_at) VALUES "
                "('provision-ghost', %s, %s, 'provision', 'running', 'wait_gateway_ready', now() - interval '2 hours')",
                (vps_id, user))
    sql.execute("UPDATE agents SET vps_id = %s WHERE id = %s", (vps_id, agent))
    assert (await stack.agent(user, agent))["vps"]["operation_id"] == "provision-ghost"
    report = await stack.client.execute_workflow(
        Reconcile.run, ReconcileInput(operation_deadline_s=3600), id=f"reconcile-stuck-{agent}",
        task_queue=stack.settings.temporal_task_queue, result_type=ReconcileReport)
    assert report.operations_expired == ["provision-ghost"]
    assert str(vps_id) in report.stuck_failed
    vps = (await stack.agent(user, agent))["vps"]
    assert vps["state"] == "error" and vps["operation_id"] is None
    assert vps["last_operation"]["status"] == "failed" and "time limit" in vps["last_operation"]["error"]
    assert "provisioning did not finish" in vps["last_error"]
    # An error VPS blocks a new one (it may own a VM) until it is destroyed; then the agent starts over.
    blocked = await stack.provision(user, agent)
    assert blocked.status_code == 409 and blocked.json()["vps_state"] == "error"
    assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
    await stack.wait_vps(user, agent, "destroyed")
    assert (await stack.provision(user, agent)).status_code == 202
    await stack.wait_vps(user, agent, "running", "error")
    await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
    await stack.wait_vps(user, agent, "destroyed")
