"""Async WebSocket RPC client for the OpenClaw gateway (protocol v4).

Why a client of our own: activities need a small, typed, well-behaved caller. It must:
- survive the gateway's in-process restarts (`shutdown` event, close 1012, then 503 / connection
  refused / `UNAVAILABLE startup-sidecars` + close 1013 while it comes back);
- correlate responses by id while events stream in between;
- put a timeout on every call;
- turn error frames into exceptions that branch on `error.code` / `error.details.code`, never on
  message text (the one exception, stale config hashes, is documented on `ConfigConflictError`).

Typical use from an activity::

    async with GatewayClient(url, token=token, device=identity, device_token=stored) as gw:
        cfg = await gw.config_get()
        await gw.config_patch({"gateway": {"terminal": {"enabled": False}}})

Secrets (gateway token, device token, key material) are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets
from opentelemetry import trace
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from openclaw.device import DeviceIdentity, signature_token
from openclaw.tls import CertificatePinError, check_peer, pinned_context

__all__ = [
    "DEFAULT_OPERATOR_SCOPES",
    "PROTOCOL_VERSION",
    "RECONNECT_CLOSE_CODES",
    "AgentFileConflictError",
    "AuthRejectedError",
    "ClientInfo",
    "ConfigConflictError",
    "EventSubscription",
    "ForbiddenError",
    "GatewayClient",
    "GatewayConnectionError",
    "GatewayPinError",
    "GatewayError",
    "GatewayEvent",
    "GatewayProtocolError",
    "GatewayTimeoutError",
    "HelloOk",
    "InvalidRequestError",
    "MissingScopeError",
    "NotPairedError",
    "OpenClawError",
    "UnavailableError",
    "UnknownMethodError",
]

log = logging.getLogger(__name__)
# The OpenTelemetry API's tracer: a no-op until a process turns tracing on (telemetry/tracing.py).
_tracer = trace.get_tracer(__name__)


@contextlib.contextmanager
def _rpc_span(name: str, method: str) -> Iterator[None]:
    """One client span per gateway call: the method's name only (never params, results, tokens), and
    on failure the error's class and code, not its message (which may quote what was sent)."""
    with _tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, record_exception=False,
                                       set_status_on_exception=False,
                                       attributes={"rpc.system": "openclaw", "rpc.method": method}) as span:
        try:
            yield
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            if isinstance(exc, GatewayError) and exc.code:
                span.set_attribute("openclaw.error_code", exc.code)
            span.set_status(trace.Status(trace.StatusCode.ERROR))
            raise

PROTOCOL_VERSION = 4

# What the control plane's admin identity asks for (reference §1.3 / §6.7).
DEFAULT_OPERATOR_SCOPES: tuple[str, ...] = (
    "operator.admin",
    "operator.read",
    "operator.write",
    "operator.approvals",
    "operator.pairing",
)

# 1012 service restart, 1013 try again later (gateway starting), 1006 abnormal drop (process died or
# network blip), 4000 our own tick watchdog. Anything else (1008 policy, 4001 auth changed) is final.
RECONNECT_CLOSE_CODES: frozenset[int] = frozenset({1006, 1012, 1013, 4000})

_MAX_PAYLOAD = 26_214_400  # hello-ok.policy.maxPayload
_SHUTDOWN_GRACE_S = 5.0  # a `shutdown` event is followed by close 1012 within milliseconds
_CONNECT_ERROR_PREFIXES = ("AUTH_", "DEVICE_AUTH_", "CONTROL_UI_", "PROTOCOL_MISMATCH", "CLIENT_VERSION")


# --------------------------------------------------------------------------------------------------
# Errors


class OpenClawError(Exception):
    """Base for everything this client raises."""


