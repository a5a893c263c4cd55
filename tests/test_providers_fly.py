"""FlyProvider against the fake Fly Machines API, through real httpx.

Provider methods submit and return; the tests wait the way an activity does, by polling `get`.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from providers import (
    CapacityUnavailable,
    ProviderFatal,
    ProviderRetryable,
    VmInfo,
    VmNotFound,
    VmSpec,
    VmState,
    build_provider,
)
from providers.fly import FlyProvider, auth_header
from settings import Settings
from tests.fakes.fly_api import FakeFly


@pytest.fixture
async def fake() -> AsyncIterator[FakeFly]:
    f = FakeFly()
    await f.start()
    yield f
    await f.aclose()


ProviderFactory = Callable[..., FlyProvider]


@pytest.fixture
async def make_provider(fake: FakeFly) -> AsyncIterator[ProviderFactory]:
    made: list[FlyProvider] = []

    def make(**overrides: Any) -> FlyProvider:
        kwargs: dict[str, Any] = {
            "base_url": fake.base_url,
            "org_slug": fake.org_slug,
            "default_image": "registry.fly.io/slopbox-gateway:test",
            "request_timeout_s": 2.0,
        }
        kwargs.update(overrides)
        token = kwargs.pop("token", fake.token)
        provider = FlyProvider(token, **kwargs)
        made.append(provider)
        return provider

    yield make
    for p in made:
        await p.aclose()


@pytest.fixture
def provider(make_provider: ProviderFactory) -> FlyProvider:
    return make_provider()


def spec(vps_id: str = "vps-1", **kw: Any) -> VmSpec:
    kw.setdefault("locations", ["fra"])
    return VmSpec(vps_id=vps_id, agent_id="agent-1", user_id="user-1", cpus=2, memory_mb=2048, disk_gb=3, **kw)


async def reach(provider: FlyProvider, ref: str, state: VmState, timeout_s: float = 10.0) -> VmInfo:
    """Poll `get` until `state`, as the heartbeating poll activity does."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await provider.get(ref)
        assert info is not None, f"machine {ref} is gone"
        if info.state == state or time.monotonic() >= deadline:
            assert info.state == state, info
            return info
        await asyncio.sleep(0.01)


async def gone(provider: FlyProvider, ref: str) -> None:
    assert await provider.wait_until_gone(ref, timeout_s=10.0, poll_s=0.01) is None


async def test_happy_path_lifecycle(fake: FakeFly, provider: FlyProvider) -> None:
    s = spec(env={"OPENCLAW_SKIP_CHANNELS": "0"}, files={"openclaw.json": '{"gateway": {}}'})
    info = await provider.create(s)
    assert info.state == VmState.PROVISIONING and info.raw_state == "created"  # accepted, not awaited
    assert info.provider_ref.startswith("slopbox-vps-1/")
    assert info.location == "fra"
    assert info.vps_id == "vps-1"
    app, mid = info.provider_ref.split("/")
    # A cloud gateway serves TLS only (issue 9 #4): the control plane pins the certificate the VM reported.
    assert provider.gateway_url(info) == f"https://{app}.flycast:18789"

    assert fake.apps[app].network == app
    machine = fake.machines[mid]
    config = machine["config"]
    assert config["metadata"] == {"managed_by": "slopbox", "vps_id": "vps-1", "agent_id": "agent-1"}
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 2, "memory_mb": 2048}
    assert config["services"] == []
    [vol] = fake.volumes.values()
    assert vol["size_gb"] == 3 and vol["attached_machine_id"] == mid
    assert config["mounts"] == [{"volume": vol["id"], "path": "/data"}]
    assert config["files"] == [
        {"guest_path": "/data/state/openclaw.json", "raw_value": base64.b64encode(b'{"gateway": {}}').decode()}
    ]
    await reach(provider, info.provider_ref, VmState.RUNNING)

    await provider.stop(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.STOPPED)
    await provider.stop(info.provider_ref)  # idempotent
    [stop] = fake.calls("POST /apps/*/machines/*/stop")
    assert stop.body == {"signal": "SIGTERM", "timeout": "30s"}

    await provider.start(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.RUNNING)
    await provider.start(info.provider_ref)  # idempotent
    assert len(fake.calls("POST /apps/*/machines/*/start")) == 1

    await provider.destroy(info.provider_ref)
    await gone(provider, info.provider_ref)
    assert fake.apps == {} and fake.volumes == {}
    await provider.destroy(info.provider_ref)  # already gone = done
    # Nothing waits server-side: no long poll that could outlast a heartbeat.
    assert fake.calls("GET /apps/*/machines/*/wait") == []

    with pytest.raises(VmNotFound):
        await provider.start(info.provider_ref)
    with pytest.raises(VmNotFound):
        await provider.stop(info.provider_ref)


