"""The Control UI WebSocket: handshake terminated here, then a filtered two-way pump.

Handshake (reference §6.6, verified live with the real Control UI):

1. We open the upstream socket first (Origin = the relay origin the gateway allows, the
   browser's address in X-Forwarded-For) and read the gateway's `connect.challenge`.
2. The browser gets *our* challenge: a fresh nonce, our clock, the gateway's capabilities.
3. The browser's `connect` must be the first frame; we verify its Ed25519 device signature over
   our nonce (token "" unless it sent one), so only a holder of that key gets further.
4. Upstream we connect as the UI-relay identity (`openclaw-control-ui`/`webchat`, pinned
   platform, scopes read/write/approvals/questions, never admin) with the gateway token, signed
   over the gateway's nonce. The browser's own auth never goes up.
5. `hello-ok` goes back under the browser's request id with every device token removed,
   `device.scopes.*` removed from `features.methods`, and `policy.maxPayload` capped at our limit.

Then every browser frame is checked (`proxy.frames`): blocked methods get a synthetic FORBIDDEN
and never reach the VM; protocol violations close with 1008. Gateway frames pass unparsed.
Close codes pass through both ways. Each pump does receive-one/send-one, so a slow reader
stalls its writer through TCP flow control instead of filling a buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from openclaw.device import DeviceIdentity, DeviceProofError, signature_token, verify_device_proof
from openclaw.relay import RELAY_CLIENT, RELAY_SCOPES, control_ui_build_id
from proxy.access import GatewayTarget
from proxy.config import ProxyConfig, attachment_limit
from proxy.frames import (
    FrameViolation,
    blocked,
    forbidden_response,
    parse_client_frame,
    parse_json_object,
    rate_limited_response,
)
from proxy.limits import TokenBucket, pace, take
from proxy.metering import Meter
from proxy.problems import problem

__all__ = ["KNOWN_CAPS", "BrowserSocket", "Relay", "RelayContext", "relay"]

log = logging.getLogger(__name__)

PROTOCOL = 4
KNOWN_CAPS = frozenset(
    "agent-kind approvals exec-approvals inline-widgets model-catalog-snapshot model-selection-policy "
    "run-tool-bindings session-scoped-events skill-curator-live-inventory plugin-approvals task-suggestions "
    "terminal-offset-seq terminal-session-metadata terminal-upload-path-style tool-events ui-commands "
    "usage-refreshing".split()
)
_AUTH_SECRET_KEYS = ("deviceToken", "deviceTokens", "issuedAtMs", "recoveryMigrationAllowed")
_SENDABLE = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dumps(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


def _wire_code(code: Any, *, fallback: int = WSCloseCode.OK) -> int:
    """A close code that may be put on the wire (1005/1006/1015 are reserved for 'none seen')."""
    if isinstance(code, int) and code in _SENDABLE:
        return code
    if code in (1006, 1015):
        return WSCloseCode.INTERNAL_ERROR
    return fallback


def _reason(text: str | None) -> bytes:
    raw = (text or "").encode()[:123]
    return raw.decode(errors="ignore").encode()


class BrowserSocket(web.WebSocketResponse):
    """The browser side: an oversized message is a policy violation (1008), not aiohttp's 1009."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG:
            code, message = WSCloseCode.POLICY_VIOLATION, b"frame too large"
        return await super().close(code=code, message=message, drain=drain)

    async def relay_close(self, code: int, message: bytes) -> None:
        """Pass a close code from the gateway through unchanged (1009 included)."""
        await web.WebSocketResponse.close(self, code=code, message=message)


@dataclass
class RelayContext:
    """What one relayed connection needs from the process."""

    client: aiohttp.ClientSession
    config: ProxyConfig
    meter: Meter
    frame_limiter: TokenBucket
    relay_origin: str
    recheck: Callable[[], Awaitable[GatewayTarget]]
    """Re-runs the access check (session, ownership, VPS running) without the cache."""
    access_key: Hashable
    """Relays with the same key share one re-check (same session, same agent)."""
    open_relays: set[Relay]
    """Every open relay of this process: re-checked periodically, closed with 1001 at shutdown."""
    byte_limiter: TokenBucket | None = None
    """Browser frame bytes per user, charged before a frame is parsed (the socket waits meanwhile)."""


