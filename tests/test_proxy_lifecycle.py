"""The proxy in front of VMs that the real provisioning made: the relay identity provisioning paired
is the one the proxy uses. Simulator here; the same flow against the real OpenClaw gateway runs
in the real-gateway tier (OPENCLAW_BIN)."""

from __future__ import annotations

import os
import re
import uuid

import psycopg
import pytest
from temporalio.client import Client

from settings import Settings
from tests.helpers import make_user
from tests.lifecycle_harness import FAST, Stack, running_stack
from tests.proxy_harness import Browser, add_session, running_proxy, usage
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")

OPENCLAW_BIN = os.environ.get("OPENCLAW_BIN")


async def _through_the_proxy(stack: Stack, settings: Settings, sql: psycopg.Connection, *, real: bool) -> None:
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    assert (await stack.provision(user, agent)).status_code == 202
    vps = await stack.wait_vps(user, agent, "running", "error", timeout=180 if real else 60)
    assert vps["state"] == "running", vps["last_error"]
    session = add_session(sql, user)
    agent_id = uuid.UUID(agent)
    async with running_proxy(settings) as proxy:
        browser = Browser(proxy.url, session)
        try:
            # HTTP: the Control UI document and its authenticated config, via our prefix.
            base = f"{proxy.url}/agents/{agent_id}/gateway"
            page = await browser.http.get(base + "/", headers={"Cookie": browser.headers["Cookie"],
                                                               "Accept": "text/html"})
            html = await page.text()
            assert page.status == 200, html[:500]
            assert f'data-openclaw-control-ui-base-path="/agents/{agent_id}/gateway"' in html
            cookie = {"Cookie": browser.headers["Cookie"]}
            cfg = await browser.http.get(base + "/control-ui-config.json", headers=cookie)
            assert cfg.status == 200, await cfg.text()
            if real:  # a real asset referenced by the document loads through the prefix
                asset = re.search(r'src="(/agents/[^"]+/assets/[^"]+\.js)"', html)
                assert asset is not None, html[:2000]
                js = await browser.http.get(proxy.url + asset.group(1), headers=cookie)
                assert js.status == 200 and "javascript" in js.headers["Content-Type"]
            invoke = await browser.http.post(base + "/tools/invoke", json={"tool": "sessions_list"},
                                             headers={**cookie, "Origin": proxy.url})
            assert invoke.status == 403

            # WebSocket: handshake terminated at the proxy, chat allowed, admin methods refused by us.
            ws, hello = await browser.handshake(agent_id)
            assert hello["ok"] is True, hello
            assert not [k for k in hello["payload"]["auth"] if "token" in k.lower()]
            assert not [m for m in hello["payload"]["features"]["methods"] if m.startswith("device.scopes.")]
            sent = await browser.call(ws, "chat.send", {"sessionKey": "agent:main:main", "message": "hello",
                                                        "idempotencyKey": str(uuid.uuid4())}, timeout=30)
            assert sent["ok"] is True, sent
            history = await browser.call(ws, "chat.history", {"sessionKey": "agent:main:main"}, timeout=30)
            assert history["ok"] is True, history
            for method, params in (("config.patch", {"raw": "{}"}), ("device.scopes.requestUpgrade",
                                                                     {"scopes": ["operator.admin"]}),
                                   ("exec.approvals.get", {})):
                refused = await browser.call(ws, method, params)
                assert refused["ok"] is False and refused["error"]["details"]["reason"] == "blocked-by-proxy"
            await ws.close()
        finally:
            await browser.close()
        await proxy.meter.flush()
    bytes_in, bytes_out = usage(sql, uuid.UUID(vps["id"]))
    assert bytes_in > 0 and bytes_out > 0


async def test_proxy_in_front_of_a_provisioned_simulator(settings: Settings, temporal_client: Client, db: str,
                                                         sql: psycopg.Connection) -> None:
    async with running_stack(settings, temporal_client) as stack:
        await _through_the_proxy(stack, settings, sql, real=False)


@pytest.mark.real_gateway
async def test_proxy_in_front_of_the_real_gateway(settings: Settings, temporal_client: Client, db: str,
                                                  sql: psycopg.Connection) -> None:
    real = settings.model_copy(update={"openclaw_bin": OPENCLAW_BIN})
    slow = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 90, "poll_interval_s": 0.5})
    async with running_stack(real, temporal_client, timeouts=slow) as stack:
        await _through_the_proxy(stack, real, sql, real=True)

