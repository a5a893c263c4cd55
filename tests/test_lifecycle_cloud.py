"""Provisioning on Hetzner and Fly: real hcloud/httpx clients against fake provider APIs, and an
emulated VM that boots the way a real one does (bootstrap redemption, pairing, ready report)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psycopg
import pytest
import pytest_asyncio
from pydantic import SecretStr
from temporalio.client import Client

from api.app import create_app as create_api
from providers import build_provider
from settings import Settings
from tests import vm_emulator
from tests.conftest import free_port
from tests.fakes.fly_api import FakeFly
from tests.fakes.hetzner_api import FakeHetzner
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, Stack, operation_handle, running_stack
from tests.proxy_harness import add_session, running_proxy
from tests.test_web_app import PASSWORD, log_in
from web import auth
from web.app import create_app as create_web
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def eventually(check, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition never became true")


@pytest_asyncio.fixture(loop_scope="session")
async def hetzner() -> AsyncIterator[FakeHetzner]:
    fake = FakeHetzner()
    await fake.start()
    fake.fixed_ipv4 = "127.0.0.1"
    yield fake
    await fake.aclose()


def hetzner_settings(settings: Settings, fake: FakeHetzner) -> Settings:
    return settings.model_copy(update={"hcloud_token": SecretStr(fake.token), "hcloud_api_endpoint": fake.base_url,
                                       "control_plane_ips": ["127.0.0.1"]})


async def test_hetzner_provision_stop_start_destroy(settings: Settings, temporal_client: Client, db: str,
                                                    sql: psycopg.Connection, hetzner: FakeHetzner,
                                                    tmp_path: Path) -> None:
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        resp = await stack.provision(user, agent, "hetzner")
        assert resp.status_code == 202, resp.text
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        user_data = hetzner.user_data[server_id]
        # Provider-stored metadata holds no long-lived secret: not the gateway token, not our keys.
        token = sql.execute("SELECT gateway_token FROM agents WHERE id = %s", (agent,)).fetchone()[0]  # type: ignore[index]
        from db.encryption import keyring
        assert keyring().decrypt(token) not in user_data
        server = hetzner.servers[server_id]
        assert server["labels"] == {"managed-by": "slopbox", "vps-id": resp.json()["vps_id"]}
        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(user_data), vm_emulator.SYSTEMD_LAYOUT,
                                    stack.api, port=port, state_dir=tmp_path / "vm") as vm:
            assert vm["secrets"]["env"]["OPENCLAW_GATEWAY_TOKEN"] == keyring().decrypt(token)
            vps = await stack.wait_vps(user, agent, "running", "error")
            assert vps["state"] == "running", vps["last_error"]
            assert vps["region"] == "fsn1"
            assert (await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))).status_code == 202
            await stack.wait_vps(user, agent, "stopped")
            assert hetzner.servers[server_id]["status"] == "off"
            assert (await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))).status_code == 202
            assert (await stack.wait_vps(user, agent, "running", "error"))["state"] == "running"
            assert hetzner.servers[server_id]["status"] == "running"
        assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
        await stack.wait_vps(user, agent, "destroyed")
        assert hetzner.servers == {}
        assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 200


async def test_hetzner_rate_limited_then_created_once(settings: Settings, temporal_client: Client, db: str,
                                                      sql: psycopg.Connection, hetzner: FakeHetzner,
                                                      tmp_path: Path) -> None:
    hetzner.fail_next("POST /servers", 429, times=2, code="rate_limit_exceeded", message="rate limit exceeded",
                      headers={"Retry-After": "1", "RateLimit-Remaining": "0"})
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(hetzner.user_data[server_id]),
                                    vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port, state_dir=tmp_path / "vm"):
            assert (await stack.wait_vps(user, agent, "running", "error"))["state"] == "running"
        assert len(hetzner.calls("POST /servers")) == 3  # two 429s, then one create
        assert len(hetzner.servers) == 1
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")


async def test_a_provider_outage_is_visible_while_its_step_is_retried(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner,
        tmp_path: Path) -> None:
    """Hetzner answers 503 to every create: Temporal retries the step by itself, and meanwhile the API,
    the agent's page and the onboarding progress say which attempt failed and why, not only `running`.
    Once the provider is back the provision ends running and the note is gone."""
    hetzner.fail_next("POST /servers", 503, times=10_000, code="unavailable", message="service unavailable",
                      headers={"Retry-After": "2"})
    port = free_port()
    cloud = hetzner_settings(settings, hetzner).model_copy(update={"web_public_url": "http://127.0.0.1:3000"})
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    email = f"retry-{uuid.uuid4().hex[:8]}@example.com"
    user = make_user(sql, plan="starter", email=email)
    sql.execute('UPDATE users SET "emailVerified" = now(), password_hash = %s WHERE id = %s',
                (auth.hash_password(PASSWORD), user))
    api = create_api(cloud)
    api.state.lifecycle_timeouts = FAST
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack, \
            api.router.lifespan_context(api):
        web = create_web(cloud, api_transport=httpx.ASGITransport(app=api))
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202

        op = await until_operation(stack, user, agent, lambda op: (op["retrying"] or {}).get("attempt", 0) >= 2)
        note = op["retrying"]
        assert op["status"] == "running" and op["step"] == "create_vm" and note["step"] == "create_vm", op
        assert "503" in note["error"] or "unavailable" in note["error"], note
        waits = datetime.fromisoformat(note["next_attempt_at"]) - datetime.fromisoformat(note["failed_at"])
        assert waits == timedelta(seconds=2), note  # the provider's Retry-After, as Temporal waits it
        assert hetzner.servers == {}  # nothing was made meanwhile
        same = await stack.api.get(f"/agents/{agent}/operations/{op['id']}", headers=headers(user))
        assert same.status_code == 200 and same.json()["retrying"]["step"] == "create_vm", same.text

        async with web.router.lifespan_context(web), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=web), base_url=cloud.web_url) as browser:
            assert (await log_in(browser, email)).status_code in (200, 303)
            page = (await browser.get(f"/agents/{agent}")).text
            shown = re.search(r'<p class="notice" id="retrying" role="status">([^<]+)</p>', page)
            assert shown and "of step create_vm failed:" in shown.group(1), page
            assert "tried again automatically" in shown.group(1)
            status = (await browser.get(f"/onboarding/{agent}/status")).json()
            assert status["phase"] == "working" and "of step create_vm failed" in status["retrying"], status

        hetzner.clear_faults()
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None), timeout=60)
        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(hetzner.user_data[server_id]),
                                    vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port, state_dir=tmp_path / "vm"):
            vps = await stack.wait_vps(user, agent, "running", "error")
            assert vps["state"] == "running", vps["last_error"]
        done = (await stack.api.get(f"/agents/{agent}/operations/{op['id']}", headers=headers(user))).json()
        assert done["status"] == "succeeded" and done["retrying"] is None, done
        assert sql.execute("SELECT retrying FROM vps_operations WHERE id = %s", (op["id"],)).fetchone() == (None,)
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")


async def test_a_destroy_cancels_a_provision_whose_provider_keeps_failing(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner) -> None:
    """Between two attempts of a create that keeps failing, the user destroys the VPS: the provision
    ends `cancelled` and creates nothing more, and the VPS is destroyed."""
    hetzner.fail_next("POST /servers", 503, times=10_000, code="unavailable", message="service unavailable")
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=free_port(), poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        provision = (await stack.provision(user, agent, "hetzner")).json()

        await until_operation(stack, user, agent, lambda op: op["retrying"] is not None)
        destroy = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        assert destroy.status_code == 202, destroy.text
        await stack.wait_vps(user, agent, "destroyed", timeout=60)
        cancelled = (await stack.api.get(f"/agents/{agent}/operations/{provision['operation_id']}",
                                         headers=headers(user))).json()
        assert cancelled["status"] == "cancelled" and cancelled["error"] == "provisioning was cancelled", cancelled
        tried = len(hetzner.calls("POST /servers"))
        await asyncio.sleep(3)  # longer than the retry interval so far: a live provision would try again
        assert len(hetzner.calls("POST /servers")) == tried
        assert hetzner.servers == {}


async def test_a_cancel_does_not_stop_the_removal_of_a_failed_provisions_vm(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner) -> None:
    """The gateway never answers (no VM boots it here), so the provision fails and removes its server;
    Hetzner answers that DELETE with 503 for a while. A cancel that arrives during that clean-up must not
    stop it: the provision ends `failed` with its own reason, the server gone, nothing left for Reconcile."""
    hetzner.fail_next("DELETE /servers/[0-9]*", 503, times=10_000, code="unavailable", message="service unavailable")
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=free_port(), poll_interval_s=0.05)
    quick = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 2})
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}, timeouts=quick) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        provision = (await stack.provision(user, agent, "hetzner")).json()

        await until_operation(stack, user, agent,
                              lambda op: op["step"] == "compensate_destroy_vm" and op["retrying"] is not None)
        cancel = await stack.api.post(f"/agents/{agent}/operations/{provision['operation_id']}/cancel",
                                      headers=headers(user))
        assert cancel.status_code == 202 and cancel.json()["status"] == "cancelling", cancel.text
        await asyncio.sleep(1)
        hetzner.clear_faults()
        vps = await stack.wait_vps(user, agent, "error", timeout=90)
        done = (await stack.api.get(cancel.json()["status_url"], headers=headers(user))).json()
        assert done["status"] == "failed" and "did not become ready within 2s" in done["error"], done
        assert "removing the VM failed" not in done["error"], done
        assert vps["needs_cleanup"] is False and hetzner.servers == {}, (vps, hetzner.servers)
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")


async def until_operation(stack: Stack, user: uuid.UUID, agent: str,
                          wanted: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """The agent's operation in flight, polled like the web app does, once `wanted` holds for it."""
    deadline = time.monotonic() + timeout
    op = None
    while time.monotonic() < deadline:
        op = (await stack.agent(user, agent))["vps"]["operation"]
        if op and wanted(op):
            return op  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError(f"the operation never got there; last seen {op}")


