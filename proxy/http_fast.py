"""Plain gateway GETs served below aiohttp's server; everything else still goes through aiohttp.

Why: aiohttp's server side (its parser, `web.Request`, the router, middleware, the response
writer) was the largest share of the proxy's CPU per Control UI request (~150 µs against nginx's
~45). This front sits between the listener's `GuardedProtocol` and aiohttp's `RequestHandler`:

- it frames each request head itself (`\\r\\n\\r\\n`) and parses it with httptools. A request takes
  the fast path only when it is unremarkable: HTTP/1.1, GET or HEAD, no body (neither
  `Content-Length` nor `Transfer-Encoding`), no `Upgrade` or `Expect`, exactly one `Host`, a head
  within aiohttp's own limits (8190 bytes, under 100 fields), a target in printable ASCII that
  aiohttp's router would send to `GatewayProxy.handle` (`/agents/<id>/gateway[/...]`, the id
  without escapes or braces);
- anything else (a WebSocket upgrade, `/healthz`, another path, another method, a body, a
  malformed or oversized head, HTTP/1.0, bare-LF line endings) hands the connection, with every
  byte not yet answered, to aiohttp's `RequestHandler` for the rest of its life, so aiohttp answers
  it exactly as it did before (its 400s, 404s, routing, the WebSocket take-over in
  `proxy.ws_relay`);
- a fast request runs the very same `GatewayProxy.handle` (every check, the same problem+json
  answers and headers) on a `FastRequest` that carries what the handler reads from a
  `web.Request`; the `web.Response` it returns is written the way aiohttp writes it
  (`Content-Length`, default `Content-Type`, `Date`, `Server`, `Connection: close`, no body for
  HEAD/204/304), and a streamed body goes out chunked, with write flow control;
- one task per connection (`_serve`) runs its requests one after another and waits on a future
  between them; the listener's guard still sees request boundaries (header timeout off while a
  request runs), pipelined heads wait their turn, idle keep-alive ends after `keepalive_timeout` as in aiohttp,
  and `shutdown` closes idle connections and lets running requests finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp._cookie_helpers import parse_cookie_header
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_keepalive
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.listener import GuardedProtocol

__all__ = ["FastFront", "FastRequest", "FastResponse"]

log = logging.getLogger(__name__)

MAX_HEAD = 8190
"""aiohttp's `max_line_size`/`max_field_size`: a longer head goes to aiohttp, which answers it."""
MAX_FIELDS = 100
"""Under aiohttp's `max_headers` (128): more fields go to aiohttp too."""
_MAX_PENDING = 256 * 1024
"""Pipelined bytes buffered while a request runs before reading pauses."""
_GATEWAY_TARGET = re.compile(rb"/agents/[A-Za-z0-9_-]+/gateway(?:[/?][\x21-\x22\x24-\x7e]*)?")
"""What aiohttp routes to `GatewayProxy.handle`, conservatively: a plain id, printable ASCII, no `#`
(and no dot segment, checked apart), so no normalisation or decoding can route it elsewhere."""
_NOT_FAST_FIELDS = frozenset({"content-length", "transfer-encoding", "upgrade", "expect"})
_ONE_WRITE = 64 * 1024
"""Bodies up to this size go out in one write with their head (copying is cheaper than a syscall)."""
_EMPTY_STATUS = frozenset({204, 304})
_REASONS = {status.value: status.phrase for status in HTTPStatus}


@functools.lru_cache(maxsize=1024)
def _cookies(header: str) -> MappingProxyType[str, str]:
    # aiohttp's private parser, the one behind `web.Request.cookies`: both fronts must read a Cookie
    # header alike (tests/test_proxy_http_fast.py compares them on tricky headers).
    return MappingProxyType({name: morsel.value for name, morsel in parse_cookie_header(header)})