class _HandshakeFailed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _error(rid: str, code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err["details"] = details
    return {"type": "res", "id": rid, "ok": False, "error": err}


def _short_str(value: Any, limit: int = 256) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable():
        return value
    return None


def relay_connect_params(browser: dict[str, Any], relay: DeviceIdentity, challenge: dict[str, Any],
                         gateway_token: str) -> dict[str, Any]:
    """Our own connect for the gateway: relay identity and scopes, the browser's harmless extras."""
    client = RELAY_CLIENT.to_params()
    browser_client = browser.get("client") if isinstance(browser.get("client"), dict) else {}
    instance = _short_str(browser_client.get("instanceId"), 128)
    if instance:
        client["instanceId"] = instance
    build_id = control_ui_build_id(browser_client)
    if build_id:  # the gateway checks it for same-host browser origins (see control_ui_build_id)
        client["buildId"] = build_id
    caps = browser.get("caps")
    auth = {"token": gateway_token}
    params: dict[str, Any] = {
        "minProtocol": PROTOCOL,
        "maxProtocol": PROTOCOL,
        "client": client,
        "role": "operator",
        "scopes": list(RELAY_SCOPES),
        "caps": [c for c in caps if isinstance(c, str) and c in KNOWN_CAPS] if isinstance(caps, list) else [],
        "auth": auth,
    }
    for key in ("userAgent", "locale"):
        value = _short_str(browser.get(key), 512)
        if value:
            params[key] = value
    params["device"] = relay.connect_proof(
        nonce=challenge["nonce"], signed_at_ms=challenge["ts"], client_id=RELAY_CLIENT.id,
        client_mode=RELAY_CLIENT.mode, role="operator", scopes=RELAY_SCOPES, token=signature_token(auth),
        platform=RELAY_CLIENT.platform, device_family=RELAY_CLIENT.device_family,
    )
    return params


def sanitize_hello(frame: dict[str, Any], browser_id: str, max_payload: int) -> dict[str, Any]:
    """hello-ok for the browser: its id, no device tokens, no scope-upgrade methods, our size cap."""
    frame["id"] = browser_id
    payload = frame.get("payload")
    if not isinstance(payload, dict):
        return frame
    auth = payload.get("auth")
    if isinstance(auth, dict):
        for key in list(auth):
            if key in _AUTH_SECRET_KEYS or "token" in key.lower():
                del auth[key]
    features = payload.get("features")
    if isinstance(features, dict) and isinstance(features.get("methods"), list):
        features["methods"] = [m for m in features["methods"]
                               if not (isinstance(m, str) and m.lower().startswith("device.scopes."))]
    policy = payload.get("policy")
    if isinstance(policy, dict):
        current = policy.get("maxPayload")
        policy["maxPayload"] = min(current, max_payload) if isinstance(current, int) else max_payload
        _cap_attachments(policy, max_payload)
    return frame


def _cap_attachments(policy: dict[str, Any], max_payload: int) -> None:
    """Attachment limits the UI checks per file, lowered so one base64-encoded file fits our frame cap."""
    fits = attachment_limit(max_payload)
    attachments = policy.get("attachments")
    if not isinstance(attachments, dict):
        attachments = policy["attachments"] = {}
    for key in ("maxBytes", "maxImageBytes"):
        current = attachments.get(key)
        attachments[key] = min(current, fits) if isinstance(current, int) and current > 0 else fits


def _check_browser_connect(frame: dict[str, Any], nonce: str) -> tuple[str, dict[str, Any]]:
    """The browser's connect, checked like the gateway would; returns (request id, params)."""
    rid = frame.get("id")
    if frame.get("type") != "req" or not isinstance(rid, str) or not rid or len(rid) > 256:
        raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION, "invalid request frame")
    if frame.get("method") != "connect":
        raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION, "invalid handshake: first request must be connect")
    params = frame.get("params")
    client = params.get("client") if isinstance(params, dict) else None
    if not isinstance(params, dict) or not isinstance(client, dict):
        raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION, "invalid connect params: at /client: must be object")
    lo, hi = params.get("minProtocol"), params.get("maxProtocol")
    if not (isinstance(lo, int) and isinstance(hi, int) and lo <= PROTOCOL <= hi):
        raise _HandshakeFailed(WSCloseCode.PROTOCOL_ERROR, "protocol mismatch")
    if params.get("role", "operator") != "operator":
        raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION, "only operator sessions are relayed")
    for key in ("id", "mode"):
        if not isinstance(client.get(key), str):
            raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION, f"invalid connect params: at /client/{key}")
    scopes = params.get("scopes") or []
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION, "invalid connect params: at /scopes")
    auth = params.get("auth") or {}
    device = params.get("device")
    if not isinstance(auth, dict):
        raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION, "invalid connect params: at /auth")
    if not isinstance(device, dict):
        raise _HandshakeFailed(WSCloseCode.POLICY_VIOLATION,
                               "control ui requires device identity (use HTTPS or localhost secure context)")
    verify_device_proof(
        device, expected_nonce=nonce, client_id=client["id"], client_mode=client["mode"], role="operator",
        scopes=scopes, token=signature_token(auth),
        platform=client.get("platform") if isinstance(client.get("platform"), str) else None,
        device_family=client.get("deviceFamily") if isinstance(client.get("deviceFamily"), str) else None,
    )
    return rid, params


