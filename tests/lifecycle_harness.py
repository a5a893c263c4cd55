"""A control plane in one test process: the API over ASGI and a worker on the shared Temporal server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities.agent_ops import AgentActivities as VpsActivities
from api.app import create_app
from db.engine import make_engine, session_factory
from providers import VmProvider
from settings import Settings
from tests import histories
from tests.helpers import headers
from worker import worker_interceptors, workflow_runner
from workflows import WORKFLOWS
from workflows.contracts import LifecycleTimeouts

FAST = LifecycleTimeouts(vm_running_s=30, gateway_ready_s=30, poll_interval_s=0.2, provider_call_s=60,
                         channel_status_s=2)


@dataclass
class Stack:
    api: httpx.AsyncClient
    client: Client
    settings: Settings
    activities: VpsActivities

    async def new_agent(self, user: uuid.UUID, name: str = "molty") -> str:
        resp = await self.api.post("/agents", json={"name": name}, headers=headers(user))
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    async def config_id(self, user: uuid.UUID, provider: str) -> str:
        plans = (await self.api.get("/plans", headers=headers(user))).json()
        me = (await self.api.get("/users/me", headers=headers(user))).json()
        plan = next(p for p in plans if p["name"] == me["plan"]["name"])
        return str(next(c["id"] for c in plan["vps_configs"] if c["provider"] == provider))

    async def provision(self, user: uuid.UUID, agent: str, provider: str = "local", **hdrs: str) -> httpx.Response:
        body = {"vps_config_id": await self.config_id(user, provider)}
        return await self.api.post(f"/agents/{agent}/vps", json=body, headers={**headers(user), **hdrs})

    async def agent(self, user: uuid.UUID, agent: str) -> dict[str, Any]:
        resp = await self.api.get(f"/agents/{agent}", headers=headers(user))
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    async def wait_vps(self, user: uuid.UUID, agent: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        """Poll like a frontend until the VPS settles in one of `states` with no operation running."""
        deadline = time.monotonic() + timeout
        vps: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            vps = (await self.agent(user, agent))["vps"]
            if vps and vps["state"] in states and vps["operation_id"] is None:
                return vps
            await asyncio.sleep(0.1)
        raise AssertionError(f"VPS never reached {states}; last seen {vps}")


async def operation_handle(client: Client, operation_id: str, timeout: float = 60) -> WorkflowHandle[Any, Any]:
    """The operation's run, once it exists: a 202 means the VPS's entity accepted the operation, and
    the entity starts the operation's child run a moment later (until then Temporal says NOT_FOUND)."""
    handle = client.get_workflow_handle(operation_id)
    deadline = time.monotonic() + timeout
    while True:
        try:
            await handle.describe()
            return handle
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def operation_outcome(client: Client, operation_id: str) -> dict[str, Any]:
    """The operation's result (its status and error), as a dict."""
    result = await (await operation_handle(client, operation_id)).result()
    return result if isinstance(result, dict) else result.model_dump()  # type: ignore[no-any-return]


@asynccontextmanager
async def running_stack(settings: Settings, client: Client, providers: dict[str, VmProvider] | None = None,
                        timeouts: LifecycleTimeouts = FAST, worker: bool = True) -> AsyncIterator[Stack]:
    engine = make_engine(settings)
    activities = VpsActivities(settings, session_factory(engine), providers)
    app = create_app(settings)
    app.state.lifecycle_timeouts = timeouts
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
            stack = Stack(api=api, client=client, settings=settings, activities=activities)
            if not worker:
                yield stack
            else:
                try:
                    async with Worker(client, task_queue=settings.temporal_task_queue, workflows=WORKFLOWS,
                                      activities=activities.all(), max_concurrent_activities=50,
                                      # the production sandbox and interceptors (worker.py)
                                      workflow_runner=workflow_runner(), interceptors=worker_interceptors()):
                        try:
                            yield stack
                        finally:
                            if histories.recording():
                                await histories.record(client, settings.temporal_task_queue)
                finally:
                    # Once the worker has stopped: an activity still running could otherwise launch a
                    # gateway into a VM folder while it is being removed ("Directory not empty").
                    await stop_local_vms(settings)
    await engine.dispose()


async def stop_local_vms(settings: Settings) -> None:
    """Safety net for a failed test: no gateway process outlives it."""
    from providers.base import ProviderRetryable
    from providers.local import LocalProvider

    local = LocalProvider.from_settings(settings)
    for vm in await local.list_managed():
        for attempt in range(3):  # as DestroyVps would: a launch cut short by the worker's exit may still
            try:                  # be writing its pid file into the folder (to_thread is not cancelled)
                await local.destroy(vm.provider_ref)
                break
            except ProviderRetryable:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5)