async def test_create_returns_while_the_machine_is_still_created(fake: FakeFly, provider: FlyProvider) -> None:
    fake.launch_delay_s = math.inf  # Fly keeps the machine "created"
    info = await provider.create(spec())
    assert info.state == VmState.PROVISIONING and info.raw_state == "created"
    again = await provider.create(spec())  # a retried create adopts it, still without waiting
    assert again.provider_ref == info.provider_ref and again.state == VmState.PROVISIONING
    assert len(fake.machines) == 1 and len(fake.volumes) == 1
    assert fake.calls("POST /apps/*/machines/*/start") == []
    fake.finish_pending()
    await reach(provider, info.provider_ref, VmState.RUNNING)


async def test_create_twice_is_one_machine(fake: FakeFly, provider: FlyProvider) -> None:
    first = await provider.create(spec())
    second = await provider.create(spec())
    assert first.provider_ref == second.provider_ref
    assert len(fake.machines) == 1 and len(fake.volumes) == 1 and len(fake.apps) == 1
    assert [c.status for c in fake.calls("POST /apps")] == [201, 422]


@pytest.mark.parametrize("route", ["POST /apps", "POST /apps/*/volumes", "POST /apps/*/machines"])
async def test_lost_create_response_is_adopted(fake: FakeFly, provider: FlyProvider, route: str) -> None:
    """Each step of create (app, volume, machine) done by Fly but answered 504 is adopted on retry."""
    fake.launch_delay_s = math.inf
    fake.lose_response_next(route)
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert err.value.status == 504
    info = await provider.create(spec())
    assert len(fake.apps) == 1 and len(fake.machines) == 1 and len(fake.volumes) == 1
    assert info.provider_ref == f"slopbox-vps-1/{next(iter(fake.machines))}"
    assert len(fake.calls("POST /apps/*/machines")) == 1


async def test_adopts_a_stopped_machine_and_starts_it(fake: FakeFly, provider: FlyProvider) -> None:
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.RUNNING)
    await provider.stop(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.STOPPED)
    again = await provider.create(spec())
    assert again.provider_ref == info.provider_ref and again.state == VmState.STARTING
    await reach(provider, info.provider_ref, VmState.RUNNING)


async def test_app_name_taken_by_someone_else_is_fatal(fake: FakeFly, provider: FlyProvider) -> None:
    fake.other_org_apps = {"slopbox-vps-1"}
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec())
    assert "already been taken" in err.value.message


async def test_429_is_retryable_with_retry_after(fake: FakeFly, provider: FlyProvider) -> None:
    fake.fail_next("POST /apps/*/machines", status=429, message="rate limited", headers={"Retry-After": "2"})
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert err.value.retryable and err.value.status == 429 and err.value.retry_after_s == 2.0
    await provider.create(spec())
    assert len(fake.machines) == 1 and len(fake.volumes) == 1


