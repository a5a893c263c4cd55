"""HetznerProvider against the fake Hetzner API, through the real hcloud client.

Provider methods submit and return; the tests wait the way an activity does, by polling `get`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from hcloud import Client

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
from providers.hetzner import HetznerProvider, server_name
from settings import Settings
from tests.fakes.hetzner_api import FakeHetzner

CP_IP = "198.51.100.7"
T = TypeVar("T")


@pytest.fixture
async def fake() -> AsyncIterator[FakeHetzner]:
    f = FakeHetzner()
    await f.start()
    yield f
    await f.aclose()


ProviderFactory = Callable[..., HetznerProvider]


@pytest.fixture
def make_provider(fake: FakeHetzner) -> ProviderFactory:
    def make(**overrides: Any) -> HetznerProvider:
        kwargs: dict[str, Any] = {
            "api_endpoint": fake.base_url,
            "control_plane_ips": [CP_IP],
            "request_timeout_s": 2.0,
        }
        kwargs.update(overrides)
        token = kwargs.pop("token", fake.token)
        return HetznerProvider(token, **kwargs)

    return make


@pytest.fixture
def provider(make_provider: ProviderFactory) -> HetznerProvider:
    return make_provider()


def spec(vps_id: str = "vps-1", **kw: Any) -> VmSpec:
    kw.setdefault("server_type", "cx23")
    return VmSpec(vps_id=vps_id, agent_id="agent-1", user_id="user-1", **kw)


async def reach(provider: HetznerProvider, ref: str, state: VmState, timeout_s: float = 10.0) -> VmInfo:
    """Poll `get` until `state`, as the heartbeating poll activity does."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await provider.get(ref)
        assert info is not None, f"server {ref} is gone"
        if info.state == state or time.monotonic() >= deadline:
            assert info.state == state, info
            return info
        await asyncio.sleep(0.01)


async def gone(provider: HetznerProvider, ref: str) -> None:
    assert await provider.wait_until_gone(ref, timeout_s=10.0, poll_s=0.01) is None