class GatewayError(OpenClawError):
    """The gateway answered `ok:false`; attributes mirror the error frame."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        retryable: bool = False,
        retry_after_ms: int | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(f"{method}: {code}: {message}" if method else f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms
        self.method = method

    @property
    def details_code(self) -> str | None:
        value = self.details.get("code")
        return value if isinstance(value, str) else None

    @classmethod
    def from_error(cls, error: Any, method: str | None = None) -> GatewayError:
        """Pick the most specific subclass for an `error` object from a `res` frame."""
        if not isinstance(error, Mapping):
            return GatewayProtocolErrorFrame("INVALID_RESPONSE", f"malformed error: {error!r}", method=method)
        code = str(error.get("code") or "UNKNOWN")
        message = str(error.get("message") or "")
        details = error.get("details") if isinstance(error.get("details"), Mapping) else {}
        retry_after = error.get("retryAfterMs")
        kwargs: dict[str, Any] = {
            "details": details,
            "retryable": bool(error.get("retryable", False)),
            "retry_after_ms": int(retry_after) if isinstance(retry_after, int | float) else None,
            "method": method,
        }
        details_code = details.get("code") if isinstance(details, Mapping) else None
        klass: type[GatewayError] = GatewayError
        if code == "FORBIDDEN":
            klass = MissingScopeError if details_code == "MISSING_SCOPE" else ForbiddenError
        elif code == "NOT_PAIRED":
            klass = NotPairedError
        elif code == "UNAVAILABLE":
            klass = UnavailableError
        elif code == "INVALID_REQUEST":
            klass = InvalidRequestError
            if message.startswith("unknown method:"):
                klass = UnknownMethodError
            elif isinstance(details_code, str) and details_code.startswith(_CONNECT_ERROR_PREFIXES):
                klass = AuthRejectedError
            elif isinstance(details, Mapping) and details.get("type") == "agent_file_conflict":
                klass = AgentFileConflictError
            elif ConfigConflictError.matches(message):
                klass = ConfigConflictError
        return klass(code, message, **kwargs)


class GatewayProtocolErrorFrame(GatewayError):
    """The gateway sent an error we could not parse; kept as a GatewayError so callers catch one type."""


class ForbiddenError(GatewayError):
    """FORBIDDEN: the socket lacks the authority for this call."""


class MissingScopeError(ForbiddenError):
    """FORBIDDEN / MISSING_SCOPE: the effective scopes (hello-ok.auth.scopes) do not cover the method."""

    @property
    def missing_scope(self) -> str | None:
        value = self.details.get("missingScope")
        return value if isinstance(value, str) else None

    @property
    def required_scopes(self) -> list[str]:
        value = self.details.get("requiredScopes")
        return [str(v) for v in value] if isinstance(value, list) else []


class InvalidRequestError(GatewayError):
    """INVALID_REQUEST: bad params, unknown method, conflicts, or a refused connect."""


class UnknownMethodError(InvalidRequestError):
    """`unknown method: X` (also what a filtering proxy answers for a blocked method)."""


class AuthRejectedError(InvalidRequestError):
    """The handshake was refused (AUTH_*, DEVICE_AUTH_*, CONTROL_UI_*, PROTOCOL_MISMATCH); not retryable."""


class ConfigConflictError(InvalidRequestError):
    """config.patch/apply refused because `baseHash` is missing or stale.

    The gateway gives no details code for this (src/gateway/server-methods/config.ts answers
    INVALID_REQUEST with a fixed message), so this is the one place we match message text.
    """

    _MARKERS = ("config changed since last load", "config base hash required", "config base hash unavailable")

    @classmethod
    def matches(cls, message: str) -> bool:
        return any(marker in message for marker in cls._MARKERS)


class AgentFileConflictError(InvalidRequestError):
    """agents.files.set with a stale `expectedHash` (details.type == "agent_file_conflict")."""

    @property
    def current_hash(self) -> str | None:
        value = self.details.get("currentHash")
        return value if isinstance(value, str) else None


class UnavailableError(GatewayError):
    """UNAVAILABLE: starting, restarting, rate limited; honour `retry_after_ms`."""


class NotPairedError(GatewayError):
    """NOT_PAIRED: the device must be approved (PAIRING_REQUIRED) or presented (DEVICE_IDENTITY_REQUIRED)."""

    @property
    def request_id(self) -> str | None:
        value = self.details.get("requestId")
        return value if isinstance(value, str) else None

    @property
    def reason(self) -> str | None:
        value = self.details.get("reason")
        return value if isinstance(value, str) else None


class GatewayTimeoutError(OpenClawError, TimeoutError):
    """No response within the call's timeout (the request may still run on the gateway)."""

    def __init__(self, method: str, timeout: float) -> None:
        super().__init__(f"{method}: no response within {timeout:g}s")
        self.method = method
        self.timeout = timeout


class GatewayConnectionError(OpenClawError, ConnectionError):
    """The socket is gone (or could not be opened); `retryable` says whether reconnecting may help."""

    def __init__(
        self,
        message: str,
        *,
        close_code: int | None = None,
        close_reason: str | None = None,
        http_status: int | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.close_reason = close_reason
        self.http_status = http_status
        self.retryable = retryable


class GatewayPinError(GatewayConnectionError):
    """The `wss://` peer's certificate is not the one pinned for this gateway: never retried, and
    nothing (no token, no signature) was sent on that connection."""


class GatewayProtocolError(OpenClawError):
    """The gateway sent something the protocol does not allow (e.g. no challenge first)."""


# --------------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class ClientInfo:
    """`connect.params.client`. Defaults are the local-backend identity the reference recommends."""

    id: str = "gateway-client"
    mode: str = "backend"
    version: str = "0.1.0"
    platform: str = "linux"
    device_family: str | None = None
    display_name: str | None = None
    instance_id: str | None = None

    def to_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "version": self.version,
            "platform": self.platform,
            "mode": self.mode,
        }
        if self.device_family:
            out["deviceFamily"] = self.device_family
        if self.display_name:
            out["displayName"] = self.display_name
        if self.instance_id:
            out["instanceId"] = self.instance_id
        return out