async def test_hetzner_create_answered_504_after_committing_still_ends_running(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner,
        tmp_path: Path) -> None:
    """Issue 8 #1: the retry adopts the server the first attempt made, which must hold the same bootstrap
    token (it used to get a new one, so the VM's redeem answered 401 and compensation destroyed it)."""
    hetzner.fail_next("POST /servers", 504, commit=True, code="timeout", message="gateway timeout")
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        # Let the retry happen before the VM boots with the first attempt's user-data.
        await eventually(lambda: len(hetzner.calls("POST /servers")) >= 2 or
                         sql.execute("SELECT provider_ref FROM vpses").fetchone()[0])  # type: ignore[index]
        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(hetzner.user_data[server_id]),
                                    vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port, state_dir=tmp_path / "vm"):
            vps = await stack.wait_vps(user, agent, "running", "error")
            assert vps["state"] == "running", vps["last_error"]
        assert list(hetzner.servers) == [server_id]  # adopted, not duplicated
        assert sql.execute("SELECT bootstrap_token FROM vpses").fetchone() == (None,)  # redeemed: gone
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")
        assert hetzner.servers == {}


async def test_a_retried_create_adopts_the_vm_that_already_redeemed_its_token(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner,
        tmp_path: Path) -> None:
    """The create's answer is lost and its VM boots and redeems the token before the retry runs: the
    retry adopts that VM instead of minting a new token, so the VM's ready report (with its
    certificate pin) is accepted. (It used to answer 401: the chaos run's "ready answered 401".)"""
    hetzner.lose_response_next("POST /servers")
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        resp = await stack.provision(user, agent, "hetzner")
        assert resp.status_code == 202
        vps_id = resp.json()["vps_id"]
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        hetzner.fail_next("GET /servers", 503, times=1000)  # the retry waits until the VM has redeemed
        before = len(hetzner.calls("GET /servers"))

        async def retry_runs_now() -> None:
            hetzner.clear_faults()
            await eventually(lambda: sql.execute("SELECT provider_ref FROM vpses WHERE id = %s",
                                                 (vps_id,)).fetchone()[0])  # type: ignore[index]

        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(hetzner.user_data[server_id]),
                                    vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port, state_dir=tmp_path / "vm",
                                    after_redeem=retry_runs_now):
            vps = await stack.wait_vps(user, agent, "running", "error")
            assert vps["state"] == "running", vps["last_error"]
        assert len(hetzner.calls("GET /servers")) > before  # the retry did run after the redemption
        assert list(hetzner.servers) == [server_id]
        assert len(hetzner.calls("POST /servers")) == 1
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")
        assert hetzner.servers == {}