def _fields(block: str) -> CIMultiDictProxy[str] | None:
    """The header fields of a head (`block`: from the request line's CRLF to the end), or None
    when they keep the request off the fast path (too many, obs-fold, a body or upgrade header,
    not exactly one Host). Not memoised by itself: the whole head's parse is (`_parse_head_cached`)."""
    fields = block.split("\r\n")[1:-2]
    if len(fields) > MAX_FIELDS:
        return None
    pairs: list[tuple[str, str]] = []
    hosts = 0
    for line in fields:
        name, colon, value = line.partition(":")
        if not colon or not name or line[0] in " \t":  # obs-fold or worse: aiohttp's
            return None
        low = name.lower()
        if low in _NOT_FAST_FIELDS:
            return None
        if low == "host":
            hosts += 1
        pairs.append((name, value.strip(" \t")))
    if hosts != 1:
        return None
    return CIMultiDictProxy(CIMultiDict(pairs))




class _Head:
    """httptools callbacks for one request head: it validates the grammar, we read the fields
    from the text afterwards (one decode and one split instead of two callbacks per field)."""

    __slots__ = ("keep_alive", "method", "parser", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.parser: httptools.HttpRequestParser | None = None
        self.method = b""
        self.version = ""
        self.keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        """Read here: once the message is complete the parser has reset for the next one."""
        assert self.parser is not None
        self.method = self.parser.get_method()
        self.version = self.parser.get_http_version()
        self.keep_alive = self.parser.should_keep_alive()


_Parsed = tuple[str, str, CIMultiDictProxy[str], bool, str]


def _parse_head(head: bytes) -> _Parsed | None:
    """(method, target, fields, keep-alive, Host) of a whole request head when it may take the fast path
    (see the module docstring); None: aiohttp's. A pure function of the bytes."""
    cb = _Head()
    parser = cb.parser = httptools.HttpRequestParser(cb)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # an upgrade is aiohttp's
        return None
    cb.parser = None
    if cb.version != "1.1":
        return None
    method = cb.method
    if method not in (b"GET", b"HEAD") or not _GATEWAY_TARGET.fullmatch(cb.url) or b"/." in cb.url:
        return None
    # As aiohttp decodes a head (UTF-8, surrogateescape), fields split from the validated text.
    text = head.decode("utf-8", "surrogateescape")
    crlf = text.count("\r\n")
    if text.count("\n") != crlf or text.count("\r") != crlf:
        return None  # a bare CR or LF: aiohttp's to judge
    block = text[text.index("\r\n"):]  # the fields, without the request line
    headers = _fields(block)
    if headers is None:
        return None
    return method.decode(), cb.url.decode("ascii"), headers, cb.keep_alive, headers["Host"]


_parse_head_cached = functools.lru_cache(maxsize=1024)(_parse_head)
"""Per request: a browser sends the very same head bytes (path, cookie and all) again and again,
and the verdict and fields are a pure function of them (the fields proxy is read-only, shared)."""
_CACHED_HEAD_MAX = 4096
"""Longer heads are parsed every time (the memo holds at most ~4 MiB of heads)."""


class FastRequest(dict[Any, Any]):
    """What `GatewayProxy.handle` reads from a `web.Request`, for a bodiless GET or HEAD.

    A dict, as `web.Request` is a mutable mapping for per-request state."""

    __slots__ = ("_chunked", "_conn", "headers", "host", "keep_alive", "method", "raw_path", "remote", "streamed")
    body_exists = False
    scheme = "http"

    def __init__(self, conn: _FastProtocol, method: str, raw_path: str, headers: CIMultiDictProxy[str],
                 keep_alive: bool, host: str) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.host = host
        """The `Host` field (exactly one: the front takes no other request)."""
        self.remote = conn.remote
        self.keep_alive = keep_alive
        self.streamed: web.StreamResponse | None = None
        self._chunked = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    @property
    def counter(self) -> Any:
        """A per-connection object of the handler's (`proxy.metering.ConnectionBytes`), or None
        until it sets one; its `close()` is called when the connection ends."""
        return self._conn.counter

    @counter.setter
    def counter(self, value: Any) -> None:
        self._conn.counter = value

    @property
    def path(self) -> str:
        """Decoded path, as aiohttp's `request.path` (only logged)."""
        return URL(self.raw_path, encoded=True).path

    @property
    def cookies(self) -> MappingProxyType[str, str]:
        """aiohttp's own parse of the `Cookie` header (`web.Request.cookies`), memoised per header
        value (a pure function of it; a browser sends the same one on every request)."""
        return _cookies(self.headers.get("Cookie", ""))

    # -- a streamed body (the handler's StreamResponse path) ------------------------------------

    async def start_stream(self, response: web.StreamResponse) -> None:
        """The status line and headers of a body of unknown length (chunked, as aiohttp sends it)."""
        headers = response.headers
        self._chunked = self.method != "HEAD" and response.status not in _EMPTY_STATUS and \
            not 100 <= response.status < 200 and "Content-Length" not in headers
        if self._chunked:
            headers["Transfer-Encoding"] = "chunked"
        head, _empty = self._conn.head(self, response.status, response.reason, headers, body_length=None)
        self.streamed = response  # from here on the handler writes the answer
        self._conn.write(head)
        await self._conn.drain()

    async def write(self, chunk: bytes) -> None:
        if not chunk or self.method == "HEAD":
            return
        self._conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk)
        await self._conn.drain()

    async def write_eof(self) -> None:
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")
        await self._conn.drain()