@dataclass(frozen=True)
class HelloOk:
    """The parts of `hello-ok` callers need; `raw` keeps the whole payload."""

    raw: dict[str, Any]

    @property
    def protocol(self) -> int:
        return int(self.raw.get("protocol", 0))

    @property
    def server(self) -> dict[str, Any]:
        return dict(self.raw.get("server") or {})

    @property
    def server_version(self) -> str | None:
        return self.server.get("version")

    @property
    def methods(self) -> list[str]:
        return list((self.raw.get("features") or {}).get("methods") or [])

    @property
    def events(self) -> list[str]:
        return list((self.raw.get("features") or {}).get("events") or [])

    @property
    def snapshot(self) -> dict[str, Any]:
        return dict(self.raw.get("snapshot") or {})

    @property
    def auth(self) -> dict[str, Any]:
        return dict(self.raw.get("auth") or {})

    @property
    def auth_method(self) -> str | None:
        return self.auth.get("method")

    @property
    def scopes(self) -> list[str]:
        """Effective scopes: the gateway silently narrows what was asked for."""
        return list(self.auth.get("scopes") or [])

    @property
    def device_token(self) -> str | None:
        return self.auth.get("deviceToken")

    @property
    def policy(self) -> dict[str, Any]:
        return dict(self.raw.get("policy") or {})

    @property
    def tick_interval_ms(self) -> int:
        return int(self.policy.get("tickIntervalMs") or 30_000)


@dataclass(frozen=True)
class GatewayEvent:
    event: str
    payload: Any
    seq: int | None = None
    state_version: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> GatewayEvent:
        seq = frame.get("seq")
        sv = frame.get("stateVersion")
        return cls(
            event=str(frame.get("event")),
            payload=frame.get("payload"),
            seq=seq if isinstance(seq, int) else None,
            state_version=dict(sv) if isinstance(sv, Mapping) else None,
            raw=dict(frame),
        )


