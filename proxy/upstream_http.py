"""The gateway proxy's HTTP/1.1 client to the VMs: pooled keep-alive connections, nothing else.

Why not `aiohttp.ClientSession`: its request machinery (URL handling, cookie jar, tracing hooks,
timers, stream readers) was the largest single share of the proxy's CPU per request (see
bench/README.md). This client does what the gateway proxy needs and no more:

- one pool per (scheme, host, port, pinned certificate), at most `max_connections` open
  (further requests wait, within the connect timeout) and at most `max_idle` kept idle, each for
  `idle_s` at most;
- a connection goes back to the pool only after its response was read to the end and the
  upstream did not ask to close; an unread or cut response closes it;
- a kept-alive connection the upstream closed while it was idle is retried once on a fresh one,
  only for a request without a body and of an idempotent method, and only when nothing of the
  response had arrived;
- response bodies are streamed with flow control: more than `_HIGH_WATER` bytes read and not yet
  consumed pause the socket, so a slow browser never makes us hold the whole body;
- Content-Length, chunked and read-until-close bodies; HEAD, 1xx, 204 and 304 without body;
- TLS pinned exactly as the aiohttp connector did with `aiohttp.Fingerprint`: no CA trust and no
  host name check, but the SHA-256 of the peer's certificate must equal the pin, checked after
  the handshake and **before a byte of the request** (it carries the relay device token) is
  written; a mismatch is an `UpstreamError` like any unreachable gateway.

Every failure is an `UpstreamError` (a `ConnectionError`): before the response head, the caller
answers 502; during the body, the caller cuts the browser's response.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, NamedTuple

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["UpstreamError", "UpstreamPool", "UpstreamResponse"]

_HIGH_WATER = 256 * 1024
"""Body bytes read from the upstream and not yet taken by the caller before the socket pauses."""
_LOW_WATER = 64 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_NO_BODY_STATUS = frozenset({204, 304})
_SWEEP_S = 5.0
MEMO_HEAD_MAX = 4096
"""Response fields up to this many bytes are memoised (`_response_fields`, and downstream the
header filter and the front's head template); larger ones, which a VM may send, never are."""


class UpstreamError(ConnectionError):
    """The gateway could not be reached, refused our pin, answered garbage or cut its answer."""


class _Stale(UpstreamError):
    """A reused connection closed before any byte of the response: safe to retry once."""


def _insecure_pinned_context() -> ssl.SSLContext:
    """The pin is the trust: no CA store, no host name (as aiohttp does for a Fingerprint)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class UpstreamResponse:
    """One response: its head, and its body as a flow-controlled stream."""

    __slots__ = ("_chunks", "_conn", "_eof", "_exc", "_paused", "_size", "_waiter", "complete", "content_length",
                 "headers", "reason", "small_head", "status")

    def __init__(self, conn: _Conn, status: int, reason: str, headers: CIMultiDictProxy[str],
                 content_length: int | None = None, small_head: bool = False) -> None:
        self._conn: _Conn | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        """`Content-Length` as a number (None: absent or not digits only)."""
        self.small_head = small_head
        """The fields are at most `MEMO_HEAD_MAX` bytes: what is derived from them may be memoised
        (a VM's larger heads are never kept in a memo: bounded memory whatever a VM sends)."""
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.complete = False
        """The whole body arrived (and the connection went back to the pool or was closed)."""

    @property
    def charset(self) -> str | None:
        ctype = self.headers.get("Content-Type", "")
        for param in ctype.split(";")[1:]:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "charset":
                return value.strip().strip('"') or None
        return None

    # -- fed by the connection --

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > _HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._eof:
            return
        self._eof = True
        self._exc = exc
        self._conn = None
        self.complete = exc is None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the caller --

    async def readany(self) -> bytes:
        """The next bytes of the body (whatever has arrived), b"" at its end; UpstreamError if cut."""
        while not self._chunks:
            if self._eof:
                if self._exc is not None:
                    raise UpstreamError("the gateway's answer was cut short") from self._exc
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._paused and self._conn is not None:
            self._paused = False
            self._conn.resume_reading()
        return data

    def whole(self) -> bytes | None:
        """The whole body when all of it has arrived (a small answer, usually), without a
        coroutine; None: not yet (`read`)."""
        if not self._eof or self._exc is not None:
            return None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    async def read(self) -> bytes:
        """The whole body."""
        if self._eof and self._exc is None:  # all of it is here already (a small answer, usually)
            data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            return data
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def close(self) -> None:
        """Done with it: an unfinished body closes the connection (never reused half-read)."""
        conn = self._conn
        if conn is not None and not self._eof:
            self._finish(UpstreamError("response closed before its end"))
            conn.abort()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@functools.lru_cache(maxsize=512)
def _response_fields(raw: tuple[tuple[bytes, bytes], ...]) -> tuple[CIMultiDictProxy[str], int | None, bool, bool]:
    """A response's fields as llhttp delivered them: (the read-only fields, `Content-Length` as a
    number or None, whether the body is framed by a length or chunked, whether the gateway asked
    to close). A pure function of the fields, which a gateway repeats (only `Date` moves, once a
    second); the read-only proxy is shared by the responses that carry them. Memoised only for
    fields up to `MEMO_HEAD_MAX` bytes (`__wrapped__` otherwise)."""
    headers = CIMultiDictProxy(CIMultiDict([(name.decode("utf-8", "surrogateescape"),
                                             value.decode("utf-8", "surrogateescape")) for name, value in raw]))
    value = headers.get("Content-Length")
    length = int(value) if value is not None and value.isdigit() else None
    framed = "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "").lower()
    return headers, length, framed, "close" in headers.get("Connection", "").lower()


class _KnownHead(NamedTuple):
    """What a whole response head says, when it may skip the parser (`_known_head`)."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    length: int
    keep_alive: bool


class _HeadCheck:
    """httptools callbacks for `_known_head`: one parse of a head alone, in a fresh parser."""

    __slots__ = ("begun", "body", "complete", "keep_alive", "parser", "raw", "reason", "status")

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.raw: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.begun = 0
        self.status = 0
        self.keep_alive = False
        self.complete = False
        self.body = False

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True

    def on_body(self, body: bytes) -> None:
        self.body = True


@functools.lru_cache(maxsize=512)
def _known_head(head: bytes) -> _KnownHead | None:
    """A response head (status line to blank line, at most `MEMO_HEAD_MAX` bytes) that the parser
    accepts whole, as a final answer framed by exactly one `Content-Length` and no
    `Transfer-Encoding` (not 1xx, 204 or 304): what it says; None for anything else (the parser
    then reads it as before). A pure function of the bytes, parsed once by httptools, as the
    connection's own parser would: a gateway sends the same head again and again (only `Date`
    moves, once a second), and skipping the parser saves its nine Python callbacks per answer."""
    check = _HeadCheck()
    parser = check.parser = httptools.HttpResponseParser(check)
    try:
        parser.feed_data(head)
    except httptools.HttpParserError:  # HttpParserUpgrade included
        return None
    # The head must end exactly where the caller found `\r\n\r\n`: nothing of it read as a body
    # or as the start of another message.
    if not check.complete or check.begun != 1 or check.body or not 200 <= check.status or \
            check.status in _NO_BODY_STATUS:
        return None
    headers, length, _framed, _close = _response_fields(tuple(check.raw))
    if length is None or len(headers.getall("Content-Length")) != 1 or "Transfer-Encoding" in headers:
        return None
    return _KnownHead(check.status, check.reason.decode("utf-8", "surrogateescape"), headers, length,
                      check.keep_alive)


class _Conn(asyncio.Protocol):
    """One upstream connection, parsing responses with httptools (or a known head without it)."""

    def __init__(self, pool: _HostPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._head_only = False
        self._until_close = False
        self._informational = False
        self._got_bytes = False
        self._reason = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._raw_size = 0
        self._in_message = False
        """The parser is inside a message (its head or body): the next bytes are the parser's."""
        self._left = 0
        """Body bytes still due of an answer whose head skipped the parser (`_known_head`)."""
        self._keep_alive = False
        """For that answer: whether the connection may be reused after it."""
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._left:
            self._body_rest(data)
            return
        if self._head is None and self._response is None:  # nothing asked: an idle connection talking
            self.abort()
            return
        if not self._in_message and not self._head_only and self._head is not None:
            end = data.find(b"\r\n\r\n", 0, MEMO_HEAD_MAX)
            if end >= 0:
                known = _known_head(data[:end + 4])
                if known is not None and len(data) - end - 4 <= known.length:
                    self._known(known, data, end + 4)
                    return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the gateway switched protocols on a plain request"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the gateway's answer is not HTTP: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._response is not None:
            if self._until_close and exc is None:
                self._complete()
            else:
                self._response._finish(UpstreamError("the gateway closed the connection mid-body"))
                self._response = None
        if self._head is not None and not self._head.done():
            if self.reused and not self._got_bytes:
                self._head.set_exception(_Stale("kept-alive connection closed by the gateway"))
            else:
                self._head.set_exception(UpstreamError("the gateway closed the connection"))
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._in_message = True
        self._raw = []
        self._raw_size = 0
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))
        self._raw_size += len(name) + len(value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue and friends: llhttp ends them here; wait for the real one
            self._informational = True
            return
        self._informational = False
        if self._head is None:  # an answer nobody asked for: not a connection to trust
            self._fail(UpstreamError("unsolicited answer from the gateway"))
            return
        small = self._raw_size <= MEMO_HEAD_MAX
        fields = _response_fields if small else _response_fields.__wrapped__
        headers, length, framed, close = fields(tuple(self._raw))
        response = UpstreamResponse(self, status, self._reason.decode("utf-8", "surrogateescape"), headers, length,
                                    small)
        no_body = self._head_only or status in _NO_BODY_STATUS
        self._until_close = not no_body and not framed
        self._response = response
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_only:  # llhttp does not know this answered a HEAD: the message ends here for us
            self.parser = httptools.HttpResponseParser(self)
            self._in_message = False
            self._complete(keep_alive=not close)

    def on_body(self, body: bytes) -> None:
        if self._response is None:  # bytes after a HEAD answer: not a connection to trust again
            self._fail(UpstreamError("body after a HEAD answer"))
            return
        self._response._feed(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._informational:
            self._informational = False
            return
        if self._response is not None:
            self._complete(keep_alive=self.parser.should_keep_alive())

    # -- ours --

    def _known(self, known: _KnownHead, data: bytes, start: int) -> None:
        """An answer whose whole head is in `data` and known (`_known_head`), with at most its
        body after it: what the parser's callbacks would do, in one call. The rest of the body
        is counted by `_body_rest`."""
        self._informational = False
        response = UpstreamResponse(self, known.status, known.reason, known.headers, known.length, True)
        self._until_close = False
        self._response = response
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)
        if len(data) > start:
            response._feed(data[start:])
        self._left = known.length - (len(data) - start)
        if self._left:
            self._keep_alive = known.keep_alive
        else:
            self._complete(keep_alive=known.keep_alive)

    def _body_rest(self, data: bytes) -> None:
        """More of a known head's body; bytes past its end are an answer nobody asked for, so the
        connection is not reused."""
        left = self._left
        response = self._response
        if len(data) <= left:
            self._left = left - len(data)
            if response is not None:
                response._feed(data)
            if not self._left:
                self._complete(keep_alive=self._keep_alive)
            return
        if response is not None:
            response._feed(data[:left])
        self._complete(keep_alive=False)

    def _complete(self, keep_alive: bool = False) -> None:
        self._left = 0
        response, self._response = self._response, None
        if response is not None:
            response._finish()
        self._until_close = False
        if self._read_paused:
            self.resume_reading()
        if keep_alive and not self.closed and self.transport is not None and not self.transport.is_closing():
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, exc: UpstreamError) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        response, self._response = self._response, None
        if response is not None:
            response._finish(exc)
        self.abort()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def _wake_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def _drained(self) -> None:
        while self._write_paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None
        if self.closed:
            raise UpstreamError("the gateway closed the connection while we sent the request")

    async def send(self, method: str, head: bytes, body: AsyncIterable[bytes] | None, chunked: bool
                   ) -> UpstreamResponse:
        """Write the request (streaming its body) and wait for the response head."""
        assert self.transport is not None
        self._head_only = method == "HEAD"
        self._got_bytes = False
        answer = self._head = asyncio.get_running_loop().create_future()
        self.transport.write(head)
        if body is not None:
            try:
                async for chunk in body:
                    if self.closed:
                        break
                    if chunk:
                        if chunked:
                            self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        else:
                            self.transport.write(chunk)
                        if self._write_paused:
                            await self._drained()
                if chunked and not self.closed:
                    self.transport.write(b"0\r\n\r\n")
            except BaseException:
                if answer.done() and not answer.cancelled():
                    answer.exception()  # retrieved: the error that matters is this one
                raise
        return await answer