class FastResponse:
    """A whole answer with a bytes body, for a `FastRequest` only: what `_FastProtocol._respond`
    reads of a `web.Response` (status, reason, headers, body), without aiohttp's per-response set-up
    and its copy of the headers. `headers` are only read (they may be shared, read-only); `small`:
    they are known to be small (the answer's head may come from a memoised template).
    Written exactly as the equivalent `web.Response` (a reason with CR or LF: the same 500)."""

    __slots__ = ("body", "headers", "reason", "small", "status")

    def __init__(self, status: int, reason: str | None, headers: CIMultiDict[str] | CIMultiDictProxy[str],
                 body: bytes, *, small: bool = False) -> None:
        self.small = small
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body


def _server_error(request: FastRequest) -> web.Response:
    """aiohttp's answer to a handler that raised (`RequestHandler.handle_error`, debug off)."""
    request.keep_alive = False
    title = f"{HTTPStatus.INTERNAL_SERVER_ERROR.value} {HTTPStatus.INTERNAL_SERVER_ERROR.phrase}"
    msg = HTTPStatus.INTERNAL_SERVER_ERROR.description
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(status=500, content_type="text/html", text=(
            f"<html><head><title>{title}</title></head><body>\n<h1>{title}</h1>\n{msg}\n</body></html>\n"))
    return web.Response(status=500, text=title + "\n\n" + msg, content_type="text/plain")


