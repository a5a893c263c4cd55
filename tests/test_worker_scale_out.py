"""Workers scale out: two `slopbox worker` processes on one task queue share the work, and when one
is SIGKILLed mid-flight the other finishes everything it held (README "Scaling each tier").

Nothing in the control plane assumes one worker: state lives in PostgreSQL and Temporal, each VPS's
operations are serialized by its entity workflow, not by a process.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import psycopg
import pytest
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

from settings import Settings
from tests.fault_harness import gateway_processes, start_worker, stop_process
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, running_stack, stop_local_vms
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")
AGENTS = 6
# A killed worker's activities come back after their start-to-close timeout; keep it short here.
TIMEOUTS = LifecycleTimeouts(**{**FAST.model_dump(), "provider_call_s": 20})


async def _activity_workers(client: Client, workflow_id: str) -> set[str]:
    """The identities of the workers that started this workflow's activities (from its history)."""
    seen: set[str] = set()
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            seen.add(event.activity_task_started_event_attributes.identity)
    return seen


async def _first_at_work(client: Client, operation_ids: list[str],
                         workers: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """The first of `workers` seen starting an activity of these operations (read from their histories)."""
    deadline = time.monotonic() + 120
    while True:
        for operation_id in operation_ids:
            try:
                identities = await _activity_workers(client, operation_id)
            except RPCError:  # the entity starts the operation's run a moment after accepting it
                continue
            for w in workers:
                if any(i.startswith(f"{w.pid}@") for i in identities):
                    return w
        assert time.monotonic() < deadline, "no worker started an activity"
        await asyncio.sleep(0.1)


async def _wait_pollers(client: Client, task_queue: str, count: int) -> None:
    """Until `count` workers poll the queue for activities: a worker still starting takes no work."""
    request = DescribeTaskQueueRequest(namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
                                       task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
    deadline = time.monotonic() + 60
    while len((await client.workflow_service.describe_task_queue(request)).pollers) < count:
        assert time.monotonic() < deadline, f"fewer than {count} workers poll {task_queue}"
        await asyncio.sleep(0.2)


async def test_two_workers_share_provisions_and_survive_losing_one(settings: Settings, temporal_client: Client,
                                                                   db: str, sql: psycopg.Connection,
                                                                   tmp_path: Path) -> None:
    s = settings.model_copy(update={"data_dir": tmp_path / "data",
                                    "temporal_task_queue": f"tq-scale-{uuid.uuid4().hex[:8]}"})
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with AsyncExitStack() as exits:
            stack = await exits.enter_async_context(running_stack(s, temporal_client, timeouts=TIMEOUTS,
                                                                  worker=False))
            workers = [start_worker(s, tmp_path / f"worker{i}.log") for i in (1, 2)]
            await _wait_pollers(temporal_client, s.temporal_task_queue, 2)
            users = [make_user(sql) for _ in range(AGENTS)]
            agents = [await stack.new_agent(u, f"scale-{i}") for i, u in enumerate(users)]
            accepted = [await stack.provision(u, a) for u, a in zip(users, agents, strict=True)]
            assert [r.status_code for r in accepted] == [202] * AGENTS, [r.text for r in accepted]

            # As soon as a worker has started an activity the provisions are mid-flight: kill that worker
            # without warning (whichever it is: which poller gets a task is the server's choice).
            victim = await _first_at_work(temporal_client, [r.json()["operation_id"] for r in accepted], workers)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            survivor = next(w for w in workers if w is not victim)

            finals = await asyncio.gather(*(stack.wait_vps(u, a, "running", "error", timeout=240)
                                            for u, a in zip(users, agents, strict=True)))
            assert [v["state"] for v in finals] == ["running"] * AGENTS, [v["last_error"] for v in finals]
            assert survivor.poll() is None, (tmp_path / f"worker{workers.index(survivor) + 1}.log").read_text()[-3000:]

            # Both workers did activity work (the queue is shared, not owned).
            identities: set[str] = set()
            for r in accepted:
                identities |= await _activity_workers(temporal_client, r.json()["operation_id"])
            assert {f"{w.pid}@" for w in workers} <= {i.split("@")[0] + "@" for i in identities}, identities

            # One VM per VPS, no duplicate gateway from a retried step.
            processes = gateway_processes(s.data_dir / "vms")
            assert sorted(len(p) for p in processes.values()) == [1] * AGENTS, processes

            # The surviving worker alone tears everything down.
            gone = [await stack.api.delete(f"/agents/{a}/vps", headers=headers(u))
                    for u, a in zip(users, agents, strict=True)]
            assert [r.status_code for r in gone] == [202] * AGENTS, [r.text for r in gone]
            finals = await asyncio.gather(*(stack.wait_vps(u, a, "destroyed", "error", timeout=120)
                                            for u, a in zip(users, agents, strict=True)))
            assert [v["state"] for v in finals] == ["destroyed"] * AGENTS, [v["last_error"] for v in finals]
            assert gateway_processes(s.data_dir / "vms") == {}
    finally:
        for w in workers:
            stop_process(w)
        await stop_local_vms(s)