class _HostPool:
    """The connections to one (scheme, host, port, pin): bounded, LIFO idle list."""

    def __init__(self, owner: UpstreamPool, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 pin: bytes | None) -> None:
        self.owner = owner
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.pin = pin
        self.idle: list[_Conn] = []
        self.open = 0
        self._members: set[_Conn] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def release(self, conn: _Conn) -> None:
        if conn.closed or (len(self.idle) >= self.owner.max_idle and not self._waiters):
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Conn) -> None:
        if conn in self._members:
            self._members.discard(conn)
            self.open -= 1
            self._wake_one()
        if conn in self.idle:
            self.idle.remove(conn)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                conn.abort()
                continue
            if now - conn.idle_since > self.owner.idle_s:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    def sweep(self, now: float) -> None:
        for conn in [c for c in self.idle if now - c.idle_since > self.owner.idle_s]:
            conn.abort()

    async def acquire(self, deadline: float, fresh: bool = False) -> _Conn:
        """An idle connection (unless `fresh`), or a new one once fewer than `max_connections` are open."""
        while True:
            conn = None if fresh else self.take_idle()
            if conn is not None:
                return conn
            if self.open < self.owner.max_connections:
                return await self._connect(deadline)
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise UpstreamError("no free connection to the gateway in time") from None
            finally:
                if not waiter.done():
                    waiter.cancel()

    async def _connect(self, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        self.open += 1
        conn: _Conn | None = None
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), self.host, self.port, ssl=self.ssl_context,
                    server_hostname=(self.host if self.ssl_context is not None else None))
            assert conn is not None
            self._members.add(conn)
            if self.pin is not None:
                self._check_pin(conn)
            return conn
        except BaseException as exc:
            if conn is not None and conn in self._members:
                conn.abort()  # forget() gives the slot back
            else:
                self.open -= 1
                self._wake_one()
            if isinstance(exc, UpstreamError | asyncio.CancelledError):
                raise
            if isinstance(exc, OSError | TimeoutError | ssl.SSLError):
                raise UpstreamError(f"cannot reach the gateway: {exc!r}") from exc
            raise

    def _check_pin(self, conn: _Conn) -> None:
        """The certificate must be the pinned one, before we write anything (fails closed)."""
        assert conn.transport is not None
        sslobj = conn.transport.get_extra_info("ssl_object")
        cert = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not cert or hashlib.sha256(cert).digest() != self.pin:
            raise UpstreamError("the gateway's certificate does not match its pin")

    def close(self) -> None:
        for conn in list(self._members):
            conn.abort()
        self.idle.clear()


