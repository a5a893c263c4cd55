"""`activities.gateway.vm_down`: what the provider must say before a wait for a gateway gives up.

The real Fly provider against the fake Machines API. A Fly machine restarting its crashed gateway
(restart policy on-failure) passes through `stopped`; one look at that must not fail an operation,
nor must a provider that answers 503 for a moment. Two looks at `stopped`, a `failed` machine or a
destroyed one end the wait with the provider's reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from temporalio.exceptions import ApplicationError

from activities.gateway import unless_vm_down, vm_down
from db.models import Vps
from providers.base import VmSpec
from providers.fly import FlyProvider
from tests.fakes.fly_api import FakeFly

LOOK_S = 0.05
MACHINE_ROUTE = "GET /apps/*/machines/*"


@pytest.fixture
async def fly() -> AsyncIterator[tuple[FakeFly, FlyProvider, Vps]]:
    fake = FakeFly()
    await fake.start()
    provider = FlyProvider(fake.token, base_url=fake.base_url, org_slug=fake.org_slug,
                           default_image="registry.fly.io/slopbox-gateway:test", request_timeout_s=2.0)
    info = await provider.create(VmSpec(vps_id="vps-1", agent_id="agent-1", user_id="user-1", cpus=2,
                                        memory_mb=2048, disk_gb=3, locations=["fra"]))
    fake.finish_pending()
    vps = Vps(provider="fly", provider_ref=info.provider_ref)
    yield fake, provider, vps
    await provider.aclose()
    await fake.aclose()


def machine(fake: FakeFly, vps: Vps) -> dict[str, object]:
    return fake.machines[str(vps.provider_ref).split("/")[-1]]


async def looks(fake: FakeFly, n: int) -> None:
    """Until the watch has asked the provider `n` more times."""
    start, deadline = len(fake.calls(MACHINE_ROUTE)), time.monotonic() + 10
    while len(fake.calls(MACHINE_ROUTE)) < start + n:
        assert time.monotonic() < deadline, "the watch stopped asking the provider"
        await asyncio.sleep(0.01)


async def test_a_restart_through_stopped_and_a_provider_503_do_not_end_the_wait(
        fly: tuple[FakeFly, FlyProvider, Vps]) -> None:
    fake, provider, vps = fly
    assert machine(fake, vps)["state"] == "started"
    watch = asyncio.ensure_future(vm_down(provider, vps, first_s=0, every_s=LOOK_S))
    await looks(fake, 2)
    machine(fake, vps)["state"] = "stopped"  # the gateway crashed; Fly restarts it
    await looks(fake, 1)
    machine(fake, vps)["state"] = "started"
    fake.fail_next(MACHINE_ROUTE, status=503)
    await looks(fake, 3)
    assert not watch.done()
    machine(fake, vps)["state"] = "stopped"  # now it stays down
    assert await asyncio.wait_for(watch, 5) == "the fly VM's state is stopped"


@pytest.mark.parametrize(("state", "why"), [("failed", "the fly VM's state is error"),
                                            ("destroyed", "the fly VM no longer exists")])
async def test_a_failed_or_destroyed_machine_ends_the_wait_at_the_first_look(
        fly: tuple[FakeFly, FlyProvider, Vps], state: str, why: str) -> None:
    fake, provider, vps = fly
    machine(fake, vps)["state"] = state
    looked = len(fake.calls(MACHINE_ROUTE))
    assert await asyncio.wait_for(vm_down(provider, vps, first_s=0, every_s=LOOK_S), 5) == why
    assert len(fake.calls(MACHINE_ROUTE)) == looked + 1


async def test_unless_vm_down_cancels_the_wait_and_fails_for_good(fly: tuple[FakeFly, FlyProvider, Vps],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake, provider, vps = fly
    monkeypatch.setattr("activities.gateway.VM_WATCH_FIRST_S", 0)
    waited = asyncio.Event()

    async def wait_for_a_gateway() -> str:
        try:
            await asyncio.sleep(3600)
        finally:
            waited.set()
        return "never"

    assert await unless_vm_down(provider, vps, asyncio.sleep(0, "ready")) == "ready"  # work first: its result
    machine(fake, vps)["state"] = "failed"
    with pytest.raises(ApplicationError) as err:
        await asyncio.wait_for(unless_vm_down(provider, vps, wait_for_a_gateway()), 10)
    assert err.value.type == "VmNotRunning" and err.value.non_retryable
    assert err.value.message == "the gateway's VM is not running: the fly VM's state is error"
    assert waited.is_set()  # the wait was cancelled, not left running
