"""The Control UI WebSocket through the proxy: handshake termination, method filter, fail-closed
parsing, close codes, backpressure and byte metering (gateway simulator, and a fake gateway for
what only a byte-counting peer can show)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import pytest_asyncio
import websockets
from aiohttp import WSMsgType, web

from gateway_simulator.server import GatewaySimulator
from proxy.app import RunningProxy
from proxy.config import ProxyConfig
from settings import Settings
from tests.proxy_harness import (
    TEST_CONFIG,
    Browser,
    FakeGateway,
    Seeded,
    UpstreamSpy,
    next_close,
    point_vps_at,
    running_proxy,
    seed_gateway_user,
    simulator_for,
    usage,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Env:
    seeded: Seeded
    sim: GatewaySimulator
    spy: UpstreamSpy
    proxy: RunningProxy
    browser: Browser


@pytest_asyncio.fixture(loop_scope="session")
async def env(settings: Settings, sql: psycopg.Connection, tmp_path: Path) -> AsyncIterator[Env]:
    seeded = seed_gateway_user(sql, settings, port=1)
    async with simulator_for(settings, tmp_path / "gw", seeded) as sim:
        point_vps_at(sql, seeded.vps_id, sim.port)
        spy = UpstreamSpy(sim)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                yield Env(seeded, sim, spy, proxy, browser)
            finally:
                await browser.close()


BLOCKED = [
    ("config.get", {}), ("config.patch", {"raw": "{}"}), ("config.apply", {"raw": "{}"}),
    ("exec.approvals.set", {"file": {}}), ("exec.approval.resolve", {"id": "x", "decision": "allow-once"}),
    ("approval.resolve", {"id": "x", "decision": "allow-once"}), ("update.run", {}), ("update.status", {}),
    ("device.scopes.requestUpgrade", {"scopes": ["operator.admin"]}), ("device.scopes.waitUpgrade", {}),
    ("device.pair.list", {}), ("device.pair.approve", {"requestId": "x"}), ("device.token.rotate", {}),
    ("terminal.open", {}), ("plugins.install", {"source": "npm", "spec": "x"}), ("secrets.resolve", {}),
    ("tools.invoke", {"tool": "exec"}), ("web.login.start", {}), ("gateway.restart.request", {}),
    ("wizard.start", {}), ("node.pair.approve", {}), ("models.authSetApiKey", {}),
]


async def test_handshake_terminated_at_the_proxy(env: Env) -> None:
    ws, hello = await env.browser.handshake(env.seeded.agent_id)
    assert hello["ok"] is True and hello["id"] == "c1", hello
    payload = hello["payload"]
    assert payload["type"] == "hello-ok"
    auth = payload["auth"]
    assert not {k for k in auth if "token" in k.lower()}, auth
    assert "issuedAtMs" not in auth and "recoveryMigrationAllowed" not in auth
    assert auth["scopes"] == ["operator.read", "operator.write", "operator.approvals", "operator.questions"]
    assert not [m for m in payload["features"]["methods"] if m.startswith("device.scopes.")]
    assert payload["policy"]["maxPayload"] == TEST_CONFIG.max_client_frame_bytes
    # Upstream, the relay identity was paired (pinned platform), never the browser's device.
    paired = env.sim.devices.paired
    assert env.seeded.relay.device_id in paired
    assert paired[env.seeded.relay.device_id]["clientId"] == "openclaw-control-ui"
    assert paired[env.seeded.relay.device_id]["platform"] == "linux"
    assert env.browser.device.device_id not in paired
    await ws.close()


async def test_allowed_methods_work(env: Env) -> None:
    ws, _ = await env.browser.handshake(env.seeded.agent_id)
    sent = await env.browser.call(ws, "chat.send", {"sessionKey": "agent:main:main", "message": "hello there",
                                                    "idempotencyKey": "k1"})
    assert sent["ok"] is True and sent["payload"]["status"] == "started", sent
    for _ in range(50):
        hist = await env.browser.call(ws, "chat.history", {"sessionKey": "agent:main:main"})
        assert hist["ok"] is True, hist
        texts = json.dumps(hist["payload"]["messages"])
        if "echo: hello there" in texts:
            break
        await asyncio.sleep(0.1)
    assert "hello there" in texts
    assert (await env.browser.call(ws, "health"))["ok"] is True
    assert env.spy.methods[:2] == ["chat.send", "chat.history"]
    await ws.close()


async def test_each_blocked_method_is_refused_and_never_reaches_the_gateway(env: Env) -> None:
    ws, _ = await env.browser.handshake(env.seeded.agent_id)
    for method, params in BLOCKED:
        res = await env.browser.call(ws, method, params)
        assert res["ok"] is False, (method, res)
        err = res["error"]
        assert err["code"] == "FORBIDDEN" and err["details"]["code"] == "MISSING_SCOPE", (method, err)
        assert err["details"]["reason"] == "blocked-by-proxy"
    assert (await env.browser.call(ws, "health"))["ok"] is True  # the connection stays usable
    assert env.spy.methods == ["health"]
    await ws.close()


@pytest.mark.parametrize("raw_method", [
    "Config.Patch", "CONFIG.PATCH", "\\u0063onfig.patch", "config\\u002epatch", "c\\u006fnfig.apply",
    "c\u043enfig.patch",  # Cyrillic o
    " config.patch", "config.patch\\u0000", "Device.Scopes.RequestUpgrade", "TERMINAL.open", "tools.INVOKE",
])
async def test_method_spelling_tricks_are_refused(env: Env, raw_method: str) -> None:
    ws, _ = await env.browser.handshake(env.seeded.agent_id)
    await ws.send_str('{"type":"req","id":"t1","method":"' + raw_method + '","params":{"raw":"{}"}}')
    res = await env.browser.response(ws, "t1")
    assert res["ok"] is False and res["error"]["code"] == "FORBIDDEN", res
    assert env.spy.methods == []
    await ws.close()


# Methods the relay's scopes do not cover that the old deny-list let through (the gateway alone
# stopped them), explicit denies among read/write methods, unknown names, admin-only params.
OFF_THE_ALLOW_LIST = [
    ("sessions.compact", {"key": "agent:main:main"}, "scope"), ("worktrees.remove", {}, "scope"),
    ("users.linkEmail", {}, "scope"), ("models.probe", {}, "scope"), ("skills.proposals.apply", {}, "scope"),
    ("node.event", {}, "scope"), ("channels.pairing.list", {}, "scope"),
    ("logs.tail", {}, "denied"), ("exec.approval.request", {"command": "rm -rf /"}, "denied"),
    ("config.schema", {}, "denied"), ("environments.status", {}, "denied"),
    ("no.such.method", {}, "unknown"), ("Chat.Send", {}, "unknown"), ("health ", {}, "unknown"),
    ("sessions.patch", {"key": "agent:main:main", "permissionMode": "full"}, "params"),
    ("sessions.patch", {"key": "agent:main:main", "sandboxMode": "off"}, "params"),
    ("sessions.patchMany", {"keys": ["agent:main:main"], "patch": {"permissionMode": "full"}}, "params"),
    ("sessions.create", {"execNode": "host"}, "params"),
]


@pytest.mark.parametrize(("method", "params", "rule"), OFF_THE_ALLOW_LIST)
async def test_only_allow_listed_methods_reach_the_gateway(settings: Settings, sql: psycopg.Connection,
                                                           method: str, params: dict[str, Any], rule: str) -> None:
    """A fake gateway that answers everything: whatever the proxy lets through would succeed."""
    async with FakeGateway() as fake:
        seeded = seed_gateway_user(sql, settings, port=fake.port)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, _ = await browser.handshake(seeded.agent_id)
                res = await browser.call(ws, method, params)
                assert res["ok"] is False, res
                details = res["error"]["details"]
                assert res["error"]["code"] == "FORBIDDEN" and details["reason"] == "blocked-by-proxy", res
                assert details["rule"] == rule, res
                ok = await browser.call(ws, "sessions.patch", {"key": "agent:main:main", "label": "fine"})
                assert ok["ok"] is True  # a write-scope patch passes, and the socket stays usable
                await ws.close()
            finally:
                await browser.close()
        assert [f["method"] for f in fake.frames] == ["connect", "sessions.patch"]


@pytest.mark.parametrize("raw_method", [
    "tools.invoke\\n", "exec.approval.resolve\\n", "connect\\n", "config.patch\\n", "terminal.open\\n",
    "health\\n", "chat.send\\r\\n",
])
async def test_trailing_newline_method_names_are_refused(settings: Settings, sql: psycopg.Connection,
                                                         raw_method: str) -> None:
    """`$` matches before a final newline: `tools.invoke\\n` once passed the deny check."""
    async with FakeGateway() as fake:
        seeded = seed_gateway_user(sql, settings, port=fake.port)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, _ = await browser.handshake(seeded.agent_id)
                await ws.send_str('{"type":"req","id":"n1","method":"' + raw_method + '","params":{}}')
                res = await browser.response(ws, "n1")
                assert res["ok"] is False and res["error"]["details"]["reason"] == "blocked-by-proxy", res
                assert res["error"]["message"].startswith("(invalid method name)")
                await ws.close()
            finally:
                await browser.close()
        assert [f["method"] for f in fake.frames] == ["connect"]


@pytest.mark.parametrize("frame", [
    '{"type":"req","id":"d1","method":"health","method":"config.patch","params":{}}',
    '{"type":"req","id":"d1","method":"health","params":{"a":1,"a":2}}',
    '[{"type":"req","id":"b1","method":"health"},{"type":"req","id":"b2","method":"config.patch"}]',
    '{"type":"req","id":"b1","method":"health"}{"type":"req","id":"b2","method":"config.patch"}',
    '{"type":"req","id":"x1","method":"health"',
    '{"type":"res","id":"x1","ok":true,"payload":{}}',
    '{"type":"event","event":"tick","payload":{}}',
    '{"type":"req","id":"x1","method":"health","extra":1}',
    '{"type":"req","id":7,"method":"health"}',
    '{"type":"req","id":"x1","method":"health","params":"oops"}',
    '{"type":"req","id":"x1","method":"connect","params":{}}',
    '"just a string"',
    '{"type":"req","id":"x1","method":"health","params":{"n":NaN}}',
])
async def test_protocol_violations_close_with_1008(env: Env, frame: str) -> None:
    ws, _ = await env.browser.handshake(env.seeded.agent_id)
    await ws.send_str(frame)
    code, _ = await next_close(ws)
    assert code == 1008
    assert env.spy.methods == []


async def test_binary_frame_closes_with_1008(env: Env) -> None:
    ws, _ = await env.browser.handshake(env.seeded.agent_id)
    await ws.send_bytes(b'{"type":"req","id":"x","method":"health"}')
    assert (await next_close(ws))[0] == 1008
    assert env.spy.methods == []


async def test_invalid_utf8_closes_with_1008(env: Env) -> None:
    ws, _ = await env.browser.handshake(env.seeded.agent_id)
    await ws._writer.send_frame(b'{"type":"req","id":"x","method":"\xff\xfe"}', WSMsgType.TEXT)  # type: ignore[union-attr]
    assert (await next_close(ws))[0] == 1008
    assert env.spy.methods == []


async def test_fragmented_frames_are_reassembled_before_the_check(env: Env) -> None:
    url = env.browser.ws_url(env.seeded.agent_id)
    async with websockets.connect(url, additional_headers={"Cookie": env.browser.headers["Cookie"]},
                                  origin=env.proxy.url, compression=None) as ws:  # type: ignore[arg-type]
        challenge = json.loads(await ws.recv())
        await ws.send(json.dumps(env.browser.connect_frame(challenge)))
        hello = json.loads(await ws.recv())
        assert hello["ok"] is True
        await ws.send(iter(['{"type":"req","id":"f1","method":"con', 'fig.pa', 'tch","params":{"raw":"{}"}}']))
        await ws.send(iter(['{"type":"req","id":"f2",', '"method":"health"}']))
        answers = {}
        while len(answers) < 2:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "res":
                answers[frame["id"]] = frame
        assert answers["f1"]["error"]["code"] == "FORBIDDEN"
        assert answers["f2"]["ok"] is True
    assert env.spy.methods == ["health"]


async def test_many_requests_in_a_burst_are_each_checked(env: Env) -> None:
    ws, _ = await env.browser.handshake(env.seeded.agent_id)
    for i in range(20):
        method = "config.patch" if i % 2 else "health"
        await ws.send_json({"type": "req", "id": f"m{i}", "method": method, "params": {}})
    answers: dict[str, Any] = {}
    while len(answers) < 20:
        frame = await ws.receive_json(timeout=10)
        if frame.get("type") == "res":
            answers[frame["id"]] = frame
    assert all(answers[f"m{i}"]["ok"] is (i % 2 == 0) for i in range(20))
    assert env.spy.methods == ["health"] * 10
    await ws.close()


async def test_bad_device_signature_is_refused(env: Env) -> None:
    ws = await env.browser.open(env.seeded.agent_id)
    challenge = await ws.receive_json(timeout=10)
    await ws.send_json(env.browser.connect_frame(challenge, sign_nonce="not-the-nonce"))
    res = await ws.receive_json(timeout=10)
    assert res["ok"] is False and res["error"]["details"]["code"] == "DEVICE_AUTH_NONCE_MISMATCH", res
    assert (await next_close(ws))[0] == 1008


async def test_first_frame_must_be_connect(env: Env) -> None:
    ws = await env.browser.open(env.seeded.agent_id)
    await ws.receive_json(timeout=10)
    await ws.send_json({"type": "req", "id": "h1", "method": "health"})
    res = await ws.receive_json(timeout=10)
    assert res["ok"] is False and "first request must be connect" in res["error"]["message"]
    assert (await next_close(ws))[0] == 1008
    assert env.spy.methods == []


async def test_connect_without_device_is_refused(env: Env) -> None:
    ws = await env.browser.open(env.seeded.agent_id)
    challenge = await ws.receive_json(timeout=10)
    frame = env.browser.connect_frame(challenge)
    del frame["params"]["device"]
    await ws.send_json(frame)
    res = await ws.receive_json(timeout=10)
    assert res["ok"] is False and "device identity" in res["error"]["message"]
    assert (await next_close(ws))[0] == 1008


async def test_gateway_refusal_passes_through(env: Env, sql: psycopg.Connection, settings: Settings) -> None:
    from db.encryption import configure_keys

    wrong = configure_keys(settings.secret_keys()).encrypt("wrong-token-" + "x" * 30)
    sql.execute("UPDATE agents SET gateway_token = %s WHERE id = %s", (wrong, env.seeded.agent_id))
    ws = await env.browser.open(env.seeded.agent_id)
    challenge = await ws.receive_json(timeout=10)
    await ws.send_json(env.browser.connect_frame(challenge))
    res = await ws.receive_json(timeout=10)
    assert res["id"] == "c1" and res["ok"] is False
    assert res["error"]["details"]["code"] == "AUTH_TOKEN_MISMATCH"
    assert (await next_close(ws))[0] == 1008


async def test_cross_site_upgrade_is_refused(env: Env) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await env.browser.http.ws_connect(env.browser.ws_url(env.seeded.agent_id),
                                          headers={**env.browser.headers, "Origin": "https://evil.example"})
    assert err.value.status == 403


async def test_stopped_vps_refuses_the_upgrade(env: Env, sql: psycopg.Connection) -> None:
    sql.execute("UPDATE vpses SET state = 'stopped' WHERE id = %s", (env.seeded.vps_id,))
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await env.browser.open(env.seeded.agent_id)
    assert err.value.status == 409
    assert env.spy.methods == []


async def test_session_ending_closes_the_socket(settings: Settings, sql: psycopg.Connection, tmp_path: Path) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    async with simulator_for(settings, tmp_path / "gw", seeded) as sim:
        point_vps_at(sql, seeded.vps_id, sim.port)
        cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "session_recheck_s": 0.2})
        async with running_proxy(settings, config=cfg) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, hello = await browser.handshake(seeded.agent_id)
                assert hello["ok"] is True
                sql.execute('DELETE FROM sessions WHERE "sessionToken" = %s', (seeded.session,))
                code, _ = await next_close(ws)
                assert code == 1008
            finally:
                await browser.close()


async def test_connection_and_frame_limits(settings: Settings, sql: psycopg.Connection, tmp_path: Path) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    async with simulator_for(settings, tmp_path / "gw", seeded) as sim:
        point_vps_at(sql, seeded.vps_id, sim.port)
        cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "ws_connections_per_user": 1, "ws_frame_burst": 3,
                             "ws_frame_rate_per_s": 0.01})
        async with running_proxy(settings, config=cfg) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, _ = await browser.handshake(seeded.agent_id)
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await browser.open(seeded.agent_id)
                assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1
                results = [await browser.call(ws, "health") for _ in range(4)]
                assert [r["ok"] for r in results] == [True, True, True, False]
                limited = results[-1]["error"]
                assert limited["code"] == "UNAVAILABLE" and limited["retryable"] is True
                assert limited["retryAfterMs"] >= 1000
                await ws.close()
            finally:
                await browser.close()


async def test_oversized_frame_closes_with_1008(settings: Settings, sql: psycopg.Connection, tmp_path: Path) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    async with simulator_for(settings, tmp_path / "gw", seeded) as sim:
        point_vps_at(sql, seeded.vps_id, sim.port)
        spy = UpstreamSpy(sim)
        cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "max_client_frame_bytes": 64 * 1024})
        async with running_proxy(settings, config=cfg) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, hello = await browser.handshake(seeded.agent_id)
                assert hello["payload"]["policy"]["maxPayload"] == 64 * 1024
                big = {"type": "req", "id": "big", "method": "chat.send",
                       "params": {"sessionKey": "agent:main:main", "message": "x" * 70_000, "idempotencyKey": "b"}}
                await ws.send_json(big)
                assert (await next_close(ws))[0] == 1008
                assert spy.methods == []
            finally:
                await browser.close()


# -- with a fake gateway: close codes, backpressure, exact byte counts ------------------------------


async def _fake_env(settings: Settings, sql: psycopg.Connection, fake: FakeGateway) -> Seeded:
    return seed_gateway_user(sql, settings, port=fake.port)


async def test_close_codes_pass_through_both_ways(settings: Settings, sql: psycopg.Connection) -> None:
    async with FakeGateway() as fake:
        seeded = await _fake_env(settings, sql, fake)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                # Browser -> gateway: 4002 arrives as 4002.
                ws, hello = await browser.handshake(seeded.agent_id)
                assert hello["ok"] is True
                await ws.close(code=4002, message=b"tab closed")
                await asyncio.wait_for(fake.closed.wait(), 10)
                assert (fake.close_code, fake.close_reason) == (4002, "tab closed")

                # Gateway -> browser: 4001 arrives as 4001.
                fake.closed.clear()

                async def close_4001(gw_ws: web.WebSocketResponse) -> None:
                    await gw_ws.close(code=4001, message=b"gateway auth changed")

                fake.on_hello = close_4001
                ws, hello = await browser.handshake(seeded.agent_id)
                code, reason = await next_close(ws)
                assert (code, reason) == (4001, "gateway auth changed")
            finally:
                await browser.close()


async def test_hello_ok_is_sanitised(settings: Settings, sql: psycopg.Connection) -> None:
    async with FakeGateway() as fake:
        seeded = await _fake_env(settings, sql, fake)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, hello = await browser.handshake(seeded.agent_id)
                assert "fake-device-token" not in json.dumps(hello)
                assert hello["payload"]["features"]["methods"] == ["health", "chat.send"]
                # What went upstream: the relay identity with the gateway token, not the browser.
                connect = fake.frames[0]["params"]
                assert connect["client"]["id"] == "openclaw-control-ui" and connect["client"]["platform"] == "linux"
                assert connect["client"]["instanceId"] == "browser-instance-1"
                assert connect["scopes"] == ["operator.read", "operator.write", "operator.approvals",
                                             "operator.questions"]
                assert connect["auth"] == {"token": seeded.gateway_token}
                assert connect["device"]["id"] == seeded.relay.device_id
                assert connect["device"]["nonce"] == "fake-nonce"
                assert connect["caps"] == ["tool-events", "approvals"]
                await ws.close()
            finally:
                await browser.close()


async def test_slow_browser_gets_backpressure(settings: Settings, sql: psycopg.Connection) -> None:
    frame_size, count = 256 * 1024, 400  # 100 MiB offered; far more than socket buffers hold
    async with FakeGateway() as fake:
        seeded = await _fake_env(settings, sql, fake)

        async def flood(gw_ws: web.WebSocketResponse) -> None:
            payload = json.dumps({"type": "event", "event": "x", "payload": "y" * frame_size})
            for _ in range(count):
                await gw_ws.send_str(payload)
                fake.flood_progress += 1

        fake.on_hello = flood
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, hello = await browser.handshake(seeded.agent_id)
                assert hello["ok"] is True
                # Do not read: the gateway's writes must stall instead of the proxy buffering them.
                last, still = -1, 0
                while still < 10:
                    await asyncio.sleep(0.1)
                    still = still + 1 if fake.flood_progress == last else 0
                    last = fake.flood_progress
                assert fake.flood_progress < count // 2, fake.flood_progress
                received = 0
                while received < count:
                    msg = await ws.receive(timeout=30)
                    assert msg.type is WSMsgType.TEXT
                    received += 1
                assert fake.flood_progress == count
                await ws.close()
            finally:
                await browser.close()


async def test_websocket_bytes_are_metered_exactly(settings: Settings, sql: psycopg.Connection) -> None:
    async with FakeGateway() as fake:
        seeded = await _fake_env(settings, sql, fake)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                ws, _ = await browser.handshake(seeded.agent_id)
                for i in range(5):
                    assert (await browser.call(ws, "chat.send", {"message": "é" * (100 * i)}))["ok"] is True
                assert (await browser.call(ws, "config.patch", {"raw": "{}"}))["ok"] is False  # never upstream
                await ws.close()
                await asyncio.wait_for(fake.closed.wait(), 10)
            finally:
                await browser.close()
            await proxy.meter.flush()
        assert usage(sql, seeded.vps_id) == (fake.received_bytes, fake.sent_bytes)
        assert fake.received_bytes > 0 and fake.sent_bytes > 0


async def test_shutdown_closes_sockets_with_1001_and_flushes_the_meter(settings: Settings,
                                                                       sql: psycopg.Connection) -> None:
    async with FakeGateway() as fake:
        seeded = await _fake_env(settings, sql, fake)
        browser: Browser | None = None
        try:
            async with running_proxy(settings) as proxy:  # flush interval: an hour
                browser = Browser(proxy.url, seeded.session)
                ws, _ = await browser.handshake(seeded.agent_id)
                assert (await browser.call(ws, "chat.send", {"message": "before shutdown"}))["ok"] is True
                closing = asyncio.create_task(next_close(ws))  # read while the proxy shuts down
            code, _ = await closing
            assert code == 1001
            await asyncio.wait_for(fake.closed.wait(), 10)
        finally:
            if browser is not None:
                await browser.close()
        assert usage(sql, seeded.vps_id) == (fake.received_bytes, fake.sent_bytes)
