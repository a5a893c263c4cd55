"""The "python floor": the least a Python reverse proxy can do per request on this machine.

uvloop and raw asyncio protocols, httptools parsing both directions only to find where each
message ends, bytes forwarded verbatim (no header filtering, no checks, no rewriting). Upstream
connections are kept alive in a pool and reused after a complete response; a WebSocket upgrade
gets its own upstream connection and, after the 101, both sides are piped byte for byte. Writes
are flow-controlled (a full browser socket pauses the upstream read and the other way round).

Not part of the product: `bench.proxy` runs it as one more path (`python floor`), so the report
can say which share of our proxy's cost is Python's and which is our own.
"""

from __future__ import annotations

import asyncio
import signal

import httptools
import uvloop

__all__ = ["run_floor"]


class _Upstream(asyncio.Protocol):
    """One upstream connection: parses responses to know when it can go back to the pool."""

    def __init__(self, pool: list[_Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.tunnel = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            if self.transport is not None:
                self.transport.close()
            return
        client.transport.write(data)
        if self.tunnel:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            client.transport.close()
            if self.transport is not None:
                self.transport.close()

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() == 101:
            self.tunnel = True
            if self.client is not None:
                self.client.tunnel = self

    def on_message_complete(self) -> None:
        if self.tunnel:
            return
        client, self.client = self.client, None
        if client is not None:
            client.upstream = None
        if self.parser.should_keep_alive() and self.transport is not None and not self.transport.is_closing():
            self.pool.append(self)
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()
        self.client = None

    def pause_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.resume_reading()


class _Client(asyncio.Protocol):
    """One browser connection: each request goes verbatim to a pooled upstream connection."""

    def __init__(self, host: str, port: int, pool: list[_Upstream]) -> None:
        self.host, self.port, self.pool = host, port, pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: _Upstream | None = None
        self.tunnel: _Upstream | None = None
        self.pending: list[bytes] = []
        self.upgrade = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            if self.pending:
                data, self.pending = b"".join(self.pending) + data, []
            upstream.transport.write(data)
        else:
            self.pending.append(data)

    def on_message_begin(self) -> None:
        self.upgrade = False

    def on_headers_complete(self) -> None:
        self.upgrade = self.parser.should_upgrade()
        if self.pool and not self.upgrade:
            self.upstream = self.pool.pop()
            self.upstream.client = self
        else:
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self.pool), self.host, self.port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        upstream.client = self
        self.upstream = upstream
        data, self.pending = b"".join(self.pending), []
        assert upstream.transport is not None
        upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for up in (self.upstream, self.tunnel):
            if up is not None and up.transport is not None:
                up.transport.close()
        self.upstream = self.tunnel = None

    def pause_writing(self) -> None:
        up = self.tunnel or self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.tunnel or self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()


def run_floor(port: int, upstream_port: int) -> None:
    """Serve on 127.0.0.1:`port`, relaying to 127.0.0.1:`upstream_port`, until SIGTERM."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        pool: list[_Upstream] = []
        server = await loop.create_server(lambda: _Client("127.0.0.1", upstream_port, pool), "127.0.0.1", port,
                                          backlog=1024)
        async with server:
            await stop.wait()

    uvloop.run(main())
