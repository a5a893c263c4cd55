"""Fault injection: workers killed inside every lifecycle step, a flaky provider, Temporal going away.

Everything here goes through the API and reads the outcome from the API, the database rows and
the provider's own state (VM folders, gateway processes, the fake Hetzner API's servers).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from orchestration.client import connect
from providers.local import LocalProvider
from settings import Settings
from tests.conftest import truncate_user_data
from tests.enforcement_harness import until
from tests.fault_harness import (
    HeldWorkers,
    TemporalDevServer,
    gateway_processes,
    run_chaos,
    start_worker,
    stop_process,
)
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, Stack, running_stack, stop_local_vms
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")

# --- 1. a worker SIGKILLed inside each step ----------------------------------------------------------

STEPS = {
    "provision": ["create_vm", "wait_vm_running", "wait_gateway_ready", "pair_gateway", "push_config"],
    "start": ["start_vm", "wait_vm_running", "wait_gateway_ready", "push_config"],
    "stop": ["stop_vm", "wait_vm_stopped"],
    "destroy": ["record_storage_usage", "destroy_vm"],
}
EXPECTED = {"provision": "running", "start": "running", "stop": "stopped", "destroy": "destroyed"}
CASES = [(op, step) for op, steps in STEPS.items() for step in steps]
# Provider calls may take 45 s before Temporal gives an attempt up; a crashed attempt is retried
# after that (pairing and config push have their own, longer budgets).
CRASH_TIMEOUTS = LifecycleTimeouts(**{**FAST.model_dump(), "provider_call_s": 45})


@dataclass
class CrashCase:
    op: str
    step: str
    user: uuid.UUID
    agent: str
    vps_id: str | None = None
    problem: str | None = None
    """Why the case never got to the crash (set-up failed, the step was never reached)."""
    final: dict[str, Any] | None = None


@dataclass
class CrashMatrix:
    cases: dict[tuple[str, str], CrashCase]
    vm_folders: set[str] = field(default_factory=set)
    managed: list[tuple[str | None, str]] = field(default_factory=list)
    processes: dict[str, list[int]] = field(default_factory=dict)
    logs: Path | None = None


async def _vps(stack: Stack, case: CrashCase) -> dict[str, Any] | None:
    return (await stack.agent(case.user, case.agent))["vps"]  # type: ignore[no-any-return]


async def _until(stack: Stack, cases: list[CrashCase], done: Any, timeout: float) -> dict[str, dict[str, Any] | None]:
    """Poll every case (one sweep at a time, gently: two cores) until `done(case, vps)` holds for all."""
    deadline = time.monotonic() + timeout
    last: dict[str, dict[str, Any] | None] = {}
    pending = list(cases)
    while pending and time.monotonic() < deadline:
        for case in list(pending):
            last[case.agent] = vps = await _vps(stack, case)
            if done(case, vps):
                pending.remove(case)
        await asyncio.sleep(0.2)
    return last


async def _prepare(stack: Stack, cases: list[CrashCase]) -> None:
    """Start/stop/destroy cases need a running VPS (a stopped one for start)."""
    ready = [c for c in cases if c.op != "provision"]
    for case in ready:
        resp = await stack.provision(case.user, case.agent)
        if resp.status_code != 202:
            case.problem = f"set-up provision answered {resp.status_code}: {resp.text}"
        else:
            case.vps_id = resp.json()["vps_id"]
    idle = lambda c, v: v is not None and v["operation_id"] is None and v["state"] in ("running", "error")  # noqa: E731
    seen = await _until(stack, [c for c in ready if c.problem is None], idle, 120)
    for case in ready:
        vps = seen.get(case.agent)
        if case.problem is None and (vps is None or vps["state"] != "running" or vps["operation_id"]):
            case.problem = f"set-up provisioning did not reach running: {vps}"
    stopping = [c for c in ready if c.op == "start" and c.problem is None]
    for case in stopping:
        resp = await stack.api.post(f"/agents/{case.agent}/vps/stop", headers=headers(case.user))
        if resp.status_code != 202:
            case.problem = f"set-up stop answered {resp.status_code}: {resp.text}"
    stopped = lambda c, v: v is not None and v["operation_id"] is None and v["state"] != "running"  # noqa: E731
    seen = await _until(stack, [c for c in stopping if c.problem is None], stopped, 60)
    for case in stopping:
        vps = seen.get(case.agent)
        if case.problem is None and (vps is None or vps["state"] != "stopped"):
            case.problem = f"set-up stop did not reach stopped: {vps}"


async def _trigger(stack: Stack, case: CrashCase) -> None:
    hdrs = headers(case.user)
    if case.op == "provision":
        resp = await stack.provision(case.user, case.agent)
    elif case.op == "destroy":
        resp = await stack.api.delete(f"/agents/{case.agent}/vps", headers=hdrs)
    else:
        resp = await stack.api.post(f"/agents/{case.agent}/vps/{case.op}", headers=hdrs)
    if resp.status_code != 202:
        case.problem = f"{case.op} answered {resp.status_code}: {resp.text}"
    else:
        case.vps_id = resp.json()["vps_id"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def crash_matrix(settings: Settings, temporal_env: WorkflowEnvironment, database_url: str,
                       tmp_path_factory: pytest.TempPathFactory) -> Any:
    """All cases at once on one worker pair: each VPS is held inside its step, the worker is killed
    with SIGKILL, a fresh worker finishes every operation. The tests below judge one case each."""
    work = tmp_path_factory.mktemp("crash")
    queue = f"tq-crash-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(update={"data_dir": work / "data", "temporal_task_queue": queue})
    with psycopg.connect(database_url, autocommit=True) as sql:
        async with running_stack(s, temporal_env.client, worker=False, timeouts=CRASH_TIMEOUTS) as stack:
            try:
                with HeldWorkers(s, work) as workers:
                    cases = {}
                    for op, step in CASES:
                        user = make_user(sql, plan="starter")
                        cases[(op, step)] = CrashCase(op, step, user,
                                                      await stack.new_agent(user, f"{op}-{step}"[:60]))
                    matrix = CrashMatrix(cases, logs=work)
                    await _prepare(stack, list(cases.values()))
                    live = [c for c in cases.values() if c.problem is None]
                    workers.arm({str(c.user): c.step for c in live})
                    for case in live:
                        await _trigger(stack, case)
                    live = [c for c in live if c.problem is None]

                    def at_step(c: CrashCase, v: dict[str, Any] | None) -> bool:
                        return v is not None and workers.held(c.user, c.step)

                    seen = await _until(stack, live, at_step, 120)
                    for case in live:
                        if not at_step(case, seen.get(case.agent)):
                            case.problem = (f"the {case.op} was never held inside step {case.step}; "
                                            f"last seen {seen.get(case.agent)}")
                    workers.kill_and_replace()
                    settled = lambda c, v: v is not None and v["operation_id"] is None and v["state"] in (  # noqa: E731
                        EXPECTED[c.op], "error")
                    seen = await _until(stack, [c for c in cases.values() if c.problem is None], settled, 240)
                    for case in cases.values():
                        case.final = seen.get(case.agent)
                    vms = s.data_dir / "vms"
                    matrix.vm_folders = {p.name for p in vms.iterdir() if p.is_dir()} if vms.is_dir() else set()
                    matrix.managed = [(vm.vps_id, vm.state.value)
                                      for vm in await LocalProvider.from_settings(s).list_managed()]
                    matrix.processes = gateway_processes(vms)
            finally:
                await stop_local_vms(s)
    truncate_user_data(database_url)
    yield matrix


@pytest.mark.parametrize(("op", "step"), CASES, ids=[f"{op}-{step}" for op, step in CASES])
async def test_worker_killed_inside_step(crash_matrix: CrashMatrix, op: str, step: str) -> None:
    case = crash_matrix.cases[(op, step)]
    assert case.problem is None, case.problem
    vps = case.final
    assert vps is not None and vps["operation_id"] is None and vps["state"] in (EXPECTED[op], "error"), (
        f"the {op} never finished after the crash in {step}; last seen {vps} (logs in {crash_matrix.logs})")
    assert vps["state"] == EXPECTED[op], vps["last_error"]
    mine = [state for vps_id, state in crash_matrix.managed if vps_id == vps["id"]]
    processes = crash_matrix.processes.get(vps["id"], [])
    if op == "destroy":
        assert vps["id"] not in crash_matrix.vm_folders
        assert mine == []
        assert processes == []
    else:
        assert vps["id"] in crash_matrix.vm_folders
        assert mine == [EXPECTED[op]], f"local VMs for this VPS: {mine}"
        assert len(processes) == (1 if EXPECTED[op] == "running" else 0), f"gateway processes: {processes}"


async def test_no_vm_outside_the_crashed_vpses(crash_matrix: CrashMatrix) -> None:
    """Nothing was created twice under another name, and nothing is left for a destroyed VPS."""
    live = {c.final["id"] for c in crash_matrix.cases.values() if c.final and c.final["state"] != "destroyed"}
    assert crash_matrix.vm_folders <= live
    assert {vps_id for vps_id, _ in crash_matrix.managed} <= live
    assert set(crash_matrix.processes) <= live


# --- 2. a fifth of all provider calls fail -----------------------------------------------------------------


async def test_provider_faults_across_concurrent_provisions(settings: Settings, temporal_client: Client, db: str,
                                                            sql: psycopg.Connection, tmp_path: Path) -> None:
    """429s, 5xx and lost responses on 20% of Hetzner calls while 20 VPSes provision: every
    operation ends (running, or error with a reason), every VM we created can redeem its bootstrap
    token while its VPS provisions, and one Reconcile run leaves no orphan."""
    figures = await run_chaos(settings, temporal_client, lambda: make_user(sql, plan="starter"), size=20, rate=0.2,
                              seed=8, workdir=tmp_path)
    report = "\n".join(figures.lines())
    print(report)
    assert sum(figures.faults.values()) > 0, report
    assert figures.outcomes["running"] + figures.outcomes["error"] == 20, report
    assert figures.broken_vms == {}, report
    assert figures.wrong_states == [], report
    assert figures.left_behind == [], report


# --- 3. Temporal is down for a while -------------------------------------------------------------------------

OUTAGE_S = 10
ANSWER_WITHIN_S = 120
"""Not a latency budget: a request still unanswered after this long is treated as never answered."""


def _unclaimed(sql: psycopg.Connection, users: list[uuid.UUID]) -> list[tuple[Any, ...]]:
    return sql.execute("SELECT vps_id, status, step, id FROM vps_operations WHERE user_id = ANY(%s) "
                       "AND status IN ('queued', 'running')", (users,)).fetchall()


async def test_a_lost_attempt_is_visible_while_its_step_runs_again(
        settings: Settings, temporal_env: WorkflowEnvironment, sql: psycopg.Connection, tmp_path: Path) -> None:
    """A worker SIGKILLed inside a step says nothing, so Temporal retries the step after the heartbeat
    timeout on another worker. While that attempt runs, the operation says the last one stopped without
    an answer; once the step is done the note is gone."""
    step = "wait_vm_running"
    queue = f"tq-lost-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(update={"data_dir": tmp_path / "data", "temporal_task_queue": queue})
    async with running_stack(s, temporal_env.client, worker=False, timeouts=CRASH_TIMEOUTS) as stack:
        try:
            with HeldWorkers(s, tmp_path) as workers:
                user = make_user(sql, plan="starter")
                agent = await stack.new_agent(user)
                workers.arm({str(user): step})
                assert (await stack.provision(user, agent)).status_code == 202

                async def operation() -> dict[str, Any]:
                    return (await stack.agent(user, agent))["vps"]["operation"]  # type: ignore[no-any-return]

                await until(lambda: workers.held(user, step), 90, f"held inside {step}")
                first = await operation()
                assert first["step"] == step and first["retrying"] is None, first
                workers.kill_and_replace(held=True)  # the next attempt is held too, after its body
                await until(lambda: workers.held(user, step), 120, f"the next attempt held inside {step}")
                op = await operation()
                assert op["status"] == "running" and op["step"] == step, op
                assert op["retrying"]["step"] == step and op["retrying"]["attempt"] == 1, op
                assert "attempt 1 stopped without an answer" in op["retrying"]["error"], op
                workers.kill_and_replace()
                vps = await stack.wait_vps(user, agent, "running", "error", timeout=120)
                assert vps["state"] == "running", vps
                done = vps["last_operation"]
                assert done["id"] == op["id"] and done["status"] == "succeeded" and done["retrying"] is None, done
                row = sql.execute("SELECT retrying FROM vps_operations WHERE id = %s", (op["id"],)).fetchone()
                assert row == (None,)
        finally:
            await stop_local_vms(s)


async def test_temporal_outage_loses_no_request(settings: Settings, db: str, sql: psycopg.Connection,
                                                tmp_path: Path) -> None:
    """Temporal stops for 10 s: requests meanwhile get 503 problem+json and claim nothing; the
    operation that was running finishes once it is back (same worker); the requests then succeed."""
    server = TemporalDevServer(tmp_path / "temporal.db", tmp_path / "temporal.log")
    server.start()
    s = settings.model_copy(update={"temporal_address": server.address, "data_dir": tmp_path / "data",
                                    "temporal_task_queue": f"tq-outage-{uuid.uuid4().hex[:8]}"})
    log = tmp_path / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        client = await connect(s)
        async with AsyncExitStack() as exits:
            stack = await exits.enter_async_context(running_stack(s, client, worker=False))
            fresh_user, running_user, busy_user = make_user(sql), make_user(sql), make_user(sql)
            cold_user = make_user(sql)
            fresh = await stack.new_agent(fresh_user, "fresh")
            # Its own agent: two provisions of one agent at once are one VPS and a 409, whatever Temporal does.
            cold_agent = await stack.new_agent(cold_user, "cold")
            up = await stack.new_agent(running_user, "up")
            busy = await stack.new_agent(busy_user, "busy")
            # Gateways take a while to report ready, so an operation is mid-flight when Temporal stops.
            worker = start_worker(s, log, env={"SLOPBOX_SIM_READY_AFTER_S": "8"})
            provisioned = await stack.provision(running_user, up)
            assert provisioned.status_code == 202, provisioned.text
            before = await stack.wait_vps(running_user, up, "running", "error", timeout=90)
            assert before["state"] == "running", before["last_error"]
            assert (await stack.provision(busy_user, busy)).status_code == 202
            deadline = time.monotonic() + 60
            while (await stack.agent(busy_user, busy))["vps"]["step"] != "wait_gateway_ready":
                assert time.monotonic() < deadline, (await stack.agent(busy_user, busy))["vps"]
                await asyncio.sleep(0.1)
            server.stop()
            # An API process that starts during the outage has never reached Temporal at all.
            cold = await exits.enter_async_context(running_stack(s, client, worker=False))

            # Temporal is gone (for OUTAGE_S, and until every request has its answer): requests are
            # refused with 503 problem+json, and nothing is left half-done.
            requests = {
                "provision": asyncio.create_task(stack.provision(fresh_user, fresh)),
                "stop": asyncio.create_task(stack.api.post(f"/agents/{up}/vps/stop", headers=headers(running_user))),
                "destroy": asyncio.create_task(stack.api.delete(f"/agents/{up}/vps", headers=headers(running_user))),
                "provision on a cold API": asyncio.create_task(cold.provision(cold_user, cold_agent)),
            }
            await asyncio.sleep(OUTAGE_S)
            _, pending = await asyncio.wait(requests.values(), timeout=ANSWER_WITHIN_S)
            unanswered = [name for name, task in requests.items() if task in pending]
            assert not unanswered, f"no answer while Temporal was down ({ANSWER_WITHIN_S + OUTAGE_S}s): {unanswered}"
            for name, task in requests.items():
                resp = task.result()
                assert resp.status_code == 503, f"{name}: {resp.status_code} {resp.text}"
                assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
                assert resp.json()["status"] == 503
            assert _unclaimed(sql, [fresh_user, running_user, cold_user]) == []
            assert (await stack.agent(fresh_user, fresh))["vps"] is None
            assert (await stack.agent(cold_user, cold_agent))["vps"] is None
            still = (await stack.agent(running_user, up))["vps"]
            assert (still["state"], still["operation_id"]) == ("running", None), still
            server.start()

            # Temporal is back with its state; the worker rode the outage out.
            done = await client.get_workflow_handle(provisioned.json()["operation_id"]).describe()
            assert done.status == WorkflowExecutionStatus.COMPLETED
            vps = await stack.wait_vps(busy_user, busy, "running", "error", timeout=120)
            assert vps["state"] == "running", vps["last_error"]
            assert worker.poll() is None, f"the worker exited during the outage: {log.read_text()[-3000:]}"
            # The refused requests, sent again, go through (the provision via the API that started cold).
            again = await cold.provision(cold_user, cold_agent)
            assert again.status_code == 202, again.text
            assert (await stack.provision(fresh_user, fresh)).status_code == 202
            stopped = await stack.api.post(f"/agents/{up}/vps/stop", headers=headers(running_user))
            assert stopped.status_code == 202, stopped.text
            for user, agent in ((cold_user, cold_agent), (fresh_user, fresh)):
                vps = await stack.wait_vps(user, agent, "running", "error", timeout=90)
                assert vps["state"] == "running", vps["last_error"]
            vps = await stack.wait_vps(running_user, up, "stopped", "error", timeout=60)
            assert vps["state"] == "stopped", vps["last_error"]
            gone = await stack.api.delete(f"/agents/{up}/vps", headers=headers(running_user))
            assert gone.status_code == 202, gone.text
            await stack.wait_vps(running_user, up, "destroyed", timeout=60)
    finally:
        stop_process(worker)
        await stop_local_vms(s)
        server.stop()