@functools.lru_cache(maxsize=1024)
def _head_template(status: int, reason: str | None, fields: tuple[tuple[str, str], ...], head_method: bool,
                   closing: bool, body_length: int | None, whole: bool) -> tuple[bytes, bytes | None, bool]:
    """A response head as aiohttp writes it (`Response._start`, `_prepare_headers`; `whole`: with the
    length of a whole body of `body_length` bytes): the bytes before and after the `Date` value
    (None after when the fields carry their own `Date`), and whether no body follows. A pure
    function of its arguments: the fast front's answers repeat the same few heads (a refusal with
    CR or LF raises, and is never kept)."""
    headers: CIMultiDict[str] = CIMultiDict(fields)
    no_body_status = status in _EMPTY_STATUS or 100 <= status < 200
    empty = no_body_status or head_method
    if whole:
        if "Content-Length" in headers:
            if no_body_status:
                del headers["Content-Length"]
        elif body_length or (status != 304 and not head_method):
            headers["Content-Length"] = str(body_length)
    if empty:
        headers.pop("Transfer-Encoding", None)
        if no_body_status:
            headers.pop("Content-Length", None)
    else:
        length = headers.get("Content-Length")
        if (int(length) if length is not None else body_length) != 0 and "Content-Type" not in headers:
            headers["Content-Type"] = "application/octet-stream"
    dated = "Date" not in headers
    if dated:
        headers["Date"] = _DATE_MARK
    if "Server" not in headers:
        headers["Server"] = SERVER_SOFTWARE
    if closing and "Connection" not in headers:
        headers["Connection"] = "close"
    reason = reason if reason is not None else _REASONS.get(status, "")
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if "\n" in reason or "\r" in reason or lines.count("\n") != len(headers) or lines.count("\r") != len(headers):
        raise ValueError("Newline or carriage return character detected in HTTP status message or header")
    head = f"HTTP/1.1 {status} {reason}\r\n{lines}\r\n".encode()
    if not dated:
        return head, None, empty
    before, _, after = head.rpartition(_DATE_MARK.encode())  # ours is the last: only Server and Connection follow
    return before, after, empty


_DATE_MARK = "\x00date\x00"
"""Where the `Date` value goes in a head template (NUL: never in a header value we write)."""