async def test_hetzner_status_polls_ride_out_a_run_of_5xx(settings: Settings, temporal_client: Client, db: str,
                                                          sql: psycopg.Connection, hetzner: FakeHetzner,
                                                          tmp_path: Path) -> None:
    """A provider hiccup while waiting for the VM is waited out inside the poll (until its deadline),
    not spent against the poll's three attempts: twelve 503s in a row used to fail the provision."""
    hetzner.fail_next("GET /servers/[0-9]*", 503, times=12, code="unavailable", message="unavailable")
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(hetzner.user_data[server_id]),
                                    vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port, state_dir=tmp_path / "vm"):
            vps = await stack.wait_vps(user, agent, "running", "error")
            assert vps["state"] == "running", vps["last_error"]
        assert len(hetzner.calls("GET /servers/[0-9]*")) > 12  # every fault was met, then a good answer
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")


async def test_hetzner_gateway_never_ready_leaves_no_server(settings: Settings, temporal_client: Client, db: str,
                                                            sql: psycopg.Connection, hetzner: FakeHetzner) -> None:
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=free_port(), poll_interval_s=0.05)
    short = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 2})
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}, timeouts=short) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        vps = await stack.wait_vps(user, agent, "error", "running")
    assert vps["state"] == "error"
    assert vps["last_error"].startswith("provisioning failed: the gateway did not become ready within 2s")
    assert hetzner.servers == {}  # created, then compensated: nothing billed to us is left


