"""HetznerProvider against the fake Hetzner API, through the real hcloud client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hcloud import Client

from providers import (
    CapacityUnavailable,
    ProviderFatal,
    ProviderRetryable,
    VmNotFound,
    VmSpec,
    VmState,
    build_provider,
)
from providers.hetzner import HetznerProvider, server_name
from settings import Settings
from tests.fakes.hetzner_api import FakeHetzner

CP_IP = "198.51.100.7"


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
            "poll_interval_s": 0.01,
            "poll_max_interval_s": 0.02,
            "boot_timeout_s": 5.0,
            "stop_timeout_s": 2.0,
            "destroy_timeout_s": 2.0,
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


async def test_happy_path_lifecycle(fake: FakeHetzner, provider: HetznerProvider) -> None:
    info = await provider.create(spec(locations=["fsn1"], user_data="#cloud-config\n"))
    assert info.state == VmState.RUNNING
    assert info.location == "fsn1"
    assert info.labels == {"managed-by": "slopbox", "vps-id": "vps-1"}
    assert info.vps_id == "vps-1"
    assert info.host and provider.gateway_url(info) == f"http://{info.host}:18789"

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

    got = await provider.get(info.provider_ref)
    assert got is not None and got.state == VmState.RUNNING

    await provider.stop(info.provider_ref)
    got = await provider.get(info.provider_ref)
    assert got is not None and got.state == VmState.STOPPED
    await provider.stop(info.provider_ref)  # idempotent

    await provider.start(info.provider_ref)
    got = await provider.get(info.provider_ref)
    assert got is not None and got.state == VmState.RUNNING
    await provider.start(info.provider_ref)  # idempotent

    await provider.destroy(info.provider_ref)
    assert await provider.get(info.provider_ref) is None
    assert fake.servers == {}
    await provider.destroy(info.provider_ref)  # already gone = done

    with pytest.raises(VmNotFound):
        await provider.start(info.provider_ref)
    with pytest.raises(VmNotFound):
        await provider.stop(info.provider_ref)


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
    fake.fail_next("POST /servers", status=504, code="timeout", commit=True)
    info = await provider.create(spec())
    assert info.state == VmState.RUNNING
    assert len(fake.servers) == 1
    assert [c.status for c in fake.calls("POST /servers")] == [504, 409]


async def test_lost_create_response_is_retryable_then_adopted(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.fail_next("POST /servers", status=504, code="timeout", commit=True)
    with pytest.raises(ProviderRetryable):
        await provider.create(spec())
    info = await provider.create(spec())
    assert len(fake.servers) == 1
    assert info.provider_ref == str(next(iter(fake.servers)))
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
    info = await provider.create(spec())  # the retry succeeds
    assert info.state == VmState.RUNNING
    assert len(fake.servers) == 1


async def test_429_prefers_retry_after_header(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.fail_next("GET /servers", status=429, headers={"Retry-After": "7"})
    with pytest.raises(ProviderRetryable) as err:
        await provider.list_managed()
    assert err.value.retry_after_s == 7.0


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


async def test_failed_create_action_cleans_up_and_retries(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.action_errors_next("create_server", message="host exploded")
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert "host exploded" in err.value.message
    assert fake.servers == {}  # the broken server was deleted
    info = await provider.create(spec())
    assert info.state == VmState.RUNNING
    assert len(fake.servers) == 1


async def test_failed_start_action_is_retryable(fake: FakeHetzner, provider: HetznerProvider) -> None:
    info = await provider.create(spec())
    await provider.stop(info.provider_ref)
    fake.action_errors_next("start_server", message="no power")
    with pytest.raises(ProviderRetryable):
        await provider.start(info.provider_ref)
    await provider.start(info.provider_ref)
    got = await provider.get(info.provider_ref)
    assert got is not None and got.state == VmState.RUNNING


async def test_slow_boot_is_waited_for(fake: FakeHetzner, provider: HetznerProvider) -> None:
    fake.boot_delay_s = 0.2
    info = await provider.create(spec())
    assert info.state == VmState.RUNNING


async def test_never_booting_vm_returns_after_bound_and_can_be_destroyed(
    fake: FakeHetzner, make_provider: ProviderFactory
) -> None:
    fake.never_boot = True
    provider = make_provider(boot_timeout_s=0.2)
    info = await provider.create(spec())
    assert info.state == VmState.STARTING
    waited = await provider.wait_until_running(info.provider_ref, timeout_s=0.1, poll_s=0.02)
    assert waited is not None and waited.state == VmState.STARTING
    await provider.destroy(info.provider_ref)
    assert await provider.get(info.provider_ref) is None


async def test_stop_falls_back_to_power_off(fake: FakeHetzner, make_provider: ProviderFactory) -> None:
    provider = make_provider(stop_timeout_s=0.2)
    info = await provider.create(spec())
    fake.ignore_shutdown = True
    await provider.stop(info.provider_ref)
    got = await provider.get(info.provider_ref)
    assert got is not None and got.state == VmState.STOPPED
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
    provider = build_provider("hetzner", settings, poll_interval_s=0.01, poll_max_interval_s=0.02)
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