class FastFront:
    """Per listener: builds the front protocol for each admitted connection, and shuts them down."""

    def __init__(self, handle: Callable[[Any], Awaitable[web.StreamResponse | FastResponse]], *,
                 keepalive_timeout: float,
                 shutdown_timeout: float = 5.0) -> None:
        self.handle = handle
        self.keepalive_timeout = keepalive_timeout
        self.shutdown_timeout = shutdown_timeout
        self.connections: set[_FastProtocol] = set()
        self.closing = False
        self.served = 0
        """Requests answered on the fast path (the rest went to aiohttp)."""

    def factory(self, fallback: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _FastProtocol(self, fallback)

    async def shutdown(self) -> None:
        """Idle connections closed now; running requests get `shutdown_timeout`, then are cut."""
        self.closing = True
        running = []
        for conn in list(self.connections):
            if not conn.busy or conn.task is None:
                conn.close()
            else:
                running.append(conn.task)
        if running:
            _done, pending = await asyncio.wait(running, timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
        for conn in list(self.connections):
            conn.close()


class _FastProtocol(asyncio.Protocol):
    __slots__ = ("_buf", "_drain", "_eof", "_fallback", "_fallback_factory", "_front", "_guard", "_idle",
                 "_idle_since", "_paused_reading", "_waiter", "_write_paused", "busy", "counter", "remote", "task",
                 "transport")

    def __init__(self, front: FastFront, fallback: Callable[[], asyncio.Protocol]) -> None:
        self._front = front
        self._fallback_factory = fallback
        self._fallback: asyncio.Protocol | None = None
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.task: asyncio.Task[None] | None = None
        """The connection's one task (`_serve`): its requests one after another; parked between them."""
        self.busy = False
        """A request is running (its head is in, its answer not all written)."""
        self._waiter: asyncio.Future[FastRequest | None] | None = None
        """Where the parked task waits for the next request (None: it ends)."""
        self._guard: GuardedProtocol | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None
        """Since when (loop time) the connection waits for a request with nothing buffered; None: not idle."""
        self._paused_reading = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._eof = False
        self.counter: Any = None
        """What the handler counts per connection (`FastRequest.counter`); closed with the connection."""

    # -- asyncio events ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        guard = transport.get_protocol()  # type: ignore[attr-defined]
        self._guard = guard if isinstance(guard, GuardedProtocol) else None
        tcp_keepalive(transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple | list) and peer else None
        self._front.connections.add(self)
        self._become_idle()  # as aiohttp (3.14): idle from the moment it opens

    def data_received(self, data: bytes) -> None:
        if self._fallback is not None:
            self._fallback.data_received(data)
            return
        self._buf += data
        if not self.busy:
            request = self._next()
            if request is not None:
                self._start(request)
        elif len(self._buf) > _MAX_PENDING and not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self._fallback is not None:
            return self._fallback.eof_received()
        self._eof = True
        if not self.busy:
            self.close()
        return True  # half-closed: a running request still answers, then we close

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.connections.discard(self)
        self._cancel_idle()
        if self.counter is not None:
            self.counter.close()
        if self._fallback is not None:
            self._fallback.connection_lost(exc)
            return
        self.transport = None
        self._wake_drain()
        self._wake(None)

    def pause_writing(self) -> None:
        if self._fallback is not None:
            self._fallback.pause_writing()
            return
        self._write_paused = True

    def resume_writing(self) -> None:
        if self._fallback is not None:
            self._fallback.resume_writing()
            return
        self._write_paused = False
        self._wake_drain()

    # -- requests ------------------------------------------------------------------------------

    def _next(self) -> FastRequest | None:
        """The next buffered request when it takes the fast path (the guard is told it started);
        None: no whole head yet, or the connection went to aiohttp or was closed."""
        self._idle_since = None  # bytes came: the keep-alive timeout no longer runs (the guard's header timeout does)
        buf = self._buf
        if not buf:
            return None
        if self._front.closing:  # shutting down: no new request on this connection
            self.close()
            return None
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD or b"\n\n" in buf:
                self._fall_back()
            return None
        head = bytes(buf[:end + 4])
        request = self._parse(head) if end + 4 <= MAX_HEAD else None
        if request is None:
            self._fall_back()
            return None
        del buf[:end + 4]
        self._front.served += 1
        self.busy = True
        if self._guard is not None:
            self._guard.request_started()
        return request

    def _start(self, request: FastRequest) -> None:
        """Run `request` on the connection's task: wake it where it is parked, or start it (also
        when the parked one was cancelled and has not ended yet)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(request)
        else:
            self.task = asyncio.get_running_loop().create_task(self._serve(request))

    def _wake(self, request: FastRequest | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(request)

    def _parse(self, head: bytes) -> FastRequest | None:
        """The request, if it may take the fast path (see the module docstring); None: aiohttp's."""
        parsed = _parse_head_cached(head) if len(head) <= _CACHED_HEAD_MAX else _parse_head(head)
        if parsed is None:
            return None
        return FastRequest(self, *parsed)

    async def _serve(self, request: FastRequest | None) -> None:
        """The connection's requests, one after another, on one task: parked on a future between
        requests (a task per request cost ~1 µs more: asyncio registers each task in a WeakSet,
        which is Python code). Ends when the connection closes or goes to aiohttp."""
        try:
            while request is not None:
                try:  # one request: handled, answered, drained (inline: no coroutine per request)
                    try:
                        response = await self._front.handle(request)
                    except Exception:
                        log.exception("Error handling request from %s", request.remote)
                        response = _server_error(request)
                    if request.streamed is None:
                        try:
                            self._respond(request, response)
                        except Exception:  # a header with CR/LF, a body that is not bytes: aiohttp's 500 too
                            log.exception("Error handling request from %s", request.remote)
                            self._respond(request, _server_error(request))
                        await self.drain()
                except ConnectionError:
                    request.keep_alive = False  # the browser went away; nothing more to write
                finally:
                    self.busy = False
                    if self._guard is not None:
                        self._guard.request_finished()
                if self.transport is None:
                    return
                if not request.keep_alive or self._front.closing or self._eof:
                    self.close()
                    return
                if self._paused_reading:
                    self._paused_reading = False
                    self.transport.resume_reading()
                request = None
                if self._buf:
                    request = self._next()
                    if request is None and (self._fallback is not None or self.transport is None
                                            or self.transport.is_closing()):
                        return
                else:
                    self._become_idle()
                if request is None:
                    waiter = self._waiter = asyncio.get_running_loop().create_future()
                    request = await waiter
        finally:
            if self.task is asyncio.current_task():  # not a successor started after a cancel
                self.task = None
                self._waiter = None

    def _respond(self, request: FastRequest, response: web.StreamResponse | FastResponse) -> None:
        """A `web.Response` (or `FastResponse`) written as aiohttp's `Response._start` and
        `_prepare_headers` write it (its headers are read, not changed)."""
        status = response.status
        body = getattr(response, "body", None) or b""
        if not isinstance(body, bytes | bytearray):
            raise TypeError("the fast path writes bytes bodies only")
        head, empty = self.head(request, status, response.reason, response.headers, len(body), whole=True,
                                memo=getattr(response, "small", False))
        if not body or empty:
            self.write(head)
        elif len(body) <= _ONE_WRITE:
            self.write(head + body)  # one send() instead of two
        else:
            self.write(head)
            self.write(body)

    def head(self, request: FastRequest, status: int, reason: str | None, headers: CIMultiDict[str] | Any,
             body_length: int | None, *, whole: bool = False, memo: bool = False) -> tuple[bytes, bool]:
        """Status line and headers, with aiohttp's defaults, and whether the answer has no body
        (`whole`: a whole answer of `body_length` bytes, whose length we state); CR or LF anywhere in
        them is refused. From a template per (status, reason, fields, HEAD, close, length): only the
        `Date` is filled in per answer; the template is memoised only for `memo` (fields known to be
        small: `FastResponse.small`), so no memo holds a VM's large head."""
        closing = not request.keep_alive or self._front.closing
        if closing:
            request.keep_alive = False
        template = _head_template if memo else _head_template.__wrapped__
        before, after, empty = template(status, reason, tuple(headers.items()), request.method == "HEAD",
                                        closing, body_length, whole)
        if after is None:
            return before, empty
        return before + rfc822_formatted_time().encode() + after, empty

    # -- writing -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("Connection lost")
        if self._write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain
            if self.transport is None:
                raise ConnectionResetError("Connection lost")

    def _wake_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # -- connection state ----------------------------------------------------------------------

    def _fall_back(self) -> None:
        """aiohttp's request handler gets the connection, and every byte we have not answered."""
        if self.transport is None:
            return
        self._cancel_idle()  # aiohttp times its own keep-alive from here
        self._front.connections.discard(self)
        handler = self._fallback_factory()
        self._fallback = handler
        self._wake(None)  # the connection's task, if parked, ends
        handler.connection_made(self.transport)
        if self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()
        if self._write_paused:
            handler.pause_writing()
        data, self._buf = bytes(self._buf), bytearray()
        if data:
            handler.data_received(data)

    def _become_idle(self) -> None:
        """Waiting for the next request from now: closed after `keepalive_timeout`. The timer is
        lazy: one still pending from an earlier idle spell is kept and re-aimed when it fires (a
        timer made and cancelled per request costs more than the rest of the keep-alive logic)."""
        timeout = self._front.keepalive_timeout
        if timeout:
            loop = asyncio.get_running_loop()
            self._idle_since = loop.time()
            if self._idle is None:
                self._idle = loop.call_at(self._idle_since + timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if self._fallback is not None or self._idle_since is None or self.busy or self._buf:
            return  # not idle now: armed again when it is
        deadline = self._idle_since + self._front.keepalive_timeout
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:  # armed for an earlier idle spell: aim at this one's end
            self._idle = loop.call_at(deadline, self._idle_close)
            return
        self.close()

    def _cancel_idle(self) -> None:
        self._idle_since = None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def close(self) -> None:
        self._cancel_idle()
        if not self.busy:
            self._wake(None)  # the connection's task, if parked, ends
        if self.transport is not None:
            self.transport.close()
