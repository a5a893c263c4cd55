"""The agents' forward proxy: HTTP (absolute-form) and CONNECT, one request per connection.

Each connection: Basic `agent_id:gateway_token` (compared in constant time), the agent's VM must
be live, per-user connection and rate limits (429 + Retry-After), the plan/overage check (403
with the reason), then the SSRF check (`proxy.egress`, 403 with the reason) and a connection to
the address that was checked. Bytes are metered per VPS in both directions.

The plan is enforced on running tunnels too, not only when they open: each tunnel (a CONNECT
tunnel or a plain HTTP exchange) re-checks its user's plan after every `forward_tunnel_byte_budget`
bytes it relays (before relaying more), and a watcher re-checks every user with open tunnels each
`forward_recheck_s` (usage counted by other processes or other dimensions). Over the plan, the
user's tunnels are cut: both sockets closed, nothing more relayed (no HTTP answer can be sent once
bytes have flowed). A check that fails for another reason (database down) keeps the tunnel and
logs a warning: new tunnels are refused meanwhile, since their check fails.

HTTP/1.1 is parsed just enough to frame it (Content-Length or chunked, never both, else 400),
so exactly one request goes upstream and nothing the client pipelines behind it reaches the
target unchecked; the upstream connection is `Connection: close`. Plain asyncio streams keep
every byte visible: relaying is read-one/write-one with `drain()`, so a slow side stalls the
other instead of buffering.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from ssl import SSLContext
from urllib.parse import SplitResult, urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from db.models import Agent, Vps, VpsState
from proxy.config import ProxyConfig
from proxy.egress import EgressPolicy, EgressRefused, EgressTarget
from proxy.enforcement import UsageEnforcer
from proxy.limits import ConnectionLimiter, RateLimiter, TokenBucket, retry_after_header, take
from proxy.listener import ConnectionGuard, start_stream_server
from proxy.metering import Meter

__all__ = ["ForwardCredentials", "ForwardProxy", "HeadError", "RequestHead", "parse_request_head"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
                         "proxy-connection", "te", "trailer", "upgrade", "expect"})
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
            407: "Proxy Authentication Required", 429: "Too Many Requests", 501: "Not Implemented",
            502: "Bad Gateway", 504: "Gateway Timeout"}
_LIVE_STATES = frozenset({VpsState.provisioning, VpsState.running})
_Count = Callable[[int], Awaitable[None]]
"""Charges relayed bytes to the tunnel's budget (may raise _Cut) and meters them."""
_DUMMY_TOKEN = "x" * 43  # compared against when the agent is unknown, so both paths do the same work


class HeadError(ValueError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]


def parse_request_head(raw: bytes) -> RequestHead:
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError(400, "malformed request line")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in parts[1]):
        raise HeadError(400, "malformed request target")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line == "":
            continue
        if line[0] in " \t":
            raise HeadError(400, "obsolete header folding")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise HeadError(400, "malformed header")
        value = value.strip(" \t")
        if any(c in value for c in "\r\n\x00"):
            raise HeadError(400, "malformed header value")
        headers.append((name, value))
    return RequestHead(parts[0].upper(), parts[1], parts[2], headers)


def _body_framing(head: RequestHead) -> tuple[str, int]:
    """('length', n) | ('chunked', 0) | ('none', 0); refuses the ambiguous cases (smuggling)."""
    te = head.get("Transfer-Encoding")
    cl = head.get("Content-Length")
    if te and cl:
        raise HeadError(400, "both Content-Length and Transfer-Encoding")
    if te:
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            raise HeadError(501, "unsupported transfer coding")
        return "chunked", 0
    if cl:
        values = {v.strip() for v in cl}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise HeadError(400, "invalid Content-Length")
        return "length", int(next(iter(values)))
    return "none", 0


@dataclass
class _Identity:
    agent_id: uuid.UUID
    user_id: uuid.UUID
    vps_id: uuid.UUID | None
    vps_state: str | None
    token: str = field(repr=False)