@pytest.mark.parametrize(("status", "body"), [(500, None), (503, None), (502, "<html>bad gateway</html>")])
async def test_5xx_is_retryable(fake: FakeFly, provider: FlyProvider, status: int, body: str | None) -> None:
    info = await provider.create(spec())
    fake.fail_next("GET /apps/*/machines/*", status=status, body=body)
    with pytest.raises(ProviderRetryable):
        await provider.get(info.provider_ref)
    assert await provider.get(info.provider_ref) is not None


async def test_timeout_is_retryable(fake: FakeFly, make_provider: ProviderFactory) -> None:
    provider = make_provider(request_timeout_s=0.2)
    fake.hang_next("GET /apps", seconds=2)
    with pytest.raises(ProviderRetryable) as err:
        await provider.list_managed()
    assert err.value.code == "timeout"


async def test_invalid_token_is_fatal_with_message(make_provider: ProviderFactory) -> None:
    provider = make_provider(token="wrong-token")
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec())
    assert not err.value.retryable and err.value.status == 401
    assert "authenticated" in err.value.message
    assert "wrong-token" not in str(err.value)


async def test_invalid_guest_is_fatal_with_message(fake: FakeFly, provider: FlyProvider) -> None:
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec().model_copy(update={"memory_mb": 1000}))
    assert "memory" in err.value.message
    assert fake.machines == {}


async def test_secrets_never_go_into_machine_config(fake: FakeFly, provider: FlyProvider) -> None:
    with pytest.raises(ProviderFatal):
        await provider.create(spec(secret_env={"OPENCLAW_GATEWAY_TOKEN": "s3cret"}))
    with pytest.raises(ProviderFatal):
        await provider.create(spec(env={"OPENCLAW_GATEWAY_TOKEN": "s3cret"}))
    assert fake.apps == {}


async def test_falls_back_to_next_region(fake: FakeFly, provider: FlyProvider) -> None:
    fake.resource_unavailable_in = {"fra"}  # volume create refused ("no capacity")
    fake.machine_unavailable_in = {"ams"}  # volume fine, machine refused (insufficient_capacity)
    info = await provider.create(spec(locations=["fra", "ams", "cdg"]))
    assert info.location == "cdg"
    [vol] = fake.volumes.values()  # the ams volume was cleaned up
    assert vol["region"] == "cdg"


async def test_all_regions_unavailable(fake: FakeFly, provider: FlyProvider) -> None:
    fake.resource_unavailable_in = {"fra", "ams"}
    with pytest.raises(CapacityUnavailable) as err:
        await provider.create(spec(locations=["fra", "ams"]))
    assert err.value.tried == ["fra", "ams"]
    assert fake.machines == {} and fake.volumes == {}


async def test_list_managed_ignores_foreign_machines(fake: FakeFly, provider: FlyProvider) -> None:
    fake.add_machine("someone-elses-app", metadata={"vps_id": "x", "managed_by": "slopbox"})
    fake.add_machine("slopbox-stray", metadata={"team": "web"})
    a = await provider.create(spec("vps-a"))
    b = await provider.create(spec("vps-b"))
    listed = await provider.list_managed()
    assert sorted(i.provider_ref for i in listed) == sorted([a.provider_ref, b.provider_ref])
    assert {i.vps_id for i in listed} == {"vps-a", "vps-b"}


async def test_list_managed_reports_app_left_without_machine(fake: FakeFly, provider: FlyProvider) -> None:
    """A create interrupted after the app and volume were made must still be findable and deletable."""
    fake.fail_next("POST /apps/*/machines", status=400, message="bad request")
    with pytest.raises(ProviderFatal):
        await provider.create(spec())
    [left] = await provider.list_managed()
    assert left.vps_id == "vps-1" and left.provider_ref == "slopbox-vps-1/no-machine"
    got = await provider.get(left.provider_ref)  # the app is there until destroyed
    assert got is not None and got.state == VmState.PROVISIONING
    with pytest.raises(VmNotFound):
        await provider.start(left.provider_ref)
    await provider.destroy(left.provider_ref)
    await gone(provider, left.provider_ref)
    assert fake.apps == {} and fake.volumes == {}
    assert await provider.list_managed() == []