class Relay:
    def __init__(self, ctx: RelayContext, target: GatewayTarget, browser: BrowserSocket,
                 upstream: aiohttp.ClientWebSocketResponse) -> None:
        self.ctx = ctx
        self.target = target
        self.browser = browser
        self.upstream = upstream
        self.vps_id = target.vps_id

    # -- byte-counted sends --------------------------------------------------------------------

    async def to_upstream(self, data: bytes) -> None:
        await self.upstream.send_frame(data, WSMsgType.TEXT)
        self.ctx.meter.add(self.vps_id, inbound=len(data))

    async def to_browser(self, frame: dict[str, Any]) -> None:
        await self.browser.send_frame(_dumps(frame), WSMsgType.TEXT)

    async def from_upstream(self, within_s: float) -> aiohttp.WSMessage:
        msg = await asyncio.wait_for(self.upstream.receive(), within_s)
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.ctx.meter.add(self.vps_id, outbound=len(msg.data))
        return msg

    async def close_both(self, code: int, reason: str, *, upstream_code: int = WSCloseCode.OK) -> None:
        with contextlib.suppress(Exception):
            await self.browser.close(code=code, message=_reason(reason))
        with contextlib.suppress(Exception):
            await self.upstream.close(code=upstream_code)

    # -- handshake -----------------------------------------------------------------------------

    async def handshake(self, challenge: dict[str, Any]) -> bool:
        """True when hello-ok reached the browser; otherwise both sides are closed."""
        cfg = self.ctx.config
        nonce = str(uuid.uuid4())
        caps = [c for c in challenge.get("capabilities") or [] if isinstance(c, str)]
        await self.to_browser({"type": "event", "event": "connect.challenge",
                               "payload": {"nonce": nonce, "ts": _now_ms(), "capabilities": caps}})
        try:
            msg = await asyncio.wait_for(self.browser.receive(), cfg.handshake_timeout_s)
        except TimeoutError:
            await self.close_both(WSCloseCode.POLICY_VIOLATION, "connect challenge timeout")
            return False
        if msg.type is WSMsgType.CLOSE:
            await self.upstream.close(code=_wire_code(msg.data))
            return False
        if msg.type is not WSMsgType.TEXT:
            await self.close_both(WSCloseCode.POLICY_VIOLATION, "invalid request frame")
            return False
        if len(msg.data) > cfg.max_connect_frame_bytes:
            await self.close_both(WSCloseCode.POLICY_VIOLATION, "preauth payload too large")
            return False
        rid: str | None = None
        try:
            frame = parse_json_object(msg.data)
            rid = frame.get("id") if isinstance(frame.get("id"), str) else None
            rid, params = _check_browser_connect(frame, nonce)
        except FrameViolation as exc:
            await self.close_both(WSCloseCode.POLICY_VIOLATION, str(exc))
            return False
        except _HandshakeFailed as exc:
            if rid:
                await self.to_browser(_error(rid, "INVALID_REQUEST", exc.reason))
            await self.close_both(exc.code, exc.reason)
            return False
        except DeviceProofError as exc:
            await self.to_browser(_error(rid or "connect", "INVALID_REQUEST", exc.message,
                                         {"code": exc.code, "reason": exc.reason}))
            await self.close_both(WSCloseCode.POLICY_VIOLATION, exc.message)
            return False

        relay_key = DeviceIdentity.from_pem(str(self.target.relay_key_pem))
        relay_id = f"relay-connect-{uuid.uuid4().hex[:12]}"
        params_up = relay_connect_params(params, relay_key, challenge, self.target.gateway_token)
        await self.to_upstream(_dumps({"type": "req", "id": relay_id, "method": "connect", "params": params_up}))
        deadline = time.monotonic() + cfg.handshake_timeout_s
        while True:
            try:
                reply = await self.from_upstream(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                await self.to_browser(_error(rid, "UNAVAILABLE", "gateway did not answer the handshake"))
                await self.close_both(WSCloseCode.TRY_AGAIN_LATER, "gateway did not answer")
                return False
            if reply.type is WSMsgType.CLOSE:
                await self.browser.relay_close(_wire_code(reply.data), _reason(reply.extra))
                return False
            if reply.type is not WSMsgType.TEXT:
                await self.close_both(WSCloseCode.INTERNAL_ERROR, "gateway closed during the handshake")
                return False
            try:
                res = json.loads(reply.data)
            except ValueError:
                continue
            if isinstance(res, dict) and res.get("type") == "res" and res.get("id") == relay_id:
                break
        if res.get("ok") is True:
            await self.to_browser(sanitize_hello(res, rid, cfg.max_client_frame_bytes))
            return True
        res["id"] = rid
        await self.to_browser(res)
        # The gateway closes after a refused connect; pass its code on (1008 if it does not).
        try:
            closing = await self.from_upstream(2.0)
            if closing.type is WSMsgType.CLOSE:
                await self.browser.relay_close(_wire_code(closing.data), _reason(closing.extra))
                return False
        except TimeoutError:
            pass
        await self.close_both(WSCloseCode.POLICY_VIOLATION, "gateway refused the connection")
        return False

    # -- pumps ---------------------------------------------------------------------------------

    async def browser_to_upstream(self) -> None:
        limiter = self.ctx.frame_limiter
        bytes_limiter = self.ctx.byte_limiter
        user = self.target.user_id
        while True:
            msg = await self.browser.receive()
            if msg.type is WSMsgType.TEXT:
                # Charged by size before any parsing; waits (socket paused) only when over the budget.
                if bytes_limiter is not None and bytes_limiter.acquire_now(user, len(msg.data)) != 0.0:
                    await pace(bytes_limiter, user, len(msg.data))
                try:
                    req = parse_client_frame(msg.data)
                    if req.method.lower() == "connect":
                        raise FrameViolation("connect was already completed")
                except FrameViolation as exc:
                    log.info("closing relay: %s", exc, extra={"agent_id": str(self.target.agent_id)})
                    await self.close_both(WSCloseCode.POLICY_VIOLATION, str(exc))
                    return
                refusal = blocked(req)
                if refusal is not None:
                    log.info("blocked method", extra={"agent_id": str(self.target.agent_id),
                                                      "method": req.method[:128], "rule": refusal.rule})
                    await self.to_browser(forbidden_response(req.id, req.method, refusal))
                    continue
                wait = await take(limiter, user)
                if wait > 0:
                    await self.to_browser(rate_limited_response(req.id, req.method, max(1, int(wait * 1000))))
                    continue
                await self.to_upstream(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await self.close_both(WSCloseCode.POLICY_VIOLATION, "binary frames are not accepted")
                return
            elif msg.type is WSMsgType.CLOSE:
                await self.upstream.close(code=_wire_code(msg.data), message=_reason(msg.extra))
                return
            else:  # CLOSING (we are closing it), CLOSED, ERROR (e.g. too large: already closed 1008)
                with contextlib.suppress(Exception):
                    await self.upstream.close(
                        code=WSCloseCode.INTERNAL_ERROR if msg.type is WSMsgType.ERROR else WSCloseCode.OK)
                return

    async def upstream_to_browser(self) -> None:
        while True:
            msg = await self.upstream.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                self.ctx.meter.add(self.vps_id, outbound=len(msg.data))
                await self.browser.send_frame(msg.data, msg.type)
            elif msg.type is WSMsgType.CLOSE:
                await self.browser.relay_close(_wire_code(msg.data), _reason(msg.extra))
                return
            else:
                with contextlib.suppress(Exception):
                    await self.browser.relay_close(
                        WSCloseCode.INTERNAL_ERROR if msg.type is WSMsgType.ERROR else WSCloseCode.OK, b"")
                return

    async def end_access(self, status: int) -> None:
        """The session ended, the VM stopped or the agent changed hands: close both sides."""
        log.info("closing relay: access ended", extra={"agent_id": str(self.target.agent_id), "status": status})
        await self.close_both(WSCloseCode.POLICY_VIOLATION, "session or VM no longer valid",
                              upstream_code=WSCloseCode.GOING_AWAY)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.browser_to_upstream()), asyncio.create_task(self.upstream_to_browser())]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            # The first pump to finish has closed the other side; let the second one drain briefly.
            _, still = await asyncio.wait(pending, timeout=5.0)
            for task in still:
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.warning("relay pump failed", exc_info=task.exception())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close_both(WSCloseCode.GOING_AWAY, "proxy closing")


