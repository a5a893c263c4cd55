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
Close codes, pings and pongs pass through both ways.

Transport (below aiohttp, for memory and speed): aiohttp parses and routes the upgrade request
and `proxy.gateway` runs every check; the upstream is a plain `loop.create_connection` with the
upgrade written by hand (a pinned gateway's certificate checked before the first byte), and the
browser's connection is taken over from aiohttp after our 101 (`_take_over`). The handshake
awaits messages one at a time; after hello-ok both sockets call the relay from `data_received`:
no task and no await per frame. Gateway bytes are forwarded as they arrive (frame boundaries
tracked only for metering and close frames, `proxy.ws_wire.PassThrough`); each browser message
is assembled (bounded), checked, and sent up as the browser's own masked bytes. A full write
buffer on one side pauses reading on the other (flow control), so a slow reader stalls its
writer through TCP instead of filling memory. One timer per process pings idle sockets
(`heartbeat`); closes wait `close_timeout_s` for the peer's answer.

Per frame, the usual read is one whole frame and skips the buffers (`whole`); metered bytes are
counted in the relay itself and drained by the meter (`drain`, a `proxy.metering.MeterSource`),
so a round trip is a few attribute updates, two token buckets, one strict parse and two writes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, web
from yarl import URL

from openclaw.device import DeviceIdentity, DeviceProofError, signature_token, verify_device_proof
from openclaw.relay import RELAY_CLIENT, RELAY_SCOPES, control_ui_build_id
from openclaw.tls import CertificatePinError, check_peer, pinned_context
from proxy.access import GatewayTarget
from proxy.config import ProxyConfig, attachment_limit
from proxy.frames import (
    FrameViolation,
    Request,
    blocked,
    forbidden_response,
    parse_client_frame,
    parse_json_object,
    rate_limited_response,
)
from proxy.limits import TokenBucket, pace
from proxy.metering import Meter
from proxy.methods import ALLOWED_ANY_PARAMS
from proxy.problems import problem
from proxy.ws_wire import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    Assembler,
    Control,
    Message,
    PassThrough,
    WireError,
    accept_key,
    close_payload,
    encode,
    parse_close,
)

__all__ = ["KNOWN_CAPS", "Relay", "RelayContext", "relay"]

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


@dataclass
class RelayContext:
    """What one relayed connection needs from the process."""

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



# -- the two sockets ---------------------------------------------------------------------------------

_HEARTBEAT = b"slopbox-heartbeat"
"""Payload of our own pings: the pong that answers one is ours and goes no further."""
_FLOW, _HOLD, _HANDSHAKE = 1, 2, 4
"""Why a socket's reading is paused: the other side's write buffer is full, a frame waits for a
limiter, the handshake has not consumed what is buffered."""
_HEAD_LIMIT = 16 * 1024
_UPSTREAM_SSL: ssl.SSLContext | None = None