class ForwardCredentials:
    """agent_id -> (gateway token, user, VPS), cached briefly; tokens compared in constant time."""

    def __init__(self, engine: AsyncEngine, *, ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[uuid.UUID, tuple[float, _Identity | None]] = {}

    async def authenticate(self, header_values: list[str]) -> _Identity | None:
        if len(header_values) != 1:
            return None
        scheme, _, encoded = header_values[0].partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        agent_part, sep, token = decoded.partition(":")
        try:
            agent_id = uuid.UUID(agent_part)
        except ValueError:
            agent_id = None
        ident = await self._lookup(agent_id) if agent_id is not None and sep else None
        expected = ident.token if ident is not None else _DUMMY_TOKEN
        ok = hmac.compare_digest(token.encode(), expected.encode())
        return ident if ok and ident is not None else None

    async def _lookup(self, agent_id: uuid.UUID) -> _Identity | None:
        now = self._clock()
        hit = self._cache.get(agent_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        stmt = (select(Agent.user_id, Agent.gateway_token, Agent.vps_id, Vps.state)  # type: ignore[call-overload]
                .select_from(Agent).outerjoin(Vps, Vps.id == Agent.vps_id).where(Agent.id == agent_id))
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        ident = None if row is None else _Identity(agent_id, row[0], row[2], row[3], str(row[1]))
        self._cache[agent_id] = (now + self._ttl, ident)
        if len(self._cache) > 50_000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        return ident


class _Cut(Exception):
    """A running tunnel was cut by a plan re-check."""


class _Tunnel:
    """Enforcement state of one relayed connection: bytes since the last plan check, and the cut."""

    def __init__(self, user_id: uuid.UUID, agent_id: uuid.UUID, budget: int) -> None:
        self.user_id = user_id
        self.agent_id = agent_id
        self.budget = budget
        self.spent = 0
        self.cut_reason: str | None = None
        self.cut = asyncio.Event()
        self.answered = False
        """Bytes went back to the client: after a cut, a refusal can no longer be sent."""
        self.lock = asyncio.Lock()

    def cut_with(self, reason: str) -> None:
        if self.cut_reason is None:
            self.cut_reason = reason
        self.cut.set()


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


TLS_HANDSHAKE_TIMEOUT_S = 10.0
"""A cloud VM's TLS handshake with the forward proxy's TLS listener completes within this, or is dropped."""


class ForwardProxy:
    def __init__(self, *, config: ProxyConfig, meter: Meter, credentials: ForwardCredentials,
                 enforcer: UsageEnforcer, policy: EgressPolicy) -> None:
        self.config = config
        self.meter = meter
        self.credentials = credentials
        self.enforcer = enforcer
        self.policy = policy
        self.connections = ConnectionLimiter(config.forward_connections_per_user)
        self.rate: TokenBucket = RateLimiter(config.forward_rate_per_s, config.forward_burst)
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: dict[uuid.UUID, set[_Tunnel]] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, guard: ConnectionGuard | None = None, *,
                    ssl: SSLContext | None = None, reuse_port: bool = False) -> asyncio.Server:
        """A listener; with `ssl`, the TLS one cloud VMs use (their credentials never cross in clear)."""
        handshake_s = TLS_HANDSHAKE_TIMEOUT_S if ssl is not None else None
        if guard is not None:  # its own connection budget (proxy.listener)
            return await start_stream_server(self._on_connection, host, port, guard,
                                             limit=self.config.max_forward_head_bytes, ssl=ssl,
                                             ssl_handshake_timeout=handshake_s, reuse_port=reuse_port)
        return await asyncio.start_server(self._on_connection, host, port, limit=self.config.max_forward_head_bytes,
                                          ssl=ssl, ssl_handshake_timeout=handshake_s)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:
            log.exception("forward proxy connection failed")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one request ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), cfg.forward_head_timeout_s)
            head = parse_request_head(raw)
        except (asyncio.LimitOverrunError, ValueError) as exc:
            status = exc.status if isinstance(exc, HeadError) else 400
            await _reply(writer, status, exc.reason if isinstance(exc, HeadError) else "request head too large")
            return
        ident = await self.credentials.authenticate(head.get("Proxy-Authorization"))
        if ident is None:
            await _reply(writer, 407, "proxy authentication required (agent_id:gateway_token)",
                         {"Proxy-Authenticate": 'Basic realm="slopbox"'})
            return
        if ident.vps_id is None or ident.vps_state not in _LIVE_STATES:
            await _reply(writer, 403, "the agent's VM is not running")
            return
        if not self.connections.try_acquire(ident.user_id):
            await _reply(writer, 429, "too many open connections", {"Retry-After": "5"})
            return
        try:
            wait = await take(self.rate, ident.user_id)
            if wait > 0:
                raise _Refusal(429, "request rate limit exceeded", {"Retry-After": retry_after_header(wait)})
            verdict = await self.enforcer.check(ident.user_id)
            if not verdict.allowed:
                raise _Refusal(403, verdict.reason or "over the plan's limits")
            if head.method == "CONNECT":
                await self._tunnel(head, reader, writer, ident)
            else:
                await self._http(head, reader, writer, ident)
        except _Refusal as refusal:
            log.info("forward proxy refused", extra={"agent_id": str(ident.agent_id), "status": refusal.status,
                                                     "reason": refusal.reason})
            await _reply(writer, refusal.status, refusal.reason, refusal.headers)
        except HeadError as exc:
            await _reply(writer, exc.status, exc.reason)
        finally:
            self.connections.release(ident.user_id)

    async def _open(self, host: str, port: int) -> tuple[EgressTarget, asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            target = await self.policy.check(host, port)
        except EgressRefused as exc:
            raise _Refusal(403, exc.reason) from None
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(str(target.ip), target.port, limit=self.config.max_forward_head_bytes),
                self.config.forward_connect_timeout_s)
        except TimeoutError:
            raise _Refusal(504, "connecting to the destination timed out") from None
        except OSError:
            raise _Refusal(502, "cannot connect to the destination") from None
        return target, up_reader, up_writer

    # -- enforcement on running tunnels -------------------------------------------------------

    def _register(self, ident: _Identity) -> _Tunnel:
        tunnel = _Tunnel(ident.user_id, ident.agent_id, self.config.forward_tunnel_byte_budget)
        self._live.setdefault(ident.user_id, set()).add(tunnel)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="forward-plan-recheck")
        return tunnel

    def _unregister(self, tunnel: _Tunnel) -> None:
        tunnels = self._live.get(tunnel.user_id)
        if tunnels is not None:
            tunnels.discard(tunnel)
            if not tunnels:
                del self._live[tunnel.user_id]

    async def _over_plan(self, user_id: uuid.UUID) -> str | None:
        """Why this user's tunnels must be cut now, or None (also when the check itself fails)."""
        try:
            verdict = await self.enforcer.check(user_id)
        except LookupError:
            return "the user no longer exists"
        except Exception:
            log.warning("plan re-check failed; open tunnels kept", exc_info=True)
            return None
        return None if verdict.allowed else (verdict.reason or "over the plan's limits")

    async def _watch(self) -> None:
        """Re-check every user with open tunnels each `forward_recheck_s`; cut them all when over."""
        while self._live:
            await asyncio.sleep(self.config.forward_recheck_s)
            for user_id, tunnels in list(self._live.items()):
                if not tunnels:
                    continue
                reason = await self._over_plan(user_id)
                if reason is not None:
                    for tunnel in list(tunnels):
                        tunnel.cut_with(reason)

    async def _charge(self, tunnel: _Tunnel, n: int) -> None:
        """Count `n` bytes about to be relayed; once the budget is spent, re-check before relaying them."""
        if tunnel.cut.is_set():
            raise _Cut
        tunnel.spent += n
        if tunnel.spent < tunnel.budget:
            return
        async with tunnel.lock:  # both directions may spend the budget at once: one check
            if tunnel.spent >= tunnel.budget and not tunnel.cut.is_set():
                reason = await self._over_plan(tunnel.user_id)
                if reason is not None:
                    tunnel.cut_with(reason)
                tunnel.spent = 0
        if tunnel.cut.is_set():
            raise _Cut

    async def _relay(self, tunnel: _Tunnel, *coros: Coroutine[object, object, None]) -> None:
        """Run the copy loops until they finish or the tunnel is cut; a cut cancels them."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        cut = asyncio.ensure_future(tunnel.cut.wait())
        try:
            pending: set[asyncio.Future[object]] = set(tasks)
            while pending and not cut.done():
                done, _ = await asyncio.wait(pending | {cut}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {cut}:
                    pending.discard(task)
                    exc = task.exception()
                    if exc is not None and not isinstance(exc, _Cut):
                        raise exc
        finally:
            cut.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(cut, *tasks, return_exceptions=True)
        if tunnel.cut.is_set():
            log.info("forward proxy tunnel cut", extra={"agent_id": str(tunnel.agent_id), "reason": tunnel.cut_reason})

    # -- relaying ------------------------------------------------------------------------------

    async def _tunnel(self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ident: _Identity) -> None:
        host, port = _authority(head.target)
        _, up_reader, up_writer = await self._open(host, port)
        tunnel = self._register(ident)
        try:
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            vps = ident.vps_id
            assert vps is not None
            await self._relay(
                tunnel,
                self._pipe(reader, up_writer, tunnel, lambda n: self.meter.add(vps, outbound=n)),
                self._pipe(up_reader, writer, tunnel, lambda n: self.meter.add(vps, inbound=n)),
            )
        finally:
            self._unregister(tunnel)
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, tunnel: _Tunnel,
                    count: Callable[[int], None]) -> None:
        """Copy until EOF, then half-close `dst` so the other direction can finish."""
        try:
            while True:
                data = await asyncio.wait_for(src.read(_CHUNK), self.config.forward_idle_timeout_s)
                if not data:
                    break
                await self._charge(tunnel, len(data))
                dst.write(data)
                count(len(data))
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, TimeoutError, OSError):
            dst.close()

    async def _http(self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    ident: _Identity) -> None:
        url = urlsplit(head.target)
        if url.scheme.lower() != "http" or not url.hostname:
            raise _Refusal(400, "absolute http:// URL required (use CONNECT for https)")
        if url.username is not None or url.password is not None:
            raise _Refusal(400, "credentials in the URL are not allowed")
        try:
            port = url.port or 80
        except ValueError:
            raise _Refusal(400, "invalid port") from None
        framing, length = _body_framing(head)
        host_literal = url.netloc.rsplit("@", 1)[-1]
        _, up_reader, up_writer = await self._open(url.hostname if ":" not in url.hostname
                                                   else f"[{url.hostname}]", port)
        vps = ident.vps_id
        assert vps is not None
        tunnel = self._register(ident)

        async def out(n: int) -> None:
            await self._charge(tunnel, n)
            self.meter.add(vps, outbound=n)

        async def inbound(n: int) -> None:
            await self._charge(tunnel, n)
            self.meter.add(vps, inbound=n)
            tunnel.answered = True

        try:
            await self._relay(tunnel, self._exchange(head, url, host_literal, framing, length, reader, writer,
                                                     up_reader, up_writer, tunnel, out, inbound))
            if tunnel.cut.is_set() and not tunnel.answered:  # cut before any answer: say why
                raise _Refusal(403, tunnel.cut_reason or "over the plan's limits")
        finally:
            self._unregister(tunnel)
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    async def _exchange(self, head: RequestHead, url: SplitResult, host_literal: str, framing: str, length: int,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                        up_writer: asyncio.StreamWriter, tunnel: _Tunnel, out: _Count, inbound: _Count) -> None:
        """One request upstream (head rebuilt, body framed as declared), then its response back."""
        if any(v.lower() == "100-continue" for v in head.get("Expect")):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            tunnel.answered = True
        path = (url.path or "/") + ("?" + url.query if url.query else "")
        connection_tokens = {t.strip().lower() for v in head.get("Connection") for t in v.split(",")}
        lines = [f"{head.method} {path} HTTP/1.1"]
        if not head.get("Host"):
            lines.append(f"Host: {host_literal}")
        for name, value in head.headers:
            low = name.lower()
            if low in _HOP_BY_HOP or low in connection_tokens:
                continue
            lines.append(f"{name}: {value}")
        lines.append("Connection: close")
        request_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        await out(len(request_head))
        up_writer.write(request_head)
        await _copy_body(reader, up_writer, framing, length, out)
        await up_writer.drain()
        await self._relay_response(head.method, up_reader, writer, inbound)

    async def _relay_response(self, method: str, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              count: _Count) -> None:
        while True:
            try:
                raw = await asyncio.wait_for(up_reader.readuntil(b"\r\n\r\n"), self.config.forward_idle_timeout_s)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise _Refusal(502, "the destination sent an invalid response") from None
            lines = raw.decode("latin-1").split("\r\n")
            status_parts = lines[0].split(" ", 2)
            if len(status_parts) < 2 or not status_parts[1].isdigit():
                raise _Refusal(502, "the destination sent an invalid response")
            status = int(status_parts[1])
            headers = []
            for line in lines[1:]:
                if not line:
                    continue
                name, _, value = line.partition(":")
                headers.append((name, value.strip(" \t")))
            resp = RequestHead("", "", "HTTP/1.1", headers)
            if 100 <= status < 200 and status != 101:
                await count(len(raw))
                writer.write(raw)
                await writer.drain()
                continue
            break
        tokens = {t.strip().lower() for v in resp.get("Connection") for t in v.split(",")}
        out_lines = [lines[0]] + [f"{k}: {v}" for k, v in headers
                                  if k.lower() not in _HOP_BY_HOP and k.lower() not in tokens]
        out_lines.append("Connection: close")
        response_head = ("\r\n".join(out_lines) + "\r\n\r\n").encode("latin-1")
        await count(len(response_head))
        writer.write(response_head)
        if method == "HEAD" or status in (204, 304) or status == 101:
            await writer.drain()
            return
        try:
            framing, length = _body_framing(resp)
        except HeadError:
            framing, length = "eof", 0
        if framing == "none":
            framing = "eof"
        await _copy_body(up_reader, writer, framing, length, count, idle=self.config.forward_idle_timeout_s)
        await writer.drain()


async def _copy_body(src: asyncio.StreamReader, dst: asyncio.StreamWriter, framing: str, length: int,
                     count: _Count, idle: float = 600.0) -> None:
    """Copy one message body, framed as declared, and nothing after it."""
    async def read(n: int) -> bytes:
        return await asyncio.wait_for(src.read(n), idle)

    async def write(data: bytes) -> None:
        await count(len(data))  # charged (may cut) and metered before it is relayed
        dst.write(data)
        await dst.drain()

    if framing == "length":
        remaining = length
        while remaining > 0:
            data = await read(min(_CHUNK, remaining))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            await write(data)
    elif framing == "chunked":
        while True:
            line = await asyncio.wait_for(src.readuntil(b"\r\n"), idle)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HeadError(400, "malformed chunk size") from None
            if size < 0 or not size_text or not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
                raise HeadError(400, "malformed chunk size")
            await write(line)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await asyncio.wait_for(src.readuntil(b"\r\n"), idle)
                    await write(trailer)
                    if trailer == b"\r\n":
                        return
            remaining = size + 2
            while remaining > 0:
                data = await read(min(_CHUNK, remaining))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                await write(data)
    elif framing == "eof":
        while True:
            data = await read(_CHUNK)
            if not data:
                return
            await write(data)


def _authority(target: str) -> tuple[str, int]:
    """`host:port` of a CONNECT request (IPv6 in brackets)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise _Refusal(400, "CONNECT needs host:port")
    if host.startswith("[") != host.endswith("]"):
        raise _Refusal(400, "malformed host")
    return host, int(port)


async def _reply(writer: asyncio.StreamWriter, status: int, reason: str,
                 headers: dict[str, str] | None = None) -> None:
    body = f"Slopbox forward proxy: {reason}\n".encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