async def relay(request: web.Request, ctx: RelayContext, target: GatewayTarget, upstream_url: str,
                upstream_headers: dict[str, str]) -> web.StreamResponse:
    """Open the upstream, upgrade the browser, terminate the handshake, pump until either side closes."""
    cfg = ctx.config
    if not target.relay_key_pem:
        return problem(503, "Gateway not paired", "The agent's VM is not ready for the Control UI yet.")
    try:
        upstream = await asyncio.wait_for(ctx.client.ws_connect(
            upstream_url, origin=ctx.relay_origin, headers=upstream_headers, ssl=target.upstream_ssl,
            autoclose=False, autoping=True,
            heartbeat=cfg.heartbeat_s, max_msg_size=cfg.max_upstream_frame_bytes, decode_text=False,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=cfg.close_timeout_s), compress=0,
        ), cfg.upstream_connect_timeout_s)
    except aiohttp.WSServerHandshakeError as exc:
        log.warning("gateway refused the websocket upgrade", extra={"agent_id": str(target.agent_id),
                                                                    "status": exc.status})
        return problem(502, "Gateway unavailable", "The agent's gateway refused the connection.")
    except (aiohttp.ClientError, OSError, TimeoutError):
        return problem(502, "Gateway unavailable", "The agent's gateway cannot be reached right now.")
    browser = BrowserSocket(timeout=cfg.close_timeout_s, autoclose=False, autoping=True, heartbeat=cfg.heartbeat_s,
                            max_msg_size=cfg.max_client_frame_bytes, compress=False, decode_text=False)
    relay_conn = Relay(ctx, target, browser, upstream)
    try:
        try:
            first = await relay_conn.from_upstream(cfg.upstream_connect_timeout_s)
            challenge_frame = json.loads(first.data) if first.type is WSMsgType.TEXT else None
            challenge = challenge_frame.get("payload") if isinstance(challenge_frame, dict) else None
            if (not isinstance(challenge_frame, dict) or challenge_frame.get("event") != "connect.challenge"
                    or not isinstance(challenge, dict) or not isinstance(challenge.get("nonce"), str)
                    or not isinstance(challenge.get("ts"), int)):
                raise ValueError("no connect.challenge")
        except (TimeoutError, ValueError):
            await upstream.close()
            return problem(502, "Gateway unavailable", "The agent's gateway did not start the handshake.")
        await browser.prepare(request)
        ctx.open_relays.add(relay_conn)
        try:
            if await relay_conn.handshake(challenge):
                await relay_conn.run()
        finally:
            ctx.open_relays.discard(relay_conn)
    finally:
        if not upstream.closed:
            with contextlib.suppress(Exception):
                await upstream.close()
    return browser