class _Socket(asyncio.Protocol):
    """One side of a relay: a raw transport, a frame reader, closing-handshake state.

    During the handshake `receive()` hands out messages one at a time (parsing only what is asked
    for, so what follows hello-ok stays unparsed for the relay). After it, `data_received` calls
    the relay directly: no task and no await per frame.
    """

    __slots__ = ("asm", "browser_side", "got_close", "idle", "lost", "paused", "relay", "rx", "sent_close",
                 "transport", "waiter")

    def __init__(self, asm: Assembler, *, browser_side: bool) -> None:
        self.asm = asm
        self.browser_side = browser_side
        self.transport: asyncio.Transport | None = None
        self.relay: Relay | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.sent_close = False
        self.got_close = False
        self.paused = 0
        self.rx = True
        self.idle = 0

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.rx = True
        relay_conn = self.relay
        if relay_conn is not None and relay_conn.relaying:
            if self.browser_side:
                relay_conn.from_browser(data)
            else:
                relay_conn.from_gateway(data)
            return
        self.asm.feed(data)
        if len(self.asm.buf) > self.asm.max_message + 65536:
            self.pause(_HANDSHAKE)
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        self._wake()
        if self.relay is not None:
            self.relay.lost(self)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.other(self).pause(_FLOW)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.other(self).resume(_FLOW)

    # -- helpers ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.sent_close and not transport.is_closing():
            transport.write(data)

    def frame(self, opcode: int, payload: bytes) -> bytes:
        """A frame from us to this peer: masked towards the gateway, plain towards the browser."""
        return encode(opcode, payload, masked=not self.browser_side)

    def send_close(self, code: int | None, reason: bytes = b"") -> None:
        """Our close frame (once); the transport closes when the peer's close has also been seen."""
        if self.sent_close or self.transport is None:
            return
        self.write(self.frame(CLOSE, close_payload(code, reason)))
        self.sent_close = True
        if self.got_close:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def receive(self, within_s: float) -> Message | None:
        """The next message during the handshake; None when the socket is gone or being closed.
        Pings are answered here, pongs skipped. Raises WireError and TimeoutError."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            msg = self.asm.next()
            if msg is not None:
                if msg.opcode == PING:
                    self.write(self.frame(PONG, msg.payload))
                    continue
                if msg.opcode == PONG:
                    continue
                return msg
            self.resume(_HANDSHAKE)
            if self.lost or self.sent_close:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(self.waiter, left)
            finally:
                self.waiter = None


class _Upstream(_Socket):
    """The gateway side: the HTTP/1.1 upgrade by hand, then frames."""

    __slots__ = ("head", "key", "upgraded", "stream")

    def __init__(self, asm: Assembler, key: str, max_message: int) -> None:
        super().__init__(asm, browser_side=False)
        self.key = key
        self.head = bytearray()
        self.upgraded: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stream = PassThrough(max_message=max_message)

    def data_received(self, data: bytes) -> None:
        relay_conn = self.relay
        if relay_conn is not None and relay_conn.relaying:  # the steady state, first
            self.rx = True
            relay_conn.from_gateway(data)
            return
        if self.upgraded.done():
            super().data_received(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > _HEAD_LIMIT:
                self._fail(_UpgradeRefused(0, "response head too large"))
                self.abort()
            return
        try:
            status = _check_upgrade(bytes(self.head[:end]), self.key)
        except _UpgradeRefused as exc:
            self._fail(exc)
            self.abort()
            return
        rest = bytes(self.head[end + 4:])
        self.head = bytearray()
        self.upgraded.set_result(status)
        if rest:
            super().data_received(rest)

    def _fail(self, exc: Exception) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc)
            self.upgraded.exception()  # retrieved: nobody awaits it when the pin check already failed

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionResetError("gateway closed during the upgrade"))
        super().connection_lost(exc)


class _UpgradeRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _check_upgrade(head: bytes, key: str) -> int:
    """The gateway's answer to our upgrade: 101, websocket, the right accept, no extension."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _UpgradeRefused(0, "not an HTTP response")
    status = int(parts[1])
    if status != 101:
        raise _UpgradeRefused(status, "upgrade refused")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _UpgradeRefused(status, "malformed header")
        headers[name.strip().lower()] = value.strip()
    if headers.get("upgrade", "").lower() != "websocket":
        raise _UpgradeRefused(status, "no websocket upgrade")
    if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
        raise _UpgradeRefused(status, "no connection upgrade")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise _UpgradeRefused(status, "wrong Sec-WebSocket-Accept")
    if headers.get("sec-websocket-extensions") or headers.get("sec-websocket-protocol"):
        raise _UpgradeRefused(status, "extension or subprotocol not asked for")
    return status


def _upstream_ssl() -> ssl.SSLContext:
    """TLS to a pinned gateway: no CA trust and no host name, the pin checked instead (`check_peer`)."""
    global _UPSTREAM_SSL
    if _UPSTREAM_SSL is None:
        _UPSTREAM_SSL = pinned_context()
    return _UPSTREAM_SSL