class EventSubscription:
    """A queue of events (optionally filtered by name); create it *before* the call that triggers them."""

    def __init__(self, client: GatewayClient, names: frozenset[str] | None, maxsize: int) -> None:
        self._client = client
        self._names = names
        self._queue: asyncio.Queue[GatewayEvent] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    def _offer(self, event: GatewayEvent) -> None:
        if self._names is not None and event.event not in self._names:
            return
        if self._queue.full():  # keep the newest: drop the oldest
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def get(self, timeout: float | None = 30.0) -> GatewayEvent:  # noqa: ASYNC109 (per-call deadline)
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            names = ",".join(sorted(self._names)) if self._names else "*"
            raise GatewayTimeoutError(f"event {names}", timeout or 0.0) from None

    async def wait_for(
        self,
        predicate: Callable[[GatewayEvent], bool],
        timeout: float | None = 30.0,  # noqa: ASYNC109 (per-call deadline is the API)
    ) -> GatewayEvent:
        """Skip events until one matches; the overall timeout covers all of them."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self._queue.get()
                    if predicate(event):
                        return event
        except TimeoutError:
            raise GatewayTimeoutError("event wait", timeout or 0.0) from None

    def get_nowait(self) -> GatewayEvent | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def close(self) -> None:
        self._client._subscriptions.discard(self)

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[GatewayEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GatewayEvent]:
        while True:
            yield await self._queue.get()


EventCallback = Callable[[GatewayEvent], Awaitable[None] | None]


# --------------------------------------------------------------------------------------------------
# Client


class GatewayClient:
    """One logical connection to one gateway, reconnecting across restarts.

    Auth: pass the gateway `token` (shared secret) and/or a `device_token` from an earlier hello-ok,
    plus a persistent `device` identity when connecting from anywhere but the gateway's own host.
    A device token issued in hello-ok is kept for reconnects and handed to `on_device_token` so the
    caller can store it (encrypted).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        password: str | None = None,
        device_token: str | None = None,
        device: DeviceIdentity | None = None,
        client: ClientInfo | None = None,
        role: str = "operator",
        scopes: Sequence[str] = DEFAULT_OPERATOR_SCOPES,
        caps: Sequence[str] = (),
        origin: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 20.0,
        reconnect: bool = True,
        reconnect_timeout: float = 120.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        reconnect_close_codes: Iterable[int] = RECONNECT_CLOSE_CODES,
        on_event: EventCallback | None = None,
        on_device_token: Callable[[str], Awaitable[None] | None] | None = None,
        on_reconnect: Callable[[HelloOk], Awaitable[None] | None] | None = None,
        cert_sha256: str | None = None,
    ) -> None:
        self.url = url
        # With a pin, `wss://` trusts exactly that certificate (no CA store); see openclaw/tls.py.
        self._cert_sha256 = cert_sha256
        self._token = token
        self._password = password
        self.device_token = device_token
        self._device = device
        self._client = client or ClientInfo()
        self._role = role
        self._scopes = list(scopes)
        self._caps = list(caps)
        self._origin = origin
        self._headers = dict(headers or {})
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._reconnect_enabled = reconnect
        self.reconnect_timeout = reconnect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._reconnect_codes = frozenset(reconnect_close_codes)
        self._listeners: list[EventCallback] = [on_event] if on_event else []
        self._on_device_token = on_device_token
        self._on_reconnect = on_reconnect

        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._hello: HelloOk | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscriptions: set[EventSubscription] = set()
        self._ready: asyncio.Future[ClientConnection] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._restart_hint_ms: int | None = None
        self._terminal_shutdown = False
        self._local_close_code: int | None = None
        self._last_frame_at = 0.0
        self.reconnect_count = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def hello(self) -> HelloOk:
        if self._hello is None:
            raise GatewayConnectionError("not connected")
        return self._hello

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._ready is not None and self._ready.done() and not self._closing

    @property
    def reconnecting(self) -> bool:
        """The socket closed with a restart code and the client is trying to come back by itself."""
        return self._reconnect_task is not None and not self._reconnect_task.done()

    async def connect(self) -> HelloOk:
        """Open the socket and handshake, retrying transient failures (refused, HTTP 5xx on the upgrade,
        UNAVAILABLE / close 1013 while the gateway starts) until `connect_timeout`."""
        self._closing = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        delay = self.backoff_initial
        with _rpc_span("gateway connect", "connect"):
            while True:
                try:
                    ws, hello = await self._handshake(deadline - loop.time())
                    break
                except (UnavailableError, GatewayConnectionError) as exc:
                    if not _is_retryable(exc) or loop.time() >= deadline:
                        raise
                    wait = _retry_delay(exc, delay)
                    delay = min(delay * 2, self.backoff_max)
                    log.info("gateway not ready (%s); retrying connect in %.2fs", _describe(exc), wait)
                    await asyncio.sleep(min(wait, max(0.0, deadline - loop.time())))
        self._install(ws, hello)
        return hello

    async def close(self) -> None:
        """Close the socket, stop reconnecting and fail outstanding calls."""
        self._closing = True
        tasks = [t for t in (self._reconnect_task, self._watchdog_task) if t is not None]
        for task in tasks:
            task.cancel()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader_task, 5)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_pending(GatewayConnectionError("client closed"))
        self._set_ready_error(GatewayConnectionError("client closed"))
        for task in list(self._background):
            task.cancel()

    # -- events ------------------------------------------------------------------------------------

    def subscribe(self, *names: str, maxsize: int = 1000) -> EventSubscription:
        """Queue events named `names` (all events if none) from now on; close it when done."""
        sub = EventSubscription(self, frozenset(names) if names else None, maxsize)
        self._subscriptions.add(sub)
        return sub

    def add_event_listener(self, callback: EventCallback) -> Callable[[], None]:
        """Call `callback` for every event (sync or async); returns an unsubscribe function."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    # -- calls -----------------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (per-call deadline is the API)
    ) -> Any:
        """Send one request and return its payload, raising a typed GatewayError on `ok:false`."""
        with _rpc_span(f"gateway {method}", method):
            return await self._call(method, params, self.request_timeout if timeout is None else timeout)

    async def _call(self, method: str, params: Mapping[str, Any] | None, limit: float) -> Any:
        try:
            async with asyncio.timeout(limit):
                ws = await self._wait_ready()
                rid = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
                future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._pending[rid] = future
                try:
                    frame = {"type": "req", "id": rid, "method": method, "params": dict(params or {})}
                    try:
                        await ws.send(json.dumps(frame))
                    except ConnectionClosed as exc:
                        raise self._closed_error(exc) from None
                    response = await future
                finally:
                    self._pending.pop(rid, None)
        except TimeoutError:
            raise GatewayTimeoutError(method, limit) from None
        if response.get("ok") is True:
            return response.get("payload")
        err = GatewayError.from_error(response.get("error"), method)
        log.debug("gateway %s failed: %s %s", method, err.code, err.details_code or "")
        raise err

    async def read(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (per-call deadline is the API)
    ) -> Any:
        """`call` for side-effect-free methods: if the socket drops mid-call with a reconnect code
        (restart), it waits for the reconnect and asks once more instead of failing."""
        try:
            return await self.call(method, params, timeout=timeout)
        except GatewayConnectionError as exc:
            if not exc.retryable or self._closing:
                raise
            log.info("%s interrupted by close %s; retrying after reconnect", method, exc.close_code)
            return await self.call(method, params, timeout=timeout)

    async def health(self) -> dict[str, Any]:
        return await self.read("health")

    async def status(self) -> dict[str, Any]:
        return await self.read("status")

    async def config_get(self) -> dict[str, Any]:
        return await self.read("config.get")

    async def config_patch(
        self,
        patch: Mapping[str, Any] | str,
        *,
        base_hash: str | None = None,
        replace_paths: Sequence[str] | None = None,
        note: str | None = None,
        restart_delay_ms: int | None = None,
        session_key: str | None = None,
        max_attempts: int = 3,
        timeout: float | None = None,  # noqa: ASYNC109 (per-call deadline is the API)
    ) -> dict[str, Any]:
        """JSON merge-patch the gateway config.

        Without `base_hash` it fetches a fresh hash first and, if someone else wrote in between,
        re-reads and retries (at most `max_attempts` times): a merge patch re-applied on top of the
        newer config is still what the caller meant. With an explicit `base_hash` it tries once.
        Lists shrink only for paths named in `replace_paths` (the gateway refuses otherwise).
        """
        raw = patch if isinstance(patch, str) else json.dumps(patch)
        params: dict[str, Any] = {"raw": raw}
        _put(params, replacePaths=list(replace_paths) if replace_paths else None, note=note)
        _put(params, restartDelayMs=restart_delay_ms, sessionKey=session_key)
        if base_hash is not None:
            return await self.call("config.patch", {**params, "baseHash": base_hash}, timeout=timeout)
        attempts = max(1, max_attempts)
        for attempt in range(1, attempts + 1):
            current = await self.config_get()
            fresh = current.get("hash")  # sent even when no file exists yet: a hashless patch is refused
            try:
                return await self.call("config.patch", {**params, **({"baseHash": fresh} if fresh else {})},
                                       timeout=timeout)
            except ConfigConflictError:
                if attempt == attempts:
                    raise
                log.info("config.patch hash conflict; retrying with a fresh hash (%d/%d)", attempt, attempts)
        raise AssertionError("unreachable")

    async def config_apply(
        self,
        config: Mapping[str, Any] | str,
        *,
        base_hash: str | None = None,
        note: str | None = None,
        restart_delay_ms: int | None = None,
        session_key: str | None = None,
    ) -> dict[str, Any]:
        """Replace the whole config. Without `base_hash` it uses the current one; no automatic retry,
        because retrying a full replacement would silently drop a concurrent writer's change."""
        raw = config if isinstance(config, str) else json.dumps(config, indent=2)
        if base_hash is None:
            current = await self.config_get()
            base_hash = current.get("hash")
        params: dict[str, Any] = {"raw": raw}
        _put(params, baseHash=base_hash, note=note, restartDelayMs=restart_delay_ms, sessionKey=session_key)
        return await self.call("config.apply", params)

    async def agents_files_list(self, agent_id: str = "main") -> dict[str, Any]:
        return await self.read("agents.files.list", {"agentId": agent_id})

    async def agents_files_get(self, agent_id: str, name: str) -> dict[str, Any]:
        """Returns `{agentId, workspace, file{name, path, missing, size?, hash?, content?}}`."""
        return await self.read("agents.files.get", {"agentId": agent_id, "name": name})

    async def agents_files_set(
        self, agent_id: str, name: str, content: str, *, expected_hash: str | None = None
    ) -> dict[str, Any]:
        """Write a workspace file; with `expected_hash` a concurrent change raises AgentFileConflictError."""
        params: dict[str, Any] = {"agentId": agent_id, "name": name, "content": content}
        _put(params, expectedHash=expected_hash)
        return await self.call("agents.files.set", params)

    async def channels_status(
        self, *, channel: str | None = None, probe: bool | None = None, timeout_ms: int | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {}
        _put(params, channel=channel, probe=probe, timeoutMs=timeout_ms)
        call_timeout = self.request_timeout + (timeout_ms or 0) / 1000
        return await self.read("channels.status", params, timeout=call_timeout)

    async def channels_logout(self, channel: str, *, account_id: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"channel": channel}
        _put(params, accountId=account_id)
        return await self.call("channels.logout", params)

    async def web_login_start(
        self,
        *,
        channel: str | None = None,
        account_id: str | None = None,
        force: bool | None = None,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        """Start a QR login (WhatsApp); returns `{qrDataUrl?, message, connected?}`."""
        params: dict[str, Any] = {}
        _put(params, channel=channel, accountId=account_id, force=force, timeoutMs=timeout_ms)
        return await self.call("web.login.start", params, timeout=self.request_timeout + (timeout_ms or 0) / 1000)

    async def web_login_wait(
        self,
        *,
        channel: str | None = None,
        account_id: str | None = None,
        current_qr_data_url: str | None = None,
        timeout_ms: int = 30_000,
    ) -> dict[str, Any]:
        """Block until connected, the QR rotated (new `qrDataUrl`) or `timeout_ms` passed."""
        params: dict[str, Any] = {"timeoutMs": timeout_ms}
        _put(params, channel=channel, accountId=account_id, currentQrDataUrl=current_qr_data_url)
        return await self.call("web.login.wait", params, timeout=self.request_timeout + timeout_ms / 1000)

    async def gateway_restart_request(
        self, *, reason: str | None = None, skip_deferral: bool | None = None
    ) -> dict[str, Any]:
        """Ask for an in-process restart; the client reconnects by itself after the 1012 close."""
        params: dict[str, Any] = {}
        _put(params, reason=reason, skipDeferral=skip_deferral)
        return await self.call("gateway.restart.request", params)

    async def chat_send(
        self, session_key: str, message: str, *, idempotency_key: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "sessionKey": session_key,
            "message": message,
            "idempotencyKey": idempotency_key or uuid.uuid4().hex,
            **extra,
        }
        return await self.call("chat.send", params)

    async def chat_history(self, session_key: str, *, limit: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"sessionKey": session_key}
        _put(params, limit=limit)
        return await self.read("chat.history", params)

    async def device_pair_list(self) -> dict[str, Any]:
        return await self.read("device.pair.list")

    async def device_pair_approve(self, request_id: str) -> dict[str, Any]:
        return await self.call("device.pair.approve", {"requestId": request_id})

    async def device_pair_reject(self, request_id: str) -> dict[str, Any]:
        return await self.call("device.pair.reject", {"requestId": request_id})

    # -- internals -------------------------------------------------------------------------------

    def _auth_params(self) -> dict[str, Any]:
        auth: dict[str, Any] = {}
        if self._token:
            auth["token"] = self._token
        elif self.device_token:
            auth["deviceToken"] = self.device_token
        if self._password:
            auth["password"] = self._password
        return auth

    def _connect_params(self, challenge: Mapping[str, Any]) -> dict[str, Any]:
        auth = self._auth_params()
        params: dict[str, Any] = {
            "minProtocol": PROTOCOL_VERSION,
            "maxProtocol": PROTOCOL_VERSION,
            "client": self._client.to_params(),
            "role": self._role,
            "scopes": list(self._scopes),
            "caps": list(self._caps),
        }
        if auth:
            params["auth"] = auth
        if self._device is not None:
            nonce = challenge.get("nonce")
            ts = challenge.get("ts")
            if not isinstance(nonce, str) or not isinstance(ts, int):
                raise GatewayProtocolError("connect.challenge without nonce/ts")
            params["device"] = self._device.connect_proof(
                nonce=nonce,
                signed_at_ms=ts,
                client_id=self._client.id,
                client_mode=self._client.mode,
                role=self._role,
                scopes=self._scopes,
                token=signature_token(auth),
                platform=self._client.platform,
                device_family=self._client.device_family,
            )
        return params

    async def _handshake(self, budget: float) -> tuple[ClientConnection, HelloOk]:
        budget = max(0.1, budget)
        try:
            pinned = self._cert_sha256 is not None and self.url.startswith("wss://")
            ws = await websockets.connect(
                self.url,
                ssl=pinned_context() if pinned else None,
                additional_headers=self._headers or None,
                origin=self._origin,  # type: ignore[arg-type]
                open_timeout=budget,
                max_size=_MAX_PAYLOAD,
                compression=None,
                ping_interval=20,
                ping_timeout=25,
                close_timeout=2,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise GatewayConnectionError(
                f"websocket upgrade refused with HTTP {status}", http_status=status, retryable=status >= 500
            ) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise GatewayConnectionError(f"cannot open {self.url}: {exc!r}", retryable=True) from None
        if pinned:
            try:
                check_peer(ws.transport.get_extra_info("ssl_object"), str(self._cert_sha256))
            except CertificatePinError as exc:
                await ws.close()
                raise GatewayPinError(str(exc), retryable=False) from None
        try:
            async with asyncio.timeout(budget):
                challenge = _parse(await ws.recv())
                if challenge.get("type") != "event" or challenge.get("event") != "connect.challenge":
                    raise GatewayProtocolError("first frame was not connect.challenge")
                connect_id = f"connect-{uuid.uuid4().hex[:8]}"
                params = self._connect_params(challenge.get("payload") or {})
                await ws.send(json.dumps({"type": "req", "id": connect_id, "method": "connect", "params": params}))
                while True:
                    frame = _parse(await ws.recv())
                    if frame.get("type") == "res" and frame.get("id") == connect_id:
                        break
        except ConnectionClosed as exc:
            await ws.close()
            raise self._closed_error(exc, during_handshake=True) from None
        except TimeoutError:
            await ws.close()
            raise GatewayConnectionError("handshake timed out", retryable=True) from None
        except BaseException:
            await ws.close()
            raise
        if frame.get("ok") is not True:
            err = GatewayError.from_error(frame.get("error"), "connect")
            await ws.close()
            raise err
        payload = frame.get("payload")
        if not isinstance(payload, dict) or payload.get("type") != "hello-ok":
            await ws.close()
            raise GatewayProtocolError("connect succeeded without a hello-ok payload")
        return ws, HelloOk(payload)

    def _install(self, ws: ClientConnection, hello: HelloOk) -> None:
        self._ws = ws
        self._hello = hello
        self._local_close_code = None
        self._last_frame_at = asyncio.get_running_loop().time()
        token = hello.device_token
        if token and token != self.device_token:
            self.device_token = token
            if self._on_device_token is not None:
                self._spawn(self._on_device_token(token))
        self._reader_task = asyncio.create_task(self._reader(ws), name="openclaw-rpc-reader")
        self._watchdog_task = asyncio.create_task(self._watchdog(ws, hello.tick_interval_ms / 1000))
        if self._ready is None or self._ready.done():
            self._ready = asyncio.get_running_loop().create_future()
        self._ready.set_result(ws)
        log.info(
            "connected to gateway %s (protocol %s, auth %s, %d scopes)",
            hello.server_version,
            hello.protocol,
            hello.auth_method,
            len(hello.scopes),
        )

    async def _wait_ready(self) -> ClientConnection:
        while True:
            if self._closing:
                raise GatewayConnectionError("client closed")
            ready = self._ready
            if ready is None:
                raise GatewayConnectionError("not connected (call connect() first)")
            ws = await asyncio.shield(ready)
            if ws is self._ws:
                return ws
            await asyncio.sleep(0)  # a stale "ready" for a socket already gone: look again

    async def _reader(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in ws:
                self._last_frame_at = loop.time()
                try:
                    frame = json.loads(message)
                except (TypeError, ValueError):
                    log.warning("ignoring non-JSON frame from gateway")
                    continue
                if not isinstance(frame, dict):
                    continue
                kind = frame.get("type")
                if kind == "res":
                    future = self._pending.get(str(frame.get("id")))
                    if future is not None and not future.done():
                        future.set_result(frame)
                elif kind == "event":
                    self._dispatch(GatewayEvent.from_frame(frame))
        except ConnectionClosed:
            pass
        except Exception:  # never let the reader die silently
            log.exception("gateway reader failed")
        finally:
            self._on_disconnect(ws)

    def _dispatch(self, event: GatewayEvent) -> None:
        if event.event == "shutdown":
            self._on_shutdown(event)
        for sub in list(self._subscriptions):
            sub._offer(event)
        for listener in list(self._listeners):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                log.exception("event listener failed for %s", event.event)

    def _on_shutdown(self, event: GatewayEvent) -> None:
        """The gateway is going away: hold new calls until the reconnect instead of sending them
        on a socket about to close with 1012 (calls already in flight fail with a retryable error)."""
        payload = event.payload if isinstance(event.payload, Mapping) else {}
        hint = payload.get("restartExpectedMs")
        self._restart_hint_ms = int(hint) if isinstance(hint, int | float) else None
        # No restartExpectedMs = the gateway is stopping for good (SIGTERM): do not reconnect.
        self._terminal_shutdown = self._restart_hint_ms is None
        ws = self._ws
        if ws is None or self._ready is None or not self._ready.done() or self._ready.exception() is not None:
            return
        if self._ready.result() is ws:
            self._ready = asyncio.get_running_loop().create_future()

            async def close_if_lingering() -> None:
                await asyncio.sleep(_SHUTDOWN_GRACE_S)
                if self._ws is ws:  # the gateway announced shutdown but kept the socket: move on
                    self._local_close_code = 1012
                    await ws.close(1000, "gateway shutdown")

            self._spawn(close_if_lingering())

    async def _watchdog(self, ws: ClientConnection, tick_s: float) -> None:
        """Close with 4000 when the gateway has been silent for two tick intervals (as the reference client)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(asyncio.CancelledError):
            while self._ws is ws:
                await asyncio.sleep(tick_s)
                if self._ws is ws and loop.time() - self._last_frame_at > 2 * tick_s:
                    log.warning("gateway silent for %.0fs; reconnecting", 2 * tick_s)
                    self._local_close_code = 4000
                    await ws.close(4000, "tick timeout")
                    return

    def _on_disconnect(self, ws: ClientConnection) -> None:
        if self._ws is not ws:
            return
        code = self._local_close_code or ws.close_code or 1006
        reason = ws.close_reason or ""
        self._ws = None
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        terminal, self._terminal_shutdown = self._terminal_shutdown, False
        retry = self._reconnect_enabled and not self._closing and code in self._reconnect_codes and not terminal
        error = GatewayConnectionError(
            f"gateway {'stopped' if terminal else 'connection closed'} ({code} {reason})".strip(),
            close_code=code,
            close_reason=reason,
            retryable=code in self._reconnect_codes,
        )
        self._fail_pending(error)
        if self._closing:
            return
        log.info("gateway connection closed with %s %s", code, reason)
        if retry:
            if self._ready is None or self._ready.done():
                self._ready = asyncio.get_running_loop().create_future()
            self._reconnect_task = asyncio.create_task(self._reconnect_loop(), name="openclaw-rpc-reconnect")
        else:
            self._set_ready_error(error)

    async def _reconnect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout
        hint = self._restart_hint_ms
        self._restart_hint_ms = None
        delay = min(hint / 1000, self.backoff_max) if hint else self.backoff_initial
        backoff = self.backoff_initial
        last: BaseException | None = None
        while not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(delay, remaining))
            try:
                ws, hello = await self._handshake(min(self.connect_timeout, max(0.1, deadline - loop.time())))
            except (GatewayError, GatewayConnectionError, GatewayProtocolError) as exc:
                last = exc
                if not _is_retryable(exc):
                    log.warning("reconnect refused by gateway: %s", _describe(exc))
                    self._set_ready_error(exc)
                    return
                delay = _retry_delay(exc, backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            if self._closing:
                await ws.close()
                return
            self.reconnect_count += 1
            self._install(ws, hello)
            if self._on_reconnect is not None:
                self._spawn(self._on_reconnect(hello))
            return
        self._set_ready_error(
            GatewayConnectionError(f"could not reconnect within {self.reconnect_timeout:g}s: {last!r}")
        )

    def _closed_error(self, exc: ConnectionClosed, *, during_handshake: bool = False) -> GatewayConnectionError:
        code = exc.rcvd.code if exc.rcvd is not None else 1006
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        where = "during handshake" if during_handshake else ""
        return GatewayConnectionError(
            f"gateway closed the connection {where} ({code} {reason})".replace("  ", " "),
            close_code=code,
            close_reason=reason,
            retryable=code in self._reconnect_codes,
        )

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _set_ready_error(self, error: BaseException) -> None:
        if self._ready is None or self._ready.done():
            self._ready = asyncio.get_running_loop().create_future()
        self._ready.set_exception(error)
        self._ready.add_done_callback(lambda f: f.exception())  # mark retrieved

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                log.exception("gateway client callback failed")

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _parse(message: str | bytes) -> dict[str, Any]:
    try:
        frame = json.loads(message)
    except (TypeError, ValueError):
        raise GatewayProtocolError("gateway sent a non-JSON frame") from None
    if not isinstance(frame, dict):
        raise GatewayProtocolError("gateway sent a non-object frame")
    return frame


def _put(target: dict[str, Any], **values: Any) -> None:
    """Add only the parameters that were given: the gateway's param schemas are closed."""
    for key, value in values.items():
        if value is not None:
            target[key] = value


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, UnavailableError):
        return True
    if isinstance(exc, GatewayConnectionError):
        return exc.retryable
    return False


def _retry_delay(exc: BaseException, fallback: float) -> float:
    if isinstance(exc, GatewayError) and exc.retry_after_ms:
        return exc.retry_after_ms / 1000
    return fallback


def _describe(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return f"{exc.code} {exc.details_code or exc.details.get('reason') or ''}".strip()
    if isinstance(exc, GatewayConnectionError):
        return f"close={exc.close_code} http={exc.http_status}"
    return type(exc).__name__