def _fields_block(headers: CIMultiDict[str] | CIMultiDictProxy[str], chunked: bool) -> bytes:
    """The encoded header lines of a request head and its blank line."""
    return _encoded_fields(tuple(headers.items()), chunked)


def encode_fields(fields: tuple[tuple[str, str], ...], chunked: bool = False) -> bytes:
    """A request head's header lines and blank line, as `UpstreamPool.request` writes them (a
    caller that memoises its fields may pass these as `fields_block`)."""
    lines = [f"{name}: {value}\r\n" for name, value in fields]
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


_encoded_fields = functools.lru_cache(maxsize=512)(encode_fields)
"""Memoised: a pure function of the fields, and a browser's requests repeat them."""

_UNSAFE_TARGET = re.compile(r"[ \r\n\t]")


@functools.lru_cache(maxsize=1024)
def _origin(base_url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `scheme://host[:port]`: a pure function, and every request names one."""
    scheme, _, authority = base_url.partition("://")
    host, _, port_text = authority.rpartition(":")
    if not host or not port_text.isdigit():
        host, port_text = authority, "443" if scheme == "https" else "80"
    return scheme, host.strip("[]"), int(port_text)


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to the gateways, one bounded pool per (scheme, host, port, pin)."""

    def __init__(self, *, max_connections: int = 128, max_idle: int = 32, idle_s: float = 30.0) -> None:
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._pools: dict[tuple[str, str, int, bytes | None], _HostPool] = {}
        self._pinned_ctx: ssl.SSLContext | None = None
        self._verified_ctx: ssl.SSLContext | None = None
        self._last_sweep = time.monotonic()

    def _pool(self, scheme: str, host: str, port: int, pin: aiohttp.Fingerprint | bool) -> _HostPool:
        fingerprint = pin.fingerprint if isinstance(pin, aiohttp.Fingerprint) else None
        key = (scheme, host, port, fingerprint)
        pool = self._pools.get(key)
        if pool is None:
            ctx: ssl.SSLContext | None = None
            if scheme == "https":
                if fingerprint is not None:
                    ctx = self._pinned_ctx = self._pinned_ctx or _insecure_pinned_context()
                else:
                    ctx = self._verified_ctx = self._verified_ctx or ssl.create_default_context()
            pool = self._pools[key] = _HostPool(self, host, port, ctx, fingerprint)
        return pool

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_S:
            return
        self._last_sweep = now
        for key, pool in list(self._pools.items()):
            pool.sweep(now)
            if pool.open == 0 and not pool._waiters:
                del self._pools[key]

    async def request(self, method: str, base_url: str, path: str, headers: CIMultiDict[str] | CIMultiDictProxy[str],
                      body: AsyncIterable[bytes] | None = None, *, ssl: aiohttp.Fingerprint | bool = True,
                      connect_timeout: float = 10.0, fields_block: bytes | None = None) -> UpstreamResponse:
        """Send one request to `base_url` (scheme://host:port) + `path` (already encoded).

        `fields_block`: `encode_fields` of `headers`, when the caller memoises both together (one
        memo lookup per request instead of two); used for a request without a body only.

        Returns once the response head arrived; the caller reads the body and closes it
        (`async with`). UpstreamError when no response head could be had.
        """
        if _UNSAFE_TARGET.search(path):  # the request line must stay one line
            raise UpstreamError("unsafe request target")
        self._sweep()
        pool = self._pool(*_origin(base_url), ssl)
        chunked = body is not None and "Content-Length" not in headers
        if fields_block is None or body is not None:
            fields_block = _fields_block(headers, chunked)
        head = f"{method} {path} HTTP/1.1\r\n".encode("utf-8", "surrogateescape") + fields_block
        retry = body is None and method in _IDEMPOTENT
        deadline = asyncio.get_running_loop().time() + connect_timeout
        fresh = False
        while True:
            conn = None if fresh else pool.take_idle()  # the usual case, without a coroutine
            if conn is None:
                conn = await pool.acquire(deadline, fresh)
            try:
                return await conn.send(method, head, body, chunked)
            except _Stale:
                if not retry:
                    raise UpstreamError("the gateway closed a kept-alive connection") from None
                retry, fresh = False, True  # once, on a new connection
                deadline = max(deadline, asyncio.get_running_loop().time() + connect_timeout)
            except BaseException:
                conn.abort()
                raise

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def stats(self) -> dict[str, Any]:
        """Open and idle connections per upstream (tests, debugging)."""
        return {f"{k[0]}://{k[1]}:{k[2]}": {"open": p.open, "idle": len(p.idle)} for k, p in self._pools.items()}
