"""Connection admission for the proxy's two listeners: caps, a header timeout, quiet refusals.

Why: aiohttp holds a connection that never sends a request for its keep-alive timeout (an hour by
default) and has no limit on how many it holds, so idle or slowloris connections filled the
descriptor table; `/healthz`, signed-in users and the forward proxy then all timed out, and asyncio
logged every failed accept (hundreds of MB a minute). Each listener now:

- admits at most `max_connections`, and at most `max_per_ip` per source address (IPv6 per /64,
  which one host usually holds whole); anything over is aborted in `connection_made`, before an
  aiohttp handler or a stream reader is built, and only counted;
- on the browser listener, closes a connection that has not sent a complete request head within
  `header_timeout_s` of opening, or of its first byte after the previous response (`track_requests`
  tells the guard when a request is being handled); idle keep-alive is aiohttp's `keepalive_timeout`;
- reports refusals and timeouts in one summary line at most once a minute, never per connection.

On the browser listener the guarded protocol is `proxy.http_fast`'s front (`GuardedSite(front=)`),
which serves plain gateway GETs itself and hands every other connection to aiohttp's handler; it
reports request boundaries to the guard as `track_requests` does for aiohttp.

The caps of both listeners are sized together against the process's descriptor limit
(`size_listeners`), so a flood on one cannot take the descriptors the other needs and accept()
never fails for lack of them.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from yarl import URL

from settings import Settings

__all__ = [
    "RESERVED_FDS",
    "ConnectionGuard",
    "GuardedProtocol",
    "GuardedSite",
    "ListenerLimits",
    "client_key",
    "listener_limits",
    "raise_fd_limit",
    "size_listeners",
    "start_stream_server",
    "track_requests",
]

log = logging.getLogger(__name__)

RESERVED_FDS = 128
"""Descriptors kept out of the listeners' budget: database pool, listening sockets, logs, DNS."""
BACKLOG = 1024
"""A deeper accept queue than asyncio's 100, so a burst of refused connections does not crowd
legitimate ones out of the kernel queue before we get to abort them."""
_REPORT_EVERY_S = 60.0


@functools.lru_cache(maxsize=4096)  # per request and per connection; addresses repeat
def client_key(host: str | None) -> str:
    """What the per-address cap counts: the IPv4 address, or the IPv6 /64 (a host's usual share)."""
    if not host:
        return "?"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass(frozen=True)