async def _open_upstream(url: URL, headers: dict[str, str], origin: str, pin: str | None,
                         cfg: ProxyConfig) -> _Upstream:
    """TCP (and TLS, pin checked before any byte is sent), the upgrade, the 101 checked."""
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16)).decode()
    asm = Assembler(require_mask=False, max_message=cfg.max_upstream_frame_bytes, too_large=(1009, "message too big"))
    secure = url.scheme in ("wss", "https")
    if secure and pin is None:
        raise _UpgradeRefused(0, "https gateway without a pinned certificate")
    host = url.raw_host or ""
    port = url.port or (443 if secure else 80)
    transport, conn = await loop.create_connection(
        lambda: _Upstream(asm, key, cfg.max_upstream_frame_bytes), host, port,
        ssl=_upstream_ssl() if secure else None, server_hostname=host if secure else None)
    try:
        if secure:  # the pin, before a single byte goes out (what aiohttp.Fingerprint guaranteed)
            try:
                check_peer(transport.get_extra_info("ssl_object"), pin or "")
            except CertificatePinError as exc:
                raise _UpgradeRefused(0, str(exc)) from None
        lines = [f"GET {url.raw_path_qs or '/'} HTTP/1.1", f"Host: {headers.get('Host') or url.raw_authority}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", f"Origin: {origin}"]
        lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "host"]
        request = "\r\n".join(lines) + "\r\n\r\n"
        if "\n" in request[:-4].replace("\r\n", "") or "\r" in request[:-4].replace("\r\n", ""):
            raise _UpgradeRefused(0, "header value with a line break")
        transport.write(request.encode("latin-1"))
        await conn.upgraded
    except BaseException:
        transport.abort()
        raise
    return conn


def _take_over(request: web.Request, browser: _Socket, response_head: bytes) -> None:
    """Write our 101 and take the connection's bytes from aiohttp.

    aiohttp parsed and routed the upgrade request; from here `browser` is the transport's
    protocol (inside the listener's `GuardedProtocol` when there is one, so the connection stays
    counted and no header timer runs, else by `transport.set_protocol`). aiohttp's own handler
    is detached: its `transport` is cleared, so when our handler returns it writes nothing (the
    response we return is already "sent") and closes nothing (the socket is ours now), and once
    its task has ended we tell it the connection is gone (`connection_lost`), which drops it from
    the server's connection list and cancels its keep-alive timer. Nothing of the request stays
    referenced after that. Bytes aiohttp already read behind the upgrade request (a browser sends
    none before the 101) are handed over too.
    """
    handler = request.protocol
    transport = request.transport
    assert transport is not None and handler is not None
    transport.write(response_head)
    outer = transport.get_protocol()
    hand_over = getattr(outer, "hand_over", None)
    if hand_over is not None:
        hand_over(browser)
    else:
        transport.set_protocol(browser)
    browser.connection_made(transport)
    tail = getattr(handler, "_message_tail", b"")
    handler.transport = None
    task = request.task
    task.add_done_callback(lambda _: handler.connection_lost(None))
    with contextlib.suppress(Exception):
        transport.resume_reading()  # aiohttp pauses reading when its buffers fill; our socket decides now
    if tail:
        browser.data_received(bytes(tail))


