"""GatewayClient against the gateway simulator: handshake, pairing, config, files, QR login, restart.

Everything asserts frames and codes as the real openclaw 2026.9.6 gateway sends them; nothing
asserts timing. The simulator runs in-process on an ephemeral port with its own state dir.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from gateway_simulator import GatewaySimulator, run_simulator
from openclaw.device import DeviceIdentity, signature_token
from openclaw.pairing import approve_device_keys
from openclaw.rpc import (
    DEFAULT_OPERATOR_SCOPES,
    AgentFileConflictError,
    AuthRejectedError,
    ClientInfo,
    ConfigConflictError,
    GatewayClient,
    GatewayConnectionError,
    GatewayEvent,
    GatewayTimeoutError,
    InvalidRequestError,
    MissingScopeError,
    NotPairedError,
    UnavailableError,
    UnknownMethodError,
)

TOKEN = "sim-token-0123456789"
REMOTE = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
BASE_CONFIG: dict[str, Any] = {
    "gateway": {
        "mode": "local",
        "bind": "loopback",
        "auth": {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"},
        "trustedProxies": ["127.0.0.1"],
        "controlUi": {"enabled": True, "allowedOrigins": ["https://tenant.example.com"]},
    }
}
# `@openclaw/whatsapp` runs only while enabled (as on the real gateway): the QR tests enable it.
WHATSAPP_CONFIG: dict[str, Any] = {**BASE_CONFIG, "plugins": {"entries": {"whatsapp": {"enabled": True}}}}
FAST = {
    "restart_drain_s": 0.05,
    "restart_down_s": 0.2,
    "restart_startup_s": 0.1,
    "restart_cooldown_s": 0.0,
}


def sim_env() -> dict[str, str]:
    return {"OPENCLAW_GATEWAY_TOKEN": TOKEN, "HOME": "/nonexistent"}


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[GatewaySimulator]:
    async with run_simulator(tmp_path / "state", config=BASE_CONFIG, env=sim_env(), **FAST) as simulator:
        yield simulator


def client_for(sim: GatewaySimulator, **kwargs: Any) -> GatewayClient:
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("request_timeout", 10.0)
    kwargs.setdefault("connect_timeout", 10.0)
    kwargs.setdefault("backoff_initial", 0.05)
    kwargs.setdefault("backoff_max", 0.25)
    kwargs.setdefault("reconnect_timeout", 20.0)
    return GatewayClient(sim.url, **kwargs)


async def raw_open(sim: GatewaySimulator, headers: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(sim.url, additional_headers=headers)
    challenge = json.loads(await ws.recv())
    return ws, challenge


def connect_frame(challenge: dict[str, Any], *, device: DeviceIdentity | None = None, **over: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {"id": "gateway-client", "version": "0.1.0", "platform": "linux", "mode": "backend"},
        "role": "operator",
        "scopes": list(DEFAULT_OPERATOR_SCOPES),
        "caps": [],
        "auth": {"token": TOKEN},
    }
    params.update(over)
    if device is not None:
        params["device"] = device.connect_proof(
            nonce=challenge["payload"]["nonce"],
            signed_at_ms=challenge["payload"]["ts"],
            client_id=params["client"]["id"],
            client_mode=params["client"]["mode"],
            role=params["role"],
            scopes=params["scopes"],
            token=signature_token(params["auth"]),
            platform=params["client"]["platform"],
        )
    return {"type": "req", "id": "c1", "method": "connect", "params": params}


async def recv_until_closed(ws: Any) -> tuple[list[dict[str, Any]], int | None, str | None]:
    frames: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(10):
            async for message in ws:
                frames.append(json.loads(message))
    except websockets.ConnectionClosed:
        pass
    rcvd = ws.close_code, ws.close_reason
    return frames, rcvd[0], rcvd[1]


# -- handshake ---------------------------------------------------------------------------------------


async def test_challenge_then_hello_ok_for_the_local_backend(sim: GatewaySimulator) -> None:
    ws, challenge = await raw_open(sim)
    assert challenge["type"] == "event" and challenge["event"] == "connect.challenge"
    assert set(challenge["payload"]) == {"nonce", "ts", "capabilities"} and "seq" not in challenge
    await ws.send(json.dumps(connect_frame(challenge)))
    res = json.loads(await ws.recv())
    await ws.close()
    assert res["type"] == "res" and res["id"] == "c1" and res["ok"] is True
    hello = res["payload"]
    assert hello["type"] == "hello-ok" and hello["protocol"] == 4
    assert {"version", "buildId", "bootId", "connId"} <= set(hello["server"])
    methods = hello["features"]["methods"]
    assert len(methods) == 466 and "config.patch" in methods and "device.scopes.requestUpgrade" in methods
    assert "web.login.start" not in methods and "connect" not in methods  # callable but hidden
    assert "shutdown" in hello["features"]["events"] and "tick" in hello["features"]["events"]
    assert hello["auth"]["method"] == "token" and hello["auth"]["scopes"] == list(DEFAULT_OPERATOR_SCOPES)
    assert "deviceToken" not in hello["auth"]  # local backend path: no pairing record, no device token
    assert hello["policy"]["maxPayload"] == 26214400 and hello["policy"]["tickIntervalMs"] == 30000
    assert hello["snapshot"]["sessionDefaults"]["mainSessionKey"] == "agent:main:main"
    assert hello["snapshot"]["appliedConfigHash"].startswith("hmac-sha256:v1:")


async def test_client_connects_and_calls_health(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw:
        assert gw.hello.protocol == 4 and gw.hello.scopes == list(DEFAULT_OPERATOR_SCOPES)
        with gw.subscribe("health") as events:
            health = await gw.health()
            event = await events.get(timeout=10)
        assert health["ok"] is True and health["defaultAgentId"] == "main"
        assert event.event == "health" and isinstance(event.seq, int)


async def test_wrong_token_is_rejected_with_auth_token_mismatch(sim: GatewaySimulator) -> None:
    with pytest.raises(AuthRejectedError) as info:
        await client_for(sim, token="wrong").connect()
    assert info.value.code == "INVALID_REQUEST" and info.value.details_code == "AUTH_TOKEN_MISMATCH"
    assert info.value.message.startswith("unauthorized: gateway token mismatch")
    assert info.value.details["recommendedNextStep"] == "update_auth_credentials"

    ws, challenge = await raw_open(sim)
    await ws.send(json.dumps(connect_frame(challenge, auth={"token": "wrong"})))
    frames, code, _ = await recv_until_closed(ws)
    assert frames[0]["ok"] is False and code == 1008


async def test_no_credentials_and_no_device_means_device_identity_required(sim: GatewaySimulator) -> None:
    ws, challenge = await raw_open(sim)
    await ws.send(json.dumps(connect_frame(challenge, auth={})))
    frames, code, reason = await recv_until_closed(ws)
    assert frames[0]["error"] == {
        "code": "NOT_PAIRED",
        "message": "device identity required",
        "details": {"code": "DEVICE_IDENTITY_REQUIRED"},
    }
    assert (code, reason) == (1008, "device identity required")


async def test_bad_device_proofs_close_with_1008(sim: GatewaySimulator) -> None:
    identity = DeviceIdentity.generate()
    ws, challenge = await raw_open(sim)
    frame = connect_frame(
        challenge, device=identity, client={"id": "test", "version": "1", "platform": "linux", "mode": "test"}
    )
    frame["params"]["device"]["signature"] = identity.sign("something else")
    await ws.send(json.dumps(frame))
    frames, code, reason = await recv_until_closed(ws)
    assert frames[0]["error"]["details"] == {"code": "DEVICE_AUTH_SIGNATURE_INVALID", "reason": "device-signature"}
    assert (code, reason) == (1008, "device signature invalid")

    ws, challenge = await raw_open(sim)
    frame = connect_frame(challenge, device=identity)
    frame["params"]["device"]["nonce"] = "not-the-challenge"
    await ws.send(json.dumps(frame))
    frames, code, _ = await recv_until_closed(ws)
    assert frames[0]["error"]["details"]["code"] == "DEVICE_AUTH_NONCE_MISMATCH" and code == 1008


async def test_handshake_frame_errors(sim: GatewaySimulator) -> None:
    ws, _ = await raw_open(sim)
    await ws.send(json.dumps({"type": "req", "id": "h1", "method": "health", "params": {}}))
    frames, code, _ = await recv_until_closed(ws)
    assert frames == [
        {
            "type": "res",
            "id": "h1",
            "ok": False,
            "error": {"code": "INVALID_REQUEST", "message": "invalid handshake: first request must be connect"},
        }
    ]
    assert code == 1008

    ws, challenge = await raw_open(sim)
    await ws.send(json.dumps(connect_frame(challenge, minProtocol=5, maxProtocol=6)))
    frames, code, _ = await recv_until_closed(ws)
    assert frames[0]["error"]["details"]["code"] == "PROTOCOL_MISMATCH" and code == 1002

    ws, challenge = await raw_open(sim)
    bad = connect_frame(challenge)
    bad["params"]["client"]["id"] = "nope-client"
    await ws.send(json.dumps(bad))
    frames, code, _ = await recv_until_closed(ws)
    assert frames[0]["error"]["message"] == (
        "invalid connect params: at /client/id: must be equal to one of the allowed values"
    )
    assert code == 1008


# -- pairing -----------------------------------------------------------------------------------------


async def test_remote_device_pairing_flow(sim: GatewaySimulator) -> None:
    identity = DeviceIdentity.generate()
    issued: list[str] = []
    remote = client_for(sim, device=identity, headers=REMOTE, on_device_token=issued.append)

    async with client_for(sim) as admin:
        with admin.subscribe("device.pair.requested", "device.pair.resolved") as events:
            with pytest.raises(NotPairedError) as info:
                await remote.connect()
            err = info.value
            assert err.details_code == "PAIRING_REQUIRED" and err.reason == "not-paired"
            assert err.details["deviceId"] == identity.device_id
            assert err.details["requestedScopes"] == list(DEFAULT_OPERATOR_SCOPES)
            requested = await events.get(timeout=10)
            assert requested.event == "device.pair.requested"
            assert requested.payload["requestId"] == err.request_id
            assert requested.payload["publicKey"] == identity.public_key_b64url
            assert requested.payload["remoteIp"] == "203.0.113.7"

            # A different device asking at the same time must stay pending.
            stranger = DeviceIdentity.generate()
            with pytest.raises(NotPairedError):
                await client_for(sim, device=stranger, headers=REMOTE).connect()

            result = await approve_device_keys(
                sim.url, token=TOKEN, public_keys=[identity.public_key_b64url], timeout=10
            )
            assert set(result.approved) == {identity.device_id} and result.complete
            resolved = await events.wait_for(lambda e: e.event == "device.pair.resolved", timeout=10)
            assert resolved.payload["decision"] == "approved"
            listing = await admin.device_pair_list()
            assert [p["deviceId"] for p in listing["pending"]] == [stranger.device_id]

    hello = await remote.connect()
    assert hello.auth_method == "token" and hello.scopes == list(DEFAULT_OPERATOR_SCOPES)
    assert hello.device_token and issued == [hello.device_token]
    assert (await remote.config_get())["exists"] is True
    await remote.close()

    # Reconnect with only the device token (the gateway token may rotate later).
    async with client_for(sim, token=None, device_token=hello.device_token, device=identity, headers=REMOTE) as again:
        assert again.hello.auth_method == "device-token"
        assert again.hello.device_token == hello.device_token
    with pytest.raises(AuthRejectedError) as bad:
        await client_for(sim, token=None, device_token="forged", device=identity, headers=REMOTE).connect()
    assert bad.value.details_code == "AUTH_DEVICE_TOKEN_MISMATCH"

    again_result = await approve_device_keys(sim.url, token=TOKEN, public_keys=[identity.public_key_b64url], timeout=5)
    assert again_result.already_paired == {identity.device_id} and not again_result.approved


async def test_local_device_is_silently_paired(sim: GatewaySimulator) -> None:
    identity = DeviceIdentity.generate()
    client = ClientInfo(id="test", mode="test")
    async with client_for(sim, device=identity, client=client) as gw:
        assert gw.hello.device_token and gw.hello.scopes == list(DEFAULT_OPERATOR_SCOPES)
        listing = await gw.device_pair_list()
    record = next(p for p in listing["paired"] if p["deviceId"] == identity.device_id)
    assert record["approvedVia"] == "silent" and record["connected"] is True
    assert "token" not in record["tokens"][0]  # metadata only, never the secret


async def test_remote_deviceless_socket_gets_no_scopes(sim: GatewaySimulator) -> None:
    async with client_for(sim, headers=REMOTE) as gw:
        assert gw.hello.scopes == []
        assert (await gw.health())["ok"] is True  # health answers without scopes
        with pytest.raises(MissingScopeError) as info:
            await gw.config_get()
    assert info.value.code == "FORBIDDEN" and info.value.missing_scope == "operator.read"
    assert info.value.details == {
        "code": "MISSING_SCOPE",
        "missingScope": "operator.read",
        "requiredScopes": ["operator.read"],
    }


# -- errors and timeouts -----------------------------------------------------------------------------


async def test_unknown_method_bad_params_and_malformed_frames(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw:
        with pytest.raises(UnknownMethodError) as unknown:
            await gw.call("no.such.method")
        assert unknown.value.message == "unknown method: no.such.method"
        with pytest.raises(InvalidRequestError) as bad:
            await gw.call("config.get", {"bogus": 1})
        assert bad.value.message == "invalid config.get params: at root: unexpected property 'bogus'"
        with pytest.raises(InvalidRequestError) as role:
            await gw.call("node.event", {})
        assert role.value.message == "unauthorized role: operator"
        with pytest.raises(UnavailableError) as not_simulated:
            await gw.call("terminal.open", {})
        assert not_simulated.value.details == {"simulator": True}

    ws, challenge = await raw_open(sim)
    await ws.send(json.dumps(connect_frame(challenge)))
    assert json.loads(await ws.recv())["ok"] is True
    await ws.send("not json")  # ignored: no answer, socket stays open
    await ws.send(json.dumps({"type": "req", "method": "health"}))
    assert json.loads(await ws.recv()) == {
        "type": "res",
        "id": "invalid",
        "ok": False,
        "error": {"code": "INVALID_REQUEST", "message": "invalid request frame: must have required property 'id'"},
    }
    await ws.send(json.dumps({"type": "req", "id": "x1", "method": "health", "params": {}, "bogus": 1}))
    reply = json.loads(await ws.recv())
    assert reply["id"] == "x1"
    assert reply["error"]["message"] == "invalid request frame: at root: unexpected property 'bogus'"
    await ws.send(json.dumps({"type": "req", "id": "h2", "method": "health", "params": {}}))
    while (frame := json.loads(await ws.recv())).get("type") != "res":
        pass
    assert frame["id"] == "h2" and frame["ok"] is True
    await ws.close()


async def test_calls_time_out_and_the_client_stays_usable(tmp_path: Path) -> None:
    async with run_simulator(
        tmp_path / "s", config=WHATSAPP_CONFIG, env=sim_env(), whatsapp_plugin=True, qr_rotate_s=600
    ) as sim:
        async with client_for(sim) as gw:
            await gw.web_login_start()
            with pytest.raises(GatewayTimeoutError) as info:
                await gw.call("web.login.wait", {"timeoutMs": 60_000}, timeout=0.2)
            assert info.value.method == "web.login.wait" and isinstance(info.value, TimeoutError)
            assert (await gw.health())["ok"] is True


# -- config ------------------------------------------------------------------------------------------


async def test_config_patch_round_trip_with_hash_guard(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw:
        before = await gw.config_get()
        assert before["exists"] is True and before["hash"].startswith("hmac-sha256:v1:")
        assert before["sourceConfig"]["gateway"]["auth"]["token"] == "__OPENCLAW_REDACTED__"
        assert "${OPENCLAW_GATEWAY_TOKEN}" in before["raw"]  # env references are not secrets

        with pytest.raises(ConfigConflictError) as no_hash:
            await gw.call("config.patch", {"raw": json.dumps({"gateway": {"terminal": {"enabled": False}}})})
        assert no_hash.value.message == (
            "config base hash required for gateway.terminal.enabled; re-run config.get and retry with baseHash"
        )
        with pytest.raises(ConfigConflictError) as stale:
            await gw.config_patch({"gateway": {"terminal": {"enabled": False}}}, base_hash="hmac-sha256:v1:stale")
        assert stale.value.message == "config changed since last load; re-run config.get and retry"

        with gw.subscribe("config.changed") as changes:
            result = await gw.config_patch({"gateway": {"terminal": {"enabled": False}}}, note="lock terminal")
            changed = await changes.get(timeout=10)
        assert result["ok"] is True and result["changedPaths"] == ["gateway.terminal"]
        assert result["sentinel"]["payload"]["message"] == "lock terminal"
        assert result["sentinel"]["payload"]["stats"]["requiresRestart"] is False
        assert changed.payload["hash"] == result["hash"] != before["hash"]

        after = await gw.config_get()
        assert after["hash"] == result["hash"]
        assert after["sourceConfig"]["gateway"]["terminal"] == {"enabled": False}
        on_disk = json.loads((sim.state_dir / "openclaw.json").read_text())
        assert on_disk["gateway"]["terminal"] == {"enabled": False}
        assert on_disk["gateway"]["auth"]["token"] == "${OPENCLAW_GATEWAY_TOKEN}"  # sentinel never written

        noop = await gw.config_patch({"gateway": {"terminal": {"enabled": False}}})
        assert noop["noop"] is True and noop["changedPaths"] == []

        with pytest.raises(InvalidRequestError) as destructive:
            await gw.config_patch({"gateway": {"trustedProxies": []}})
        assert "would remove entries from array path(s): gateway.trustedProxies" in destructive.value.message
        replaced = await gw.config_patch(
            {"gateway": {"trustedProxies": ["10.0.0.1"]}}, replace_paths=["gateway.trustedProxies"]
        )
        assert replaced["changedPaths"] == ["gateway.trustedProxies"]

        with pytest.raises(InvalidRequestError) as invalid_cfg:
            await gw.config_patch({"gateway": {"controlUi": {"allowInsecureAuth": True}}})
        assert invalid_cfg.value.message.startswith("invalid config:")
        assert invalid_cfg.value.details["issues"][0]["path"] == "gateway.controlUi"


async def test_config_patch_retries_once_after_a_concurrent_write(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw, client_for(sim) as other:
        original_get = gw.config_get
        gets = 0

        async def racing_get() -> dict[str, Any]:
            nonlocal gets
            gets += 1
            snapshot = await original_get()
            if gets == 1:  # someone else writes between our read and our patch
                await other.config_patch({"tools": {"profile": "coding"}})
            return snapshot

        gw.config_get = racing_get  # type: ignore[method-assign]
        result = await gw.config_patch({"hooks": {"enabled": False}})
        assert gets == 2 and result["changedPaths"] == ["hooks.enabled"]
        source = (await original_get())["sourceConfig"]
        assert source["tools"] == {"profile": "coding"} and source["hooks"] == {"enabled": False}

        gets = -10  # always race: the bounded retry gives up with the conflict

        async def always_racing() -> dict[str, Any]:
            snapshot = await original_get()
            await other.config_patch({"ui": {"prefs": {"n": snapshot["hash"][-6:]}}})
            return snapshot

        gw.config_get = always_racing  # type: ignore[method-assign]
        with pytest.raises(ConfigConflictError):
            await gw.config_patch({"hooks": {"enabled": True}}, max_attempts=2)


async def test_config_apply_replaces_and_validates(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw:
        current = await gw.config_get()
        new = json.loads(json.dumps(current["sourceConfig"]))
        new["tools"] = {"profile": "messaging"}
        applied = await gw.config_apply(new)  # redacted token sent back: stored value is kept
        assert applied["ok"] is True and "changedPaths" not in applied
        on_disk = json.loads((sim.state_dir / "openclaw.json").read_text())
        assert on_disk["tools"] == {"profile": "messaging"}
        assert on_disk["gateway"]["auth"]["token"] == "${OPENCLAW_GATEWAY_TOKEN}"
        with pytest.raises(ConfigConflictError):
            await gw.config_apply(new, base_hash=current["hash"])  # hash from before our own write
        with pytest.raises(InvalidRequestError) as bad:
            await gw.config_apply({"gateway": {"mode": "local", "bogus": 1}})
        assert bad.value.details["issues"] == [{"path": "gateway", "message": 'Unrecognized key: "bogus"'}]


async def test_changing_the_shared_token_disconnects_token_clients(sim: GatewaySimulator) -> None:
    gw = client_for(sim)
    await gw.connect()
    try:
        await gw.config_patch({"gateway": {"auth": {"token": "rotated-token-value"}}})
        with pytest.raises(GatewayConnectionError) as closed:
            for _ in range(100):
                await gw.health()
                await asyncio.sleep(0.05)
        assert closed.value.close_code == 4001 and closed.value.retryable is False
    finally:
        await gw.close()
    async with client_for(sim, token="rotated-token-value") as fresh:
        assert (await fresh.config_get())["sourceConfig"]["gateway"]["auth"]["token"] == "__OPENCLAW_REDACTED__"


# -- workspace files ---------------------------------------------------------------------------------


async def test_agents_files_set_get_with_expected_hash(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw:
        listing = await gw.agents_files_list("main")
        assert [f["name"] for f in listing["files"]] == ["AGENTS.md", "SOUL.md", "USER.md", "BOOTSTRAP.md", "MEMORY.md"]
        assert all(f["missing"] for f in listing["files"])

        first = await gw.agents_files_set("main", "SOUL.md", "be kind\n")
        expected_hash = hashlib.sha256(b"be kind\n").hexdigest()
        assert first["ok"] is True and first["file"]["hash"] == expected_hash and first["file"]["size"] == 8
        got = await gw.agents_files_get("main", "SOUL.md")
        assert got["file"]["content"] == "be kind\n" and got["file"]["missing"] is False

        with pytest.raises(AgentFileConflictError) as conflict:
            await gw.agents_files_set("main", "SOUL.md", "be terse\n", expected_hash="0" * 64)
        assert conflict.value.current_hash == expected_hash
        assert conflict.value.details["type"] == "agent_file_conflict"
        assert conflict.value.message == 'agent file "SOUL.md" changed since it was read'

        second = await gw.agents_files_set("main", "SOUL.md", "be terse\n", expected_hash=expected_hash)
        assert second["file"]["content"] == "be terse\n"
        assert (Path(second["workspace"]) / "SOUL.md").read_text() == "be terse\n"

        with pytest.raises(InvalidRequestError) as unsupported:
            await gw.agents_files_get("main", "TOOLS.md")
        assert unsupported.value.message == 'unsupported file "TOOLS.md"'
        with pytest.raises(InvalidRequestError) as unknown_agent:
            await gw.agents_files_get("nope", "SOUL.md")
        assert unknown_agent.value.message == 'agent "nope" not found'


# -- WhatsApp QR login --------------------------------------------------------------------------------


async def test_web_login_without_the_whatsapp_plugin(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw:
        for call in (gw.web_login_start(), gw.web_login_wait(timeout_ms=1000)):
            with pytest.raises(InvalidRequestError) as info:
                await call
            assert info.value.message == "web login provider is not available"
        with pytest.raises(InvalidRequestError) as logout:
            await gw.channels_logout("whatsapp")
        assert logout.value.message == "invalid channels.logout channel"


async def test_web_login_rotating_qr_then_scan(tmp_path: Path) -> None:
    async with (
        run_simulator(tmp_path / "s", config=WHATSAPP_CONFIG, env=sim_env(), whatsapp_plugin=True,
                      qr_rotate_s=0.1) as sim,
        client_for(sim) as gw,
    ):
        start = await gw.web_login_start()
        first = start["qrDataUrl"]
        assert start["message"] == "Scan this QR in WhatsApp → Linked Devices."
        assert first.startswith("data:image/png;base64,")
        png = base64.b64decode(first.split(",", 1)[1])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(first) <= 16 * 1024

        rotated = await gw.web_login_wait(current_qr_data_url=first, timeout_ms=10_000)
        assert rotated["connected"] is False and rotated["qrDataUrl"] != first
        assert rotated["message"].startswith("QR refreshed.")

        assert sim.handlers.complete_web_login() is True  # the phone scans the QR
        linked = await gw.web_login_wait(current_qr_data_url=rotated["qrDataUrl"], timeout_ms=10_000)
        assert linked == {"connected": True, "message": "✅ Linked! WhatsApp is ready."}
        status = await gw.channels_status()
        assert status["channels"]["whatsapp"]["linked"] is True
        again = await gw.web_login_start()
        assert "already linked" in again["message"] and "qrDataUrl" not in again
        out = await gw.channels_logout("whatsapp")
        assert out["cleared"] is True
        assert (await gw.channels_status())["channels"]["whatsapp"]["linked"] is False


# -- chat ----------------------------------------------------------------------------------------------


async def test_chat_send_echoes_through_chat_events(sim: GatewaySimulator) -> None:
    async with client_for(sim) as gw:
        with pytest.raises(InvalidRequestError) as missing:
            await gw.call("chat.send", {"sessionKey": "agent:main:main", "message": "hi"})
        assert missing.value.message == "invalid chat.send params: must have required property 'idempotencyKey'"
        with gw.subscribe("chat") as chat:
            sent = await gw.chat_send("agent:main:main", "hello there", idempotency_key="run-1")
            assert sent == {"runId": "run-1", "status": "started"}
            final = await chat.wait_for(lambda e: e.payload.get("state") == "final", timeout=10)
        assert final.payload["runId"] == "run-1"
        assert final.payload["message"]["content"][0]["text"] == "echo: hello there"
        history = await gw.chat_history("agent:main:main")
        assert [m["role"] for m in history["messages"]] == ["user", "assistant"]
        assert history["messages"][0]["content"] == "hello there"


# -- restart and readiness -------------------------------------------------------------------------------


async def test_restart_request_client_reconnects_and_state_survives(sim: GatewaySimulator) -> None:
    reconnected: list[int] = []
    shutdowns: list[GatewayEvent] = []

    async def on_reconnect(hello: Any) -> None:
        reconnected.append(hello.protocol)

    gw = client_for(
        sim, on_reconnect=on_reconnect, on_event=lambda e: shutdowns.append(e) if e.event == "shutdown" else None
    )
    await gw.connect()
    try:
        await gw.agents_files_set("main", "USER.md", "likes tea\n")
        await gw.config_patch({"hooks": {"enabled": False}})
        boot_before = gw.hello.server["bootId"]
        result = await gw.gateway_restart_request(reason="test")
        assert result["status"] == "scheduled" and result["restart"]["signal"] == "SIGUSR2"
        assert result["restart"]["coalesced"] is False
        # Calls issued during the restart wait for the reconnect instead of failing.
        health = await gw.health()
        assert health["ok"] is True and gw.reconnect_count == 1 and sim.restart_count == 1
        assert gw.hello.server["bootId"] != boot_before
        assert shutdowns and shutdowns[0].payload["reason"] == "gateway restarting"
        assert isinstance(shutdowns[0].payload["restartExpectedMs"], int)
        assert reconnected == [4]
        assert (await gw.agents_files_get("main", "USER.md"))["file"]["content"] == "likes tea\n"
        assert (await gw.config_get())["sourceConfig"]["hooks"] == {"enabled": False}
    finally:
        await gw.close()


async def test_restart_closes_sockets_with_1012_after_shutdown_event(sim: GatewaySimulator) -> None:
    ws, challenge = await raw_open(sim)
    await ws.send(json.dumps(connect_frame(challenge)))
    assert json.loads(await ws.recv())["ok"] is True
    await ws.send(json.dumps({"type": "req", "id": "r1", "method": "gateway.restart.request", "params": {}}))
    frames, code, reason = await recv_until_closed(ws)
    events = [f for f in frames if f.get("type") == "event" and f["event"] == "shutdown"]
    assert events and events[0]["payload"]["reason"] == "gateway restarting"
    assert (code, reason) == (1012, "service restart")


async def test_connect_during_startup_gets_unavailable_then_succeeds(tmp_path: Path) -> None:
    from openclaw.probe import GatewayNotReadyError, probe, wait_ready

    async with run_simulator(tmp_path / "s", config=BASE_CONFIG, env=sim_env(), ready_after_s=0.6) as sim:
        assert (await probe(sim.http_url, "/readyz")).status == 503
        ws, challenge = await raw_open(sim)
        await ws.send(json.dumps(connect_frame(challenge)))
        frames, code, reason = await recv_until_closed(ws)
        assert frames[0]["error"] == {
            "code": "UNAVAILABLE",
            "message": "gateway starting; retry shortly",
            "details": {"reason": "startup-sidecars"},
            "retryable": True,
            "retryAfterMs": 500,
        }
        assert (code, reason) == (1013, "gateway starting")
        async with client_for(sim) as gw:  # connect() retries the retryable UNAVAILABLE by itself
            assert (await gw.health())["ok"] is True
        body = await wait_ready(sim.http_url, timeout=10)
        assert body["ready"] is True and body["failing"] == []

    async with run_simulator(tmp_path / "n", config=BASE_CONFIG, env=sim_env(), never_ready=True) as stuck:
        with pytest.raises(GatewayNotReadyError) as info:
            await wait_ready(stuck.http_url, timeout=0.5)
        assert info.value.last.status == 503
        assert info.value.last.body["failing"] == ["startup-sidecars"]
        with pytest.raises(UnavailableError) as unavailable:
            await client_for(stuck, connect_timeout=0.3).connect()
        assert unavailable.value.retryable and unavailable.value.details == {"reason": "startup-sidecars"}


async def test_stopping_gateway_is_terminal_for_the_client(tmp_path: Path) -> None:
    async with run_simulator(tmp_path / "s", config=BASE_CONFIG, env=sim_env(), **FAST) as sim:
        gw = client_for(sim)
        await gw.connect()
        with gw.subscribe("shutdown") as shutdown:
            await sim.stop()  # SIGTERM semantics: shutdown without restartExpectedMs, then 1012
            event = await shutdown.get(timeout=10)
        assert event.payload == {"reason": "gateway stopping"}
        with pytest.raises(GatewayConnectionError) as info:
            await gw.health()
        assert info.value.close_code == 1012 and info.value.retryable is True
        assert gw.reconnect_count == 0
        await gw.close()


async def test_tick_events_arrive_with_increasing_seq(tmp_path: Path) -> None:
    async with run_simulator(tmp_path / "s", config=BASE_CONFIG, env=sim_env(), tick_interval_ms=50) as sim:
        async with client_for(sim) as gw:
            assert gw.hello.tick_interval_ms == 50
            with gw.subscribe("tick") as ticks:
                first = await ticks.get(timeout=10)
                second = await ticks.get(timeout=10)
    assert set(first.payload) == {"ts"} and second.seq is not None and first.seq is not None
    assert second.seq > first.seq


async def test_silent_sockets_are_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    async with run_simulator(tmp_path / "s", config=BASE_CONFIG, env=sim_env(), handshake_timeout_ms=100) as sim:
        ws, challenge = await raw_open(sim)
        assert challenge["event"] == "connect.challenge"
        frames, code, reason = await recv_until_closed(ws)
        assert frames == [] and (code, reason) == (1008, "connect challenge timeout")