class ListenerLimits:
    max_connections: int
    max_per_ip: int
    header_timeout_s: float | None = None
    """None: the listener frames requests itself (the forward proxy has its own head timeout)."""


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one (as servers usually do); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def size_listeners(browser: ListenerLimits, forward: ListenerLimits, fd_limit: int
                   ) -> tuple[ListenerLimits, ListenerLimits]:
    """Both caps scaled down, in proportion, until they fit the descriptor limit.

    Each admitted connection may hold a second descriptor upstream (a relayed WebSocket or
    request, a forward tunnel), so a connection is budgeted at two, after `RESERVED_FDS`.
    """
    slots = max(0, fd_limit - RESERVED_FDS) // 2
    wanted = browser.max_connections + forward.max_connections
    if wanted <= slots:
        return browser, forward
    b = max(1, browser.max_connections * slots // wanted)
    f = max(1, forward.max_connections * slots // wanted)
    log.warning("connection caps lowered to fit the descriptor limit",
                extra={"fd_limit": fd_limit, "proxy_max_connections": b, "forward_proxy_max_connections": f})
    return (replace(browser, max_connections=b, max_per_ip=min(browser.max_per_ip, b)),
            replace(forward, max_connections=f, max_per_ip=min(forward.max_per_ip, f)))


class ConnectionGuard:
    """Counts one listener's open connections, refuses over the caps, reports in summaries."""

    def __init__(self, name: str, limits: ListenerLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limits = limits
        self.open = 0
        self.refused_cap = 0
        self.refused_per_ip = 0
        self.header_timeouts = 0
        self._per_ip: dict[str, int] = {}
        self._clock = clock
        self._reported = (0, 0, 0)
        self._last_report = -math.inf

    def open_from(self, key: str) -> int:
        return self._per_ip.get(key, 0)

    def admit(self, key: str) -> bool:
        if self.open >= self.limits.max_connections:
            self.refused_cap += 1
            self.report()
            return False
        count = self._per_ip.get(key, 0)
        if count >= self.limits.max_per_ip:
            self.refused_per_ip += 1
            self.report()
            return False
        self._per_ip[key] = count + 1
        self.open += 1
        return True

    def release(self, key: str) -> None:
        self.open -= 1
        count = self._per_ip.get(key, 0) - 1
        if count <= 0:
            self._per_ip.pop(key, None)
        else:
            self._per_ip[key] = count

    def timed_out(self) -> None:
        self.header_timeouts += 1
        self.report()

    def report(self, *, force: bool = False) -> None:
        """One line with what changed since the last one, at most once a minute (unless forced)."""
        now = self._clock()
        if not force and now - self._last_report < _REPORT_EVERY_S:
            return
        counts = (self.refused_cap, self.refused_per_ip, self.header_timeouts)
        if counts == self._reported:
            return
        last = self._reported
        self._reported, self._last_report = counts, now
        log.warning("connections refused or timed out", extra={
            "listener": self.name, "open": self.open, "refused_at_cap": counts[0] - last[0],
            "refused_per_ip_cap": counts[1] - last[1], "header_timeouts": counts[2] - last[2],
            "max_connections": self.limits.max_connections, "max_per_ip": self.limits.max_per_ip})

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], GuardedProtocol]:
        return lambda: GuardedProtocol(self, inner)


class GuardedProtocol(asyncio.Protocol):
    """Wraps the real protocol, built only once the connection is admitted; forwards every event."""

    __slots__ = ("_busy", "_factory", "_guard", "_head_since", "_inner", "_key", "_pending", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._key: str | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head_since: float | None = None
        """When the head being waited for began (loop time); None: no header timeout runs."""
        self._busy = 0
        self._pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        key = client_key(peer[0] if isinstance(peer, tuple) and peer else None)
        if not self._guard.admit(key):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._key = key
        self._transport = transport
        self._arm()
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._busy:
            self._pending = True  # a pipelined head, or a body: timed once the request is done
        elif self._head_since is None:
            self._arm()  # the first byte of the next request on a kept-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._key is None:
            return
        self._disarm(cancel=True)
        self._guard.release(self._key)
        self._key = None
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """The connection now belongs to `protocol` (a WebSocket relay took it over from aiohttp):
        it gets every later event, stays counted until it closes, and has no header timer again."""
        self._inner = protocol
        self._busy += 1  # never decremented: a relayed socket is a request that lasts
        self._pending = False
        self._disarm(cancel=True)

    # -- request boundaries (browser listener) --------------------------------------------------

    def request_started(self) -> None:
        self._busy += 1
        self._disarm()

    def request_finished(self) -> None:
        self._busy = max(0, self._busy - 1)
        if not self._busy and self._pending:
            self._pending = False
            self._arm()

    def _arm(self) -> None:
        """A head is awaited from now: `header_timeout_s` for it. The timer is lazy: one that is
        still pending from an earlier head is kept and re-aimed when it fires (a timer made and
        cancelled per request costs more than the rest of the guard)."""
        timeout = self._guard.limits.header_timeout_s
        if timeout and self._head_since is None:
            loop = asyncio.get_running_loop()
            self._head_since = loop.time()
            if self._timer is None:
                self._timer = loop.call_at(self._head_since + timeout, self._expire)

    def _disarm(self, cancel: bool = False) -> None:
        """No head awaited any more (a request runs, or the connection ended: `cancel`)."""
        self._head_since = None
        if cancel and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._busy or self._transport is None or self._key is None or self._head_since is None:
            return
        deadline = self._head_since + self._guard.limits.header_timeout_s
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:  # armed for an earlier head: aim at this one's deadline
            self._timer = loop.call_at(deadline, self._expire)
            return
        self._guard.timed_out()
        self._transport.abort()  # type: ignore[attr-defined]


@web.middleware
async def track_requests(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Tells the connection's guard a request head is complete (no header timeout while it runs)."""
    transport = request.transport
    proto = transport.get_protocol() if transport is not None else None
    if not isinstance(proto, GuardedProtocol):
        return await handler(request)
    proto.request_started()
    try:
        return await handler(request)
    finally:
        proto.request_finished()


class GuardedSite(web.BaseSite):
    """An aiohttp TCP site whose connections pass a `ConnectionGuard` first."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *,
                 ssl_context: Any = None, backlog: int = BACKLOG, reuse_port: bool = False,
                 front: Callable[[Callable[[], asyncio.Protocol]], Callable[[], asyncio.Protocol]] | None = None
                 ) -> None:
        """`front` wraps aiohttp's protocol factory (proxy.http_fast serves plain GETs below it)."""
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.front = front
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self.guard = guard

    @property
    def name(self) -> str:
        return str(URL.build(scheme="https" if self._ssl_context else "http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        # The fast front speaks plain HTTP only (its requests say scheme "http"); TLS stays aiohttp's.
        front = self.front if self._ssl_context is None else None
        inner: Callable[[], asyncio.Protocol] = server if front is None else front(server)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.factory(inner), self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port or None)


async def start_stream_server(client_connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                              host: str, port: int, guard: ConnectionGuard, *, limit: int,
                              ssl: Any = None, ssl_handshake_timeout: float | None = None,
                              reuse_port: bool = False) -> asyncio.Server:
    """`asyncio.start_server`, with each connection passing the guard before a reader is built.

    With `ssl` the guard sees a connection once its handshake is done: `ssl_handshake_timeout`
    bounds how long one that never completes holds its socket."""
    loop = asyncio.get_running_loop()

    def protocol() -> asyncio.Protocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected, loop=loop)

    return await loop.create_server(guard.factory(protocol), host, port, ssl=ssl, backlog=BACKLOG,
                                    reuse_address=True, reuse_port=reuse_port or None,
                                    ssl_handshake_timeout=ssl_handshake_timeout if ssl else None)


def listener_limits(settings: Settings) -> tuple[ListenerLimits, ListenerLimits]:
    """(gateway proxy, forward proxy) limits from the settings, sized to the descriptor limit."""
    browser = ListenerLimits(settings.proxy_max_connections, settings.proxy_max_connections_per_ip,
                             header_timeout_s=settings.proxy_header_timeout_s)
    forward = ListenerLimits(settings.forward_proxy_max_connections, settings.forward_proxy_max_connections_per_ip)
    return size_listeners(browser, forward, raise_fd_limit())