class _Upgraded(web.StreamResponse):
    """What the handler returns once the connection is ours: aiohttp has nothing left to send."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:  # type: ignore[override]
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _browser_101(request: web.Request) -> bytes | None:
    """Our 101 for a valid RFC 6455 upgrade (no extension, no subprotocol), None for an invalid one."""
    if request.method != "GET" or request.version < (1, 1):
        return None
    key = request.headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    if request.headers.get("Sec-WebSocket-Version", "") != "13":
        return None
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n").encode()


# -- the relay ---------------------------------------------------------------------------------------


class Relay:
    """Both sockets of one Control UI connection: handshake, then callbacks only."""

    __slots__ = ("__weakref__", "_close_timer", "_held", "_in", "_on_done", "_out", "browser", "ctx", "done",
                 "relaying", "target", "upstream", "user_key", "vps_id")

    def __init__(self, ctx: RelayContext, target: GatewayTarget, browser: _Socket, upstream: _Upstream,
                 on_done: Callable[[], None]) -> None:
        self.ctx = ctx
        self.target = target
        self.browser = browser
        self.upstream = upstream
        self.vps_id = target.vps_id
        self.user_key = str(target.user_id)
        """The per-user frame and byte buckets' key: a str hashes once (a UUID hashes in Python at
        every lookup); the shared limiter's rows are named by the same text."""
        self._in = 0
        self._out = 0
        """Bytes to and from the VM not yet handed to the meter (`drain`; the meter drains attached
        relays before every flush, so its totals are exact)."""
        self.relaying = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_done = on_done
        self._close_timer: asyncio.TimerHandle | None = None
        self._held: asyncio.TimerHandle | asyncio.Task[Any] | None = None
        browser.relay = self
        upstream.relay = self

    def drain(self) -> tuple[Any, int, int]:
        """`proxy.metering.MeterSource`: the payload bytes counted since the last drain."""
        counts = (self.vps_id, self._in, self._out)
        self._in = self._out = 0
        return counts

    def other(self, side: _Socket) -> _Socket:
        return self.upstream if side is self.browser else self.browser

    # -- sends -----------------------------------------------------------------------------------

    def to_upstream(self, data: bytes) -> None:
        self.upstream.write(encode(TEXT, data, masked=True))
        self.ctx.meter.add(self.vps_id, inbound=len(data))

    def to_browser(self, frame: dict[str, Any]) -> None:
        self.browser.write(encode(TEXT, _dumps(frame)))

    async def from_upstream(self, within_s: float) -> Message | None:
        msg = await self.upstream.receive(within_s)
        if msg is not None and msg.opcode in (TEXT, BINARY):
            self.ctx.meter.add(self.vps_id, outbound=len(msg.payload))
        return msg

    # -- closing ---------------------------------------------------------------------------------

    def close_both(self, code: int, reason: str, *, upstream_code: int = WSCloseCode.OK) -> None:
        """Close frames to both sides; each transport closes when its peer answered (or at the timeout)."""
        self._close(self.browser, code, _reason(reason))
        self._close(self.upstream, upstream_code, b"")

    def end_access(self, status: int) -> None:
        """The session ended, the VM stopped or the agent changed hands: close both sides."""
        log.info("closing relay: access ended", extra={"agent_id": str(self.target.agent_id), "status": status})
        self.close_both(WSCloseCode.POLICY_VIOLATION, "session or VM no longer valid",
                        upstream_code=WSCloseCode.GOING_AWAY)

    def _close(self, side: _Socket, code: int | None, reason: bytes) -> None:
        if side.lost or side.sent_close:
            return
        side.send_close(code, reason)
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(self.ctx.config.close_timeout_s,
                                                                      self._close_timeout)

    def _close_timeout(self) -> None:
        """The peers had close_timeout_s to answer our close frames: whatever is left is cut."""
        self.browser.abort()
        self.upstream.abort()

    def _peer_closed(self, side: _Socket, code: int | None, reason: bytes) -> None:
        """A close frame from `side`: pass its code on; its answer is the other side's close."""
        side.got_close = True
        other = self.other(side)
        if not other.sent_close and not other.lost:
            self._close(other, _wire_code(code), _reason(reason.decode(errors="ignore")))
            if not side.sent_close and self.relaying:
                return  # the other side's answering close frame answers this one
        if side.sent_close:
            if side.transport is not None:
                side.transport.close()
        else:
            self._close(side, code if code is not None and code in _SENDABLE else None, b"")

    def _broken(self, side: _Socket, exc: WireError) -> None:
        """`side` broke the protocol: fail it (close frame, then the socket), end the other side."""
        log.info("closing relay: %s", exc.reason, extra={"agent_id": str(self.target.agent_id)})
        if not side.sent_close:
            side.send_close(exc.code, exc.reason.encode())
        if side.transport is not None:
            side.transport.close()
        self._close(self.other(side), WSCloseCode.INTERNAL_ERROR, b"")

    def lost(self, side: _Socket) -> None:
        """A transport closed (either way): end the other side if it still runs; done when both are gone."""
        if self.done.done():
            return
        other = self.other(side)
        if not other.lost:
            if not side.got_close:  # vanished without a close frame
                self._close(other, WSCloseCode.GOING_AWAY if side is self.browser else WSCloseCode.INTERNAL_ERROR,
                            b"")
            elif not other.sent_close:
                self._close(other, WSCloseCode.OK, b"")
            return
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._held is not None:
            self._held.cancel()
            self._held = None
        self.ctx.open_relays.discard(self)
        self.ctx.meter.detach(self)
        self.browser.relay = self.upstream.relay = None
        if not self.done.done():
            self.done.set_result(None)
        self._on_done()

    def heartbeat(self) -> None:
        """Called every heartbeat_s / 2 by the process's one timer: a side silent for a whole
        period gets a ping, one still silent half a period later is dead (as aiohttp's heartbeat)."""
        for side in (self.browser, self.upstream):
            if side.lost:
                continue
            if side.rx or side.paused:  # a side we stopped reading cannot show it is alive: not judged
                side.rx = False
                side.idle = 0
                continue
            side.idle += 1
            if side.idle == 2:
                side.write(side.frame(PING, _HEARTBEAT))
            elif side.idle > 2:
                log.info("closing relay: peer stopped answering", extra={"agent_id": str(self.target.agent_id),
                                                                          "side": "browser" if side.browser_side
                                                                          else "gateway"})
                side.got_close = False
                side.abort()

    # -- handshake -------------------------------------------------------------------------------

    async def handshake(self, challenge: dict[str, Any]) -> bool:
        """True when hello-ok reached the browser; otherwise both sides are being closed."""
        cfg = self.ctx.config
        nonce = str(uuid.uuid4())
        caps = [c for c in challenge.get("capabilities") or [] if isinstance(c, str)]
        self.to_browser({"type": "event", "event": "connect.challenge",
                         "payload": {"nonce": nonce, "ts": _now_ms(), "capabilities": caps}})
        try:
            msg = await self.browser.receive(cfg.handshake_timeout_s)
        except TimeoutError:
            self.close_both(WSCloseCode.POLICY_VIOLATION, "connect challenge timeout")
            return False
        except WireError as exc:
            self._broken(self.browser, exc)
            return False
        if msg is None:
            self.close_both(WSCloseCode.GOING_AWAY, "")
            return False
        if msg.opcode == CLOSE:
            try:
                code, reason = parse_close(msg.payload)
            except WireError as exc:
                self._broken(self.browser, exc)
                return False
            self._peer_closed(self.browser, code, reason)
            return False
        if msg.opcode != TEXT:
            self.close_both(WSCloseCode.POLICY_VIOLATION, "invalid request frame")
            return False
        if len(msg.payload) > cfg.max_connect_frame_bytes:
            self.close_both(WSCloseCode.POLICY_VIOLATION, "preauth payload too large")
            return False
        rid: str | None = None
        try:
            frame = parse_json_object(msg.payload)
            rid = frame.get("id") if isinstance(frame.get("id"), str) else None
            rid, params = _check_browser_connect(frame, nonce)
        except FrameViolation as exc:
            self.close_both(WSCloseCode.POLICY_VIOLATION, str(exc))
            return False
        except _HandshakeFailed as exc:
            if rid:
                self.to_browser(_error(rid, "INVALID_REQUEST", exc.reason))
            self.close_both(exc.code, exc.reason)
            return False
        except DeviceProofError as exc:
            self.to_browser(_error(rid or "connect", "INVALID_REQUEST", exc.message,
                                   {"code": exc.code, "reason": exc.reason}))
            self.close_both(WSCloseCode.POLICY_VIOLATION, exc.message)
            return False

        relay_key = DeviceIdentity.from_pem(str(self.target.relay_key_pem))
        relay_id = f"relay-connect-{uuid.uuid4().hex[:12]}"
        params_up = relay_connect_params(params, relay_key, challenge, self.target.gateway_token)
        self.to_upstream(_dumps({"type": "req", "id": relay_id, "method": "connect", "params": params_up}))
        deadline = time.monotonic() + cfg.handshake_timeout_s
        while True:
            try:
                reply = await self.from_upstream(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                self.to_browser(_error(rid, "UNAVAILABLE", "gateway did not answer the handshake"))
                self.close_both(WSCloseCode.TRY_AGAIN_LATER, "gateway did not answer")
                return False
            except WireError as exc:
                self._broken(self.upstream, exc)
                return False
            if reply is not None and reply.opcode == CLOSE:
                self._upstream_close(reply.payload)
                return False
            if reply is None or reply.opcode != TEXT:
                self.close_both(WSCloseCode.INTERNAL_ERROR, "gateway closed during the handshake")
                return False
            try:
                res = json.loads(reply.payload)
            except ValueError:
                continue
            if isinstance(res, dict) and res.get("type") == "res" and res.get("id") == relay_id:
                break
        if res.get("ok") is True:
            self.to_browser(sanitize_hello(res, rid, cfg.max_client_frame_bytes))
            return True
        res["id"] = rid
        self.to_browser(res)
        # The gateway closes after a refused connect; pass its code on (1008 if it does not).
        try:
            closing = await self.from_upstream(2.0)
            if closing is not None and closing.opcode == CLOSE:
                self._upstream_close(closing.payload)
                return False
        except (TimeoutError, WireError):
            pass
        self.close_both(WSCloseCode.POLICY_VIOLATION, "gateway refused the connection")
        return False

    def _upstream_close(self, payload: bytes) -> None:
        try:
            code, reason = parse_close(payload)
        except WireError as exc:
            self._broken(self.upstream, exc)
            return
        self._peer_closed(self.upstream, code, reason)

    # -- steady state: callbacks from data_received ----------------------------------------------

    def start(self, *, authenticated: bool) -> None:
        """The handshake is over: from now on both sockets call the relay directly. Only after
        hello-ok may browser messages be as large as `max_client_frame_bytes`."""
        if authenticated:
            self.browser.asm.max_message = self.ctx.config.max_client_frame_bytes
            self.browser.asm.too_large = (WSCloseCode.POLICY_VIOLATION, "frame too large")
        self.relaying = True
        self.ctx.meter.attach(self)
        rest = self.upstream.asm.rest()
        self.browser.resume(_HANDSHAKE)
        self.upstream.resume(_HANDSHAKE)
        if rest:
            self.from_gateway(rest)
        self.pump_browser()

    def from_gateway(self, data: bytes) -> None:
        """Gateway bytes to the browser as they come: only frame boundaries are tracked."""
        upstream = self.upstream
        if upstream.got_close:
            return
        payload = upstream.stream.whole(data)
        if payload >= 0:  # one whole data frame, the usual read: forwarded as it is
            self._out += payload
            browser = self.browser
            if browser.transport is not None and not browser.sent_close:
                browser.transport.write(data)
            return
        out: list[bytes] = []
        controls: list[Control] = []
        try:
            payload = upstream.stream.feed(data, out, controls)
        except WireError as exc:
            self._broken(upstream, exc)
            return
        self._out += payload
        browser = self.browser
        if out and browser.transport is not None and not browser.sent_close:
            if len(out) == 1:
                browser.transport.write(out[0])
            else:
                browser.transport.writelines(out)
        for control in controls:
            if control.opcode == CLOSE:
                self._upstream_close(control.payload)
            elif control.opcode == PING:
                browser.write(encode(PING, control.payload))
            elif control.payload != _HEARTBEAT:
                browser.write(encode(PONG, control.payload))

    def from_browser(self, data: bytes) -> None:
        """Browser bytes: a read that is one whole text frame goes straight to the checks (the
        usual case, no buffering), anything else through the assembler."""
        browser = self.browser
        if self._held is None and not browser.got_close and not browser.sent_close:
            msg = browser.asm.whole(data)
            if msg is not None:
                self._browser_text(msg, 0)
                return
        browser.asm.feed(data)
        self.pump_browser()

    def pump_browser(self) -> None:
        """Every complete browser message, checked and passed on in order; stops while one is held."""
        browser = self.browser
        asm = browser.asm
        while self._held is None and self.relaying and not browser.got_close:
            try:
                msg = asm.next()
            except WireError as exc:
                self._broken(browser, exc)
                return
            if msg is None:
                return
            op = msg.opcode
            if op == CLOSE:
                try:
                    code, reason = parse_close(msg.payload)
                except WireError as exc:
                    self._broken(browser, exc)
                    return
                self._peer_closed(browser, code, reason)
                return
            if browser.sent_close:
                continue  # we are closing it: only its close frame matters now
            if op == TEXT:
                self._browser_text(msg, 0)
            elif op == PING:
                self.upstream.write(msg.raw or b"")
            elif op == PONG:
                if msg.payload != _HEARTBEAT:
                    self.upstream.write(msg.raw or b"")
            else:
                self.close_both(WSCloseCode.POLICY_VIOLATION, "binary frames are not accepted")
                return

    def _browser_text(self, msg: Message, stage: int) -> None:
        """One browser message: byte budget (stage 0), strict parse and method check, frame rate."""
        data = msg.payload
        user = self.user_key
        ctx = self.ctx
        bytes_limiter = ctx.byte_limiter
        if stage == 0 and bytes_limiter is not None:
            cost = min(float(len(data)), float(bytes_limiter.burst))
            wait = bytes_limiter.acquire_now(user, cost)
            if wait is None:  # only the shared limiter can tell: wait for it with reading paused
                self._hold_task(pace(bytes_limiter, user, cost), lambda _: self._browser_text(msg, 1))
                return
            if wait > 0:  # over the budget: stop reading this socket and try again (TCP pushes back)
                self._hold_timer(min(wait, 1.0), lambda: self._browser_text(msg, 0))
                return
        try:
            req = parse_client_frame(data)
            # One set lookup passes most frames (no allowed name lower-cases to "connect").
            if req.method not in ALLOWED_ANY_PARAMS and req.method.lower() == "connect":
                raise FrameViolation("connect was already completed")
        except FrameViolation as exc:
            log.info("closing relay: %s", exc, extra={"agent_id": str(self.target.agent_id)})
            self.close_both(WSCloseCode.POLICY_VIOLATION, str(exc))
            return
        refusal = None if req.method in ALLOWED_ANY_PARAMS else blocked(req)
        if refusal is not None:
            log.info("blocked method", extra={"agent_id": str(self.target.agent_id),
                                              "method": req.method[:128], "rule": refusal.rule})
            self.to_browser(forbidden_response(req.id, req.method, refusal))
            return
        limiter = ctx.frame_limiter
        wait = limiter.acquire_now(user)
        if wait is None:
            self._hold_task(limiter.take(user), lambda w: self._rated(msg, req, w))
            return
        if wait > 0:
            self.to_browser(rate_limited_response(req.id, req.method, max(1, int(wait * 1000))))
            return
        # One frame: the browser's own masked bytes go up unchanged; a fragmented one is re-framed.
        self.upstream.write(msg.raw if msg.raw is not None else encode(TEXT, data, masked=True))
        self._in += len(data)

    def _rated(self, msg: Message, req: Request, wait: float) -> None:
        """The rest of `_browser_text` once a shared frame limiter answered."""
        if wait > 0:
            self.to_browser(rate_limited_response(req.id, req.method, max(1, int(wait * 1000))))
            return
        # One frame: the browser's own masked bytes go up unchanged; a fragmented one is re-framed.
        self.upstream.write(msg.raw if msg.raw is not None else encode(TEXT, msg.payload, masked=True))
        self._in += len(msg.payload)

    def _hold_timer(self, delay: float, then: Callable[[], None]) -> None:
        self.browser.pause(_HOLD)
        self._held = asyncio.get_running_loop().call_later(delay, self._release, then)

    def _hold_task(self, awaitable: Awaitable[Any], then: Callable[[Any], None]) -> None:
        """A limiter that must ask PostgreSQL: one task for this frame, reading paused meanwhile."""
        self.browser.pause(_HOLD)

        task = asyncio.ensure_future(awaitable)
        self._held = task

        def finished(t: asyncio.Task[Any]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.warning("relay limiter failed", exc_info=exc)
                self._held = None
                self.close_both(WSCloseCode.INTERNAL_ERROR, "proxy error")
                return
            self._release(lambda: then(t.result()))

        task.add_done_callback(finished)

    def _release(self, then: Callable[[], None]) -> None:
        self._held = None
        if self.browser.lost:
            return
        then()
        if self._held is None:
            self.browser.resume(_HOLD)
            self.pump_browser()


async def relay(request: web.Request, ctx: RelayContext, target: GatewayTarget, upstream_url: str,
                upstream_headers: dict[str, str], on_done: Callable[[], None]) -> web.StreamResponse:
    """Open the upstream, upgrade the browser, terminate the handshake, then relay until either
    side closes. `on_done` runs once, when the relay is over (or at once if it never started)."""
    cfg = ctx.config
    started = False
    try:
        if not target.relay_key_pem:
            return problem(503, "Gateway not paired", "The agent's VM is not ready for the Control UI yet.")
        response_head = _browser_101(request)
        if response_head is None:
            return problem(400, "Bad WebSocket upgrade", "Sec-WebSocket-Key or -Version is invalid.")
        pin = target.cert_sha256 if target.base_url.startswith("https://") else None
        try:
            upstream = await asyncio.wait_for(_open_upstream(URL(upstream_url, encoded=True), upstream_headers,
                                                             ctx.relay_origin, pin, cfg),
                                              cfg.upstream_connect_timeout_s)
        except _UpgradeRefused as exc:
            log.warning("gateway refused the websocket upgrade", extra={"agent_id": str(target.agent_id),
                                                                        "status": exc.status, "reason": str(exc)})
            return problem(502, "Gateway unavailable", "The agent's gateway refused the connection.")
        except (OSError, TimeoutError, ssl.SSLError):
            return problem(502, "Gateway unavailable", "The agent's gateway cannot be reached right now.")
        try:
            first = await upstream.receive(cfg.upstream_connect_timeout_s)
            if first is None or first.opcode != TEXT:
                raise ValueError("no connect.challenge")
            ctx.meter.add(target.vps_id, outbound=len(first.payload))
            challenge_frame = json.loads(first.payload)
            challenge = challenge_frame.get("payload") if isinstance(challenge_frame, dict) else None
            if (not isinstance(challenge_frame, dict) or challenge_frame.get("event") != "connect.challenge"
                    or not isinstance(challenge, dict) or not isinstance(challenge.get("nonce"), str)
                    or not isinstance(challenge.get("ts"), int)):
                raise ValueError("no connect.challenge")
        except (TimeoutError, ValueError, WireError):
            upstream.abort()
            return problem(502, "Gateway unavailable", "The agent's gateway did not start the handshake.")
        # Before hello-ok a browser may send no more than the connect frame's cap (as on the gateway).
        browser = _Socket(Assembler(require_mask=True, max_message=cfg.max_connect_frame_bytes,
                                    too_large=(WSCloseCode.POLICY_VIOLATION, "preauth payload too large")),
                          browser_side=True)
        if request.transport is None or request.protocol is None:
            upstream.abort()
            return problem(502, "Gateway unavailable", "The browser went away.")
        relay_conn = Relay(ctx, target, browser, upstream, on_done)
        try:
            _take_over(request, browser, response_head)
        except Exception:
            upstream.abort()
            raise
        started = True
        ctx.open_relays.add(relay_conn)
        authenticated = False
        try:
            authenticated = await relay_conn.handshake(challenge)
        except asyncio.CancelledError:  # the server is shutting down mid-handshake
            relay_conn.close_both(WSCloseCode.GOING_AWAY, "proxy closing", upstream_code=WSCloseCode.GOING_AWAY)
            raise
        except Exception:
            log.warning("relay handshake failed", exc_info=True)
            relay_conn.close_both(WSCloseCode.INTERNAL_ERROR, "proxy error")
        # Relaying or closing: either way the sockets are read from callbacks now (a failed
        # handshake has sent its close frames; only the peers' answers are still looked for).
        relay_conn.start(authenticated=authenticated)
        if browser.lost and upstream.lost:
            relay_conn.lost(upstream)  # both already gone (e.g. during the handshake): finish now
        return _Upgraded()
    finally:
        if not started:
            on_done()