async def retried(call: Callable[[], Awaitable[T]], attempts: int = 200) -> T:
    """Retry retryable provider errors like the Temporal activity retry policy would."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except ProviderRetryable:
            await asyncio.sleep(0.01)
    return await call()


async def test_happy_path_lifecycle(fake: FakeHetzner, provider: HetznerProvider) -> None:
    info = await provider.create(spec(locations=["fsn1"], user_data="#cloud-config\n"))
    assert info.state == VmState.PROVISIONING  # accepted, not awaited
    assert info.location == "fsn1"
    assert info.labels == {"managed-by": "slopbox", "vps-id": "vps-1"}
    assert info.vps_id == "vps-1"
    # A cloud gateway serves TLS only (issue 9 #4): the control plane pins the certificate the VM reported.
    assert info.host and provider.gateway_url(info) == f"https://{info.host}:18789"

    server = fake.servers[int(info.provider_ref)]
    assert server["name"] == server_name("vps-1") == "slopbox-vps-vps-1"
    [fw] = fake.firewalls.values()
    assert fw["name"] == "slopbox-gateway"
    assert fw["rules"] == [
        {
            "direction": "in",
            "protocol": "tcp",
            "port": "18789",
            "source_ips": [f"{CP_IP}/32"],
            "destination_ips": [],
            "description": "openclaw gateway from the slopbox control plane",
        }
    ]
    assert server["public_net"]["firewalls"] == [{"id": fw["id"], "status": "applied"}]
    assert fake.calls("POST /servers")[0].body["firewalls"] == [{"firewall": fw["id"]}]

    await reach(provider, info.provider_ref, VmState.RUNNING)
    assert fake.calls("GET /actions/*") == []  # the provider never polls actions

    await provider.stop(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.STOPPED)
    await provider.stop(info.provider_ref)  # idempotent
    assert len(fake.calls("POST /servers/*/actions/shutdown")) == 1

    await provider.start(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.RUNNING)
    await provider.start(info.provider_ref)  # idempotent
    assert len(fake.calls("POST /servers/*/actions/poweron")) == 1

    await provider.destroy(info.provider_ref)
    await gone(provider, info.provider_ref)
    assert fake.servers == {}
    await provider.destroy(info.provider_ref)  # already gone = done

    with pytest.raises(VmNotFound):
        await provider.start(info.provider_ref)
    with pytest.raises(VmNotFound):
        await provider.stop(info.provider_ref)


async def test_create_returns_while_the_server_is_still_initializing(
    fake: FakeHetzner, provider: HetznerProvider
) -> None:
    fake.create_delay_s = math.inf  # Hetzner keeps the server "initializing"
    info = await provider.create(spec())
    assert info.state == VmState.PROVISIONING and info.raw_state == "initializing"
    assert fake.calls("GET /actions/*") == []

    again = await provider.create(spec())  # a retried create adopts it, still without waiting
    assert again.provider_ref == info.provider_ref and again.state == VmState.PROVISIONING
    assert len(fake.servers) == 1 and len(fake.calls("POST /servers")) == 1
    await provider.start(info.provider_ref)  # booting already: nothing to submit
    assert fake.calls("POST /servers/*/actions/*") == []
    with pytest.raises(ProviderRetryable) as err:  # an action holds the server: retry later
        await provider.stop(info.provider_ref)
    assert err.value.code == "locked"

    fake.finish_pending("create_server")
    await reach(provider, info.provider_ref, VmState.STARTING)
    fake.finish_pending("start_server")
    await reach(provider, info.provider_ref, VmState.RUNNING)


async def test_create_twice_is_one_server(fake: FakeHetzner, provider: HetznerProvider) -> None:
    first = await provider.create(spec())
    second = await provider.create(spec())
    assert first.provider_ref == second.provider_ref
    assert len(fake.servers) == 1
    assert len(fake.calls("POST /servers")) == 1
    assert len(fake.firewalls) == 1


async def test_adopts_after_uniqueness_error(fake: FakeHetzner, make_provider: ProviderFactory) -> None:
    """hcloud re-sends a POST whose answer was lost; Hetzner says uniqueness_error; we adopt."""
    provider = make_provider(client_retries=1, client_retry_base_s=0.01)
    fake.lose_response_next("POST /servers")
    info = await provider.create(spec())
    assert info.provider_ref == str(next(iter(fake.servers)))
    assert len(fake.servers) == 1
    assert [c.status for c in fake.calls("POST /servers")] == [504, 409]


async def test_lost_create_response_is_retryable_then_adopted(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.create_delay_s = math.inf
    fake.lose_response_next("POST /servers")  # Hetzner made the server, the answer got lost
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert err.value.code == "timeout"
    info = await provider.create(spec())
    assert len(fake.servers) == 1
    assert info.provider_ref == str(next(iter(fake.servers)))
    assert info.state == VmState.PROVISIONING
    assert len(fake.calls("POST /servers")) == 1


async def test_refuses_to_adopt_a_server_that_is_not_ours(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.add_server(server_name("vps-1"), labels={"owner": "someone-else"})
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec())
    assert not err.value.retryable


async def test_429_is_retryable_with_retry_after(fake: FakeHetzner, provider: HetznerProvider) -> None:
    reset = int(time.time()) + 10
    fake.fail_next("POST /servers", status=429, headers={"RateLimit-Remaining": "0", "RateLimit-Reset": str(reset)})
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert err.value.retryable
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.retry_after_s is not None and 1.0 <= err.value.retry_after_s <= 11.0
    assert fake.servers == {}
    await provider.create(spec())  # the retry succeeds
    assert len(fake.servers) == 1


async def test_429_prefers_retry_after_header(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.fail_next("GET /servers", status=429, headers={"Retry-After": "7"})
    with pytest.raises(ProviderRetryable) as err:
        await provider.list_managed()
    assert err.value.retry_after_s == 7.0
    fake.fail_next("POST /servers", status=429, headers={"Retry-After": "3"})
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert err.value.retryable and err.value.retry_after_s == 3.0


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, None), (503, None), (502, "<html>bad gateway</html>")],
)
async def test_5xx_is_retryable(fake: FakeHetzner, provider: HetznerProvider, status: int, body: str | None) -> None:
    info = await provider.create(spec())
    fake.fail_next("GET /servers/*", status=status, body=body)
    with pytest.raises(ProviderRetryable) as err:
        await provider.get(info.provider_ref)
    assert err.value.retryable
    assert await provider.get(info.provider_ref) is not None


async def test_timeout_is_retryable(fake: FakeHetzner, make_provider: ProviderFactory) -> None:
    provider = make_provider(request_timeout_s=0.2)
    fake.hang_next("GET /servers", seconds=2)
    with pytest.raises(ProviderRetryable) as err:
        await provider.list_managed()
    assert err.value.code == "timeout"


async def test_locked_is_retryable(fake: FakeHetzner, provider: HetznerProvider) -> None:
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.RUNNING)
    fake.fail_next("POST /servers/*/actions/shutdown", status=423, code="locked", message="server is locked")
    with pytest.raises(ProviderRetryable):
        await provider.stop(info.provider_ref)


async def test_invalid_token_is_fatal_with_message(make_provider: ProviderFactory) -> None:
    provider = make_provider(token="wrong-token")
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec())
    assert not err.value.retryable
    assert err.value.code == "unauthorized"
    assert "unable to authenticate" in err.value.message
    assert "wrong-token" not in str(err.value)


async def test_invalid_input_is_fatal_with_message(fake: FakeHetzner, provider: HetznerProvider) -> None:
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec(server_type="cx9000"))
    assert err.value.code == "invalid_input"
    assert "server_type" in err.value.message
    assert fake.servers == {}


async def test_quota_is_fatal(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.server_limit = 0
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec())
    assert err.value.code == "resource_limit_exceeded"


async def test_falls_back_to_next_location(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.resource_unavailable_in = {"fsn1"}
    fake.placement_error_in = {"nbg1"}
    info = await provider.create(spec(locations=["fsn1", "nbg1", "hel1"]))
    assert info.location == "hel1"
    assert [c.body["location"] for c in fake.calls("POST /servers")] == ["fsn1", "nbg1", "hel1"]


async def test_all_locations_unavailable(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.resource_unavailable_in = {"fsn1", "nbg1"}
    with pytest.raises(CapacityUnavailable) as err:
        await provider.create(spec(locations=["fsn1", "nbg1"]))
    assert err.value.tried == ["fsn1", "nbg1"]
    assert "fsn1" in err.value.message and "nbg1" in err.value.message
    assert fake.servers == {}


async def test_list_managed_ignores_foreign_servers(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.add_server("someone-elses", labels={"team": "web"})
    fake.add_server("other-tool", labels={"managed-by": "terraform", "vps-id": "x"})
    mine = await provider.create(spec("vps-a"))
    other = await provider.create(spec("vps-b"))
    listed = await provider.list_managed()
    assert sorted(i.provider_ref for i in listed) == sorted([mine.provider_ref, other.provider_ref])
    assert {i.vps_id for i in listed} == {"vps-a", "vps-b"}


async def test_failed_create_action_shows_as_error_and_a_retry_starts_clean(
    fake: FakeHetzner, provider: HetznerProvider
) -> None:
    fake.action_errors_next("create_server", message="host exploded")
    info = await provider.create(spec())
    failed = await reach(provider, info.provider_ref, VmState.ERROR)
    assert failed.detail is not None and "host exploded" in failed.detail
    # A retried create deletes the broken server and asks to be retried; later it makes a new one.
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert "host exploded" in err.value.message
    fresh = await retried(lambda: provider.create(spec()))
    assert fresh.provider_ref != info.provider_ref
    await reach(provider, fresh.provider_ref, VmState.RUNNING)
    assert list(fake.servers) == [int(fresh.provider_ref)]


async def test_failed_start_action_shows_as_error_and_start_again_works(
    fake: FakeHetzner, provider: HetznerProvider
) -> None:
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.RUNNING)
    await provider.stop(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.STOPPED)
    fake.action_errors_next("start_server", message="no power")
    await provider.start(info.provider_ref)  # accepted; the action fails later
    failed = await reach(provider, info.provider_ref, VmState.ERROR)
    assert failed.detail == "start_server failed: no power"
    await provider.start(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.RUNNING)


async def test_slow_boot_is_not_waited_for(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.never_boot = True
    info = await provider.create(spec())
    assert info.state == VmState.PROVISIONING
    fake.never_boot = False
    fake.finish_pending("create_server")
    assert (await reach(provider, info.provider_ref, VmState.STARTING)).raw_state == "starting"
    waited = await provider.wait_until_running(info.provider_ref, timeout_s=0.05, poll_s=0.01)
    assert waited is not None and waited.state == VmState.STARTING
    fake.finish_pending("start_server")
    await reach(provider, info.provider_ref, VmState.RUNNING)


async def test_never_booting_vm_can_be_destroyed(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.never_boot = True
    info = await provider.create(spec())
    await provider.destroy(info.provider_ref)
    await gone(provider, info.provider_ref)


async def test_destroy_returns_once_accepted_and_get_later_says_gone(
    fake: FakeHetzner, provider: HetznerProvider
) -> None:
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.RUNNING)
    fake.delete_delay_s = math.inf
    await provider.destroy(info.provider_ref)
    deleting = await provider.get(info.provider_ref)
    assert deleting is not None and deleting.state == VmState.DELETING
    await provider.destroy(info.provider_ref)  # in progress = accepted, nothing re-sent
    assert len(fake.calls("DELETE /servers/*")) == 1
    with pytest.raises(ProviderRetryable):  # adopting a server that is being deleted: retry later
        await provider.create(spec())
    with pytest.raises(VmNotFound):
        await provider.start(info.provider_ref)
    fake.finish_pending("delete_server")
    assert await provider.get(info.provider_ref) is None
    assert await provider.wait_until_gone(info.provider_ref, timeout_s=0) is None


async def test_graceful_stop_ignored_then_force_stop(fake: FakeHetzner, provider: HetznerProvider) -> None:
    info = await provider.create(spec())
    await reach(provider, info.provider_ref, VmState.RUNNING)
    fake.ignore_shutdown = True
    await provider.stop(info.provider_ref)
    fake.finish_pending("shutdown_server")
    await reach(provider, info.provider_ref, VmState.RUNNING)  # the OS ignored the ACPI shutdown
    await provider.force_stop(info.provider_ref)
    await reach(provider, info.provider_ref, VmState.STOPPED)
    await provider.force_stop(info.provider_ref)  # stopped = no-op
    assert len(fake.calls("POST /servers/*/actions/poweroff")) == 1


async def test_firewall_rules_follow_control_plane_ips(fake: FakeHetzner, make_provider: ProviderFactory) -> None:
    await make_provider().create(spec("vps-a"))
    await make_provider(control_plane_ips=["203.0.113.9", "2001:db8::1"]).create(spec("vps-b"))
    [fw] = fake.firewalls.values()
    assert fw["rules"][0]["source_ips"] == ["203.0.113.9/32", "2001:db8::1/128"]
    assert len(fake.calls("POST /firewalls/*/actions/set_rules")) == 1


async def test_empty_control_plane_ips_is_fatal(fake: FakeHetzner, make_provider: ProviderFactory) -> None:
    with pytest.raises(ProviderFatal):
        await make_provider(control_plane_ips=[]).create(spec())
    assert fake.servers == {}


async def test_secret_env_is_refused(provider: HetznerProvider) -> None:
    with pytest.raises(ProviderFatal):
        await provider.create(spec(secret_env={"OPENCLAW_GATEWAY_TOKEN": "s3cret"}))


async def test_build_provider_from_settings(fake: FakeHetzner) -> None:
    settings = Settings(hcloud_token=fake.token, hcloud_api_endpoint=fake.base_url, control_plane_ips=[CP_IP])  # type: ignore[call-arg]
    provider = build_provider("hetzner", settings, poll_interval_s=0.01)
    assert isinstance(provider, HetznerProvider)
    assert await provider.list_managed() == []
    with pytest.raises(ProviderFatal):
        build_provider("hetzner", Settings(control_plane_ips=[CP_IP]))  # type: ignore[call-arg]


def test_fake_runs_in_a_thread_for_sync_clients() -> None:
    fake = FakeHetzner()
    url = fake.start_in_thread()
    try:
        client = Client(token=fake.token, api_endpoint=url, poll_interval=0.01)
        assert client.servers.get_all() == []
        fake.add_server("x", labels={"a": "b"})
        assert [s.name for s in client.servers.get_all(label_selector="a=b")] == ["x"]
    finally:
        fake.stop()