async def test_failed_launch_shows_as_error_and_a_retried_create_starts_it(
    fake: FakeFly, provider: FlyProvider
) -> None:
    fake.action_errors_next("start")
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.ERROR)
    again = await provider.create(spec())  # adopts the failed machine and starts it again
    assert again.provider_ref == info.provider_ref
    await reach(provider, info.provider_ref, VmState.RUNNING)
    assert len(fake.machines) == 1 and len(fake.volumes) == 1


async def test_never_booting_machine_can_be_destroyed(fake: FakeFly, provider: FlyProvider) -> None:
    fake.never_boot = True
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.STARTING)
    waited = await provider.wait_until_running(info.provider_ref, timeout_s=0.05, poll_s=0.01)
    assert waited is not None and waited.state == VmState.STARTING
    await provider.destroy(info.provider_ref)
    await gone(provider, info.provider_ref)


async def test_destroy_returns_once_accepted_and_get_later_says_gone(fake: FakeFly, provider: FlyProvider) -> None:
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.RUNNING)
    fake.app_delete_delay_s = math.inf
    await provider.destroy(info.provider_ref)
    deleting = await provider.get(info.provider_ref)
    assert deleting is not None and deleting.state == VmState.DELETING
    await provider.destroy(info.provider_ref)  # in progress = accepted
    with pytest.raises(VmNotFound):
        await provider.start(info.provider_ref)
    with pytest.raises(ProviderRetryable):  # a create now would need the volume that is going away
        await provider.create(spec())
    fake.finish_pending()
    assert await provider.get(info.provider_ref) is None
    assert fake.apps == {}


async def test_start_while_stopping_is_retryable_and_force_stop_kills(fake: FakeFly, provider: FlyProvider) -> None:
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.RUNNING)
    fake.action_duration_s = math.inf  # the machine takes its time to stop
    await provider.stop(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.STOPPING)
    await provider.stop(info.provider_ref)  # already stopping: nothing re-sent
    with pytest.raises(ProviderRetryable) as err:
        await provider.start(info.provider_ref)
    assert err.value.code == "conflict"
    await provider.force_stop(info.provider_ref)
    stops = fake.calls("POST /apps/*/machines/*/stop")
    assert [c.body["signal"] for c in stops] == ["SIGTERM", "SIGKILL"]
    fake.finish_pending()
    await reach(provider, info.provider_ref, VmState.STOPPED)
    await provider.force_stop(info.provider_ref)  # stopped = no-op
    assert len(fake.calls("POST /apps/*/machines/*/stop")) == 2


def test_auth_header_scheme() -> None:
    assert auth_header("abc") == "Bearer abc"
    assert auth_header("fm2_abc") == "FlyV1 fm2_abc"
    assert auth_header("fm1r_abc") == "FlyV1 fm1r_abc"
    assert auth_header("FlyV1 fm2_abc") == "FlyV1 fm2_abc"


async def test_macaroon_token_is_sent_as_flyv1(fake: FakeFly, make_provider: ProviderFactory) -> None:
    fake.token = "fm2_macaroon"
    provider = make_provider(token="fm2_macaroon")
    assert await provider.list_managed() == []


async def test_build_provider_from_settings(fake: FakeFly) -> None:
    settings = Settings(fly_api_token=fake.token, fly_api_base_url=fake.base_url, fly_org_slug=fake.org_slug)  # type: ignore[call-arg]
    provider = build_provider("fly", settings)
    try:
        assert isinstance(provider, FlyProvider)
        assert await provider.list_managed() == []
    finally:
        await provider.aclose()


def test_fake_runs_in_a_thread_for_sync_clients() -> None:
    fake = FakeFly()
    url = fake.start_in_thread()
    try:
        r = httpx.get(f"{url}/apps", params={"org_slug": "personal"}, headers={"Authorization": "Bearer test-token"})
        assert r.json() == {"total_apps": 0, "apps": []}
    finally:
        fake.stop()