async def test_hetzner_invalid_token_fails_fast_with_the_providers_message(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner) -> None:
    cloud = hetzner_settings(settings, hetzner).model_copy(update={"hcloud_token": SecretStr("wrong")})
    provider = build_provider("hetzner", cloud, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        vps = await stack.wait_vps(user, agent, "error", "running")
    assert vps["state"] == "error" and "unable to authenticate" in vps["last_error"].lower()
    assert hetzner.servers == {}


async def test_fly_provision_and_destroy(settings: Settings, temporal_client: Client, db: str,
                                         sql: psycopg.Connection, tmp_path: Path) -> None:
    fake = FakeFly()
    await fake.start()
    try:
        port = free_port()
        cloud = settings.model_copy(update={"fly_api_token": SecretStr(fake.token), "fly_api_base_url": fake.base_url})
        provider = build_provider("fly", cloud, gateway_host="127.0.0.1", gateway_port=port)
        async with running_stack(cloud, temporal_client, providers={"fly": provider}) as stack:
            user = make_user(sql, plan="starter")
            agent = await stack.new_agent(user)
            resp = await stack.provision(user, agent, "fly")
            assert resp.status_code == 202, resp.text
            machine = await eventually(lambda: next(iter(fake.machines.values()), None))
            config = machine["config"]
            assert config["metadata"]["vps_id"] == resp.json()["vps_id"]
            assert not any("TOKEN" in k or "KEY" in k for k in config["env"])  # Fly shows env to anyone
            async with vm_emulator.boot(vm_emulator.files_from_fly_config(config), vm_emulator.FLY_LAYOUT,
                                        stack.api, port=port, state_dir=tmp_path / "vm"):
                vps = await stack.wait_vps(user, agent, "running", "error")
                assert vps["state"] == "running", vps["last_error"]
            assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
            await stack.wait_vps(user, agent, "destroyed")
            assert [m for m in fake.machines.values() if m["state"] != "destroyed"] == []
    finally:
        await fake.aclose()


# -- issue 9 #4: the control channel to a cloud VM is TLS, pinned to the certificate the VM reported --


async def test_cloud_gateway_is_reached_over_tls_pinned_to_the_reported_certificate(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner,
        tmp_path: Path) -> None:
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        files = vm_emulator.files_from_cloud_init(hetzner.user_data[server_id])
        async with vm_emulator.boot(files, vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port,
                                    state_dir=tmp_path / "vm") as vm:
            # The emulated gateway serves only HTTPS/WSS: running means pairing and the config push
            # went over wss:// to it, trusting the certificate the VM reported.
            vps = await stack.wait_vps(user, agent, "running", "error")
            assert vps["state"] == "running", vps["last_error"]
            row = sql.execute("SELECT gateway_url, gateway_cert_sha256, relay_device_token IS NOT NULL FROM vpses "
                              "WHERE id = %s", (vps["id"],)).fetchone()
            assert row == (f"https://127.0.0.1:{port}", vm["cert_sha256"], True)
            # The pin is write-once: a later report (the token is in provider metadata) cannot swap it.
            conf = vm["conf"]
            token = files[vm_emulator.SYSTEMD_LAYOUT.bootstrap_token_file].strip()
            path = conf["BOOTSTRAP_URL"].split("://", 1)[1].split("/", 1)[1]
            swap = await stack.api.post(f"/{path}/ready", headers={"Authorization": f"Bearer {token}"},
                                        json={"status": "ready", "gateway_cert_sha256": "ab" * 32})
            assert swap.status_code == 409
            for body in ({"status": "ready"}, {"status": "ready", "gateway_cert_sha256": "not-a-fingerprint"}):
                bad = await stack.api.post(f"/{path}/ready", headers={"Authorization": f"Bearer {token}"}, json=body)
                assert bad.status_code == 400, bad.text  # a cloud VM's report must carry a real SHA-256
            assert sql.execute("SELECT gateway_cert_sha256 FROM vpses WHERE id = %s",
                               (vps["id"],)).fetchone() == (vm["cert_sha256"],)

            # The proxy reads the URL and pin from the row: no provider token in its settings at all
            # (and it cannot build a provider client: the import contract in pyproject.toml).
            no_tokens = settings.model_copy(update={"hcloud_token": None, "fly_api_token": None})
            async with running_proxy(no_tokens) as proxy, aiohttp.ClientSession() as browser:
                cookie = {"Cookie": f"authjs.session-token={add_session(sql, user)}"}
                page = await browser.get(f"{proxy.url}/agents/{agent}/gateway/", headers=cookie)
                assert page.status == 200, await page.text()
                assert "<html" in (await page.text()).lower()
                async with browser.ws_connect(f"{proxy.url}/agents/{agent}/gateway", headers=cookie,
                                              origin=proxy.url) as ws:
                    first = await ws.receive_json(timeout=10)
                    assert first["event"] == "connect.challenge"  # relayed from the pinned wss upstream

                # Another certificate at that address (simulated by changing the pin): nothing is forwarded.
                sql.execute("UPDATE vpses SET gateway_cert_sha256 = %s WHERE id = %s", ("cd" * 32, vps["id"]))
                refused = await browser.get(f"{proxy.url}/agents/{agent}/gateway/", headers=cookie)
                assert refused.status == 502
                with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                    await browser.ws_connect(f"{proxy.url}/agents/{agent}/gateway", headers=cookie, origin=proxy.url)
                assert exc.value.status == 502
                # And an https gateway with no pin is never contacted.
                sql.execute("UPDATE vpses SET gateway_cert_sha256 = NULL WHERE id = %s", (vps["id"],))
                assert (await browser.get(f"{proxy.url}/agents/{agent}/gateway/", headers=cookie)).status == 503
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")


async def test_a_certificate_other_than_the_pin_fails_gateway_operations_without_retries(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner,
        tmp_path: Path) -> None:
    """A running cloud VPS whose gateway no longer presents the pinned certificate (simulated by
    changing the pin): the settings push and a restart fail at their first attempt with the reason
    on the API; pin errors are final (workflows/lifecycle.py DETERMINISTIC), never retried."""
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(hetzner.user_data[server_id]),
                                    vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port, state_dir=tmp_path / "vm"):
            vps = await stack.wait_vps(user, agent, "running", "error")
            assert vps["state"] == "running", vps["last_error"]
            sql.execute("UPDATE vpses SET gateway_cert_sha256 = %s WHERE id = %s", ("ef" * 32, vps["id"]))
            for method, path, body, activity_type in (
                    ("PATCH", "settings", {"files": {"SOUL.md": "hi\n"}}, "vps.push_config"),
                    ("POST", "restart", None, "agent.restart_gateway")):
                resp = await stack.api.request(method, f"/agents/{agent}/{path}", json=body, headers=headers(user))
                assert resp.status_code == 202, resp.text
                handle = await operation_handle(temporal_client, resp.json()["operation_id"])
                result = await handle.result()
                assert result["status"] == "failed" and "certificate" in result["error"], result
                if activity_type == "vps.push_config":  # named as the readiness poll names it
                    assert "refused the gateway's TLS certificate" in result["error"], result
                events = [e async for e in handle.fetch_history_events()]
                scheduled = [e.event_id for e in events if e.HasField("activity_task_scheduled_event_attributes")
                             and e.activity_task_scheduled_event_attributes.activity_type.name == activity_type]
                attempts = [e.activity_task_started_event_attributes.attempt for e in events
                            if e.HasField("activity_task_started_event_attributes")
                            and e.activity_task_started_event_attributes.scheduled_event_id in scheduled]
                assert len(scheduled) == 1 and attempts == [1], (activity_type, attempts)  # never a second attempt
        await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
        await stack.wait_vps(user, agent, "destroyed")


async def test_a_gateway_presenting_another_certificate_is_refused(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection, hetzner: FakeHetzner,
        tmp_path: Path) -> None:
    """Someone else answers at the VM's address (a different certificate from the one the VM reported):
    provisioning fails on the API, and no credential reached that listener."""
    port = free_port()
    cloud = hetzner_settings(settings, hetzner)
    provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
    async with running_stack(cloud, temporal_client, providers={"hetzner": provider}) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent, "hetzner")).status_code == 202
        server_id = await eventually(lambda: next(iter(hetzner.user_data), None))
        async with vm_emulator.boot(vm_emulator.files_from_cloud_init(hetzner.user_data[server_id]),
                                    vm_emulator.SYSTEMD_LAYOUT, stack.api, port=port, state_dir=tmp_path / "vm",
                                    impostor=True) as vm:
            vps = await stack.wait_vps(user, agent, "error", "running")
            assert vps["state"] == "error"
            assert "TLS certificate" in vps["last_error"], vps["last_error"]
            assert vm["sim"].devices.pending == {}  # refused before any connect: no device asked to pair
        assert hetzner.servers == {}  # compensated
