"""The gateway proxy's own HTTP/1.1 client (proxy/upstream_http.py) against upstreams that misbehave.

Each fake upstream here is a raw asyncio server that answers with the exact bytes a test chooses
and records what it received on each connection, so the tests can say what crossed the wire:
a cut body reaches the browser as a cut, garbage is a 502, a kept-alive connection the upstream
closed is replaced, a wrong certificate pin sees no request bytes, a slow browser does not make
the proxy hold the body, and the pool stays within its bounds.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from proxy.upstream_http import UpstreamError, UpstreamPool
from settings import Settings
from tests.proxy_harness import running_proxy, seed_gateway_user

pytestmark = pytest.mark.asyncio(loop_scope="session")

Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection: what it received so far, and its writer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = b""
        self.sent = 0

    async def request_head(self) -> bytes:
        """The next request's head (up to the blank line); b"" when the peer closed."""
        while b"\r\n\r\n" not in self.received:
            data = await self.reader.read(65536)
            if not data:
                return b""
            self.received += data
        head, _, self.received = self.received.partition(b"\r\n\r\n")
        return head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)


class FakeUpstream:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[Conn] = []
        self.raw_bytes: list[bytes] = []
        """Everything each connection received, in order (TLS tests: what passed the handshake)."""
        self.open_now = 0
        self.open_max = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        self.conns.append(conn)
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        try:
            await self.handler(conn)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


@asynccontextmanager
async def fake_upstream(handler: Handler, *, tls: ssl.SSLContext | None = None
                        ) -> AsyncIterator[tuple[FakeUpstream, int]]:
    fake = FakeUpstream(handler)
    server = await asyncio.start_server(fake._serve, "127.0.0.1", 0, ssl=tls)
    try:
        yield fake, server.sockets[0].getsockname()[1]
    finally:
        for conn in fake.conns:
            conn.writer.close()
        server.close()


def response(body: bytes = b"ok", *, extra: str = "") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def serve_forever(conn: Conn, answer: Callable[[bytes], bytes] = lambda head: response()) -> None:
    while head := await conn.request_head():
        await conn.send(answer(head))


def headers() -> CIMultiDict[str]:
    return CIMultiDict({"Host": "gw.test", "Accept-Encoding": "identity"})


@asynccontextmanager
async def through_proxy(settings: Settings, sql: psycopg.Connection, port: int
                        ) -> AsyncIterator[Callable[..., Awaitable[aiohttp.ClientResponse]]]:
    """A browser session to a gateway at `port`, through a running proxy."""
    seeded = seed_gateway_user(sql, settings, port=port)
    async with running_proxy(settings) as proxy, aiohttp.ClientSession() as http:
        async def get(tail: str = "/control-ui-config.json", **kw: object) -> aiohttp.ClientResponse:
            return await http.get(f"{proxy.url}/agents/{seeded.agent_id}/gateway{tail}", headers=seeded.cookie,
                                  allow_redirects=False, **kw)  # type: ignore[arg-type]
        yield get


# -- through the proxy: what the browser sees -----------------------------------------------------


async def test_upstream_cut_mid_body_reaches_the_browser_and_the_connection_is_not_reused(
        settings: Settings, sql: psycopg.Connection) -> None:
    big = 200_000

    fake_conns: list[Conn] = []

    async def handler(conn: Conn) -> None:
        head = await conn.request_head()
        if len(fake_conns) == 1:  # the first connection: promise 200 kB, send 1 kB, hang up
            await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n".encode() + b"a" * 1000)
            return
        if head:
            await conn.send(response(b"second"))
            await serve_forever(conn)

    async with fake_upstream(handler) as (fake, port), through_proxy(settings, sql, port) as get:
        fake.conns = fake_conns
        resp = await get()
        assert resp.status == 200  # streamed: the status went out before the cut
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        again = await get()
        assert again.status == 200
        assert await again.read() == b"second"
        assert len(fake.conns) == 2  # the cut connection was not used again


async def test_upstream_garbage_is_a_502(settings: Settings, sql: psycopg.Connection) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request_head()
        await conn.send(b"SSH-2.0-OpenSSH_9.2\r\nthis is not http\r\n\r\n")
        await asyncio.sleep(0.5)

    async with fake_upstream(handler) as (_, port), through_proxy(settings, sql, port) as get:
        resp = await get()
        assert resp.status == 502
        assert resp.headers["Content-Type"].startswith("application/problem+json")


async def test_a_slow_browser_does_not_make_the_proxy_buffer_the_whole_body(
        settings: Settings, sql: psycopg.Connection) -> None:
    total = 96 * 1024 * 1024
    block = b"z" * (1024 * 1024)
    sent: list[int] = []

    async def handler(conn: Conn) -> None:
        await conn.request_head()
        await conn.send(f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                        f"Content-Length: {total}\r\n\r\n".encode())
        sent.append(0)
        for _ in range(total // len(block)):
            await conn.send(block)  # drain() blocks once the proxy stops reading
            sent[0] += len(block)

    async with fake_upstream(handler) as (_, port), through_proxy(settings, sql, port) as get:
        resp = await get()
        assert resp.status == 200
        await asyncio.sleep(1.5)  # the browser reads nothing meanwhile
        held = sent[0]
        # Socket buffers on loopback hold a few MiB each way; the proxy's own buffer is 256 KiB.
        # Without flow control the upstream would have sent all 96 MiB by now.
        assert held < 32 * 1024 * 1024, held
        got = 0
        async for chunk in resp.content.iter_any():
            got += len(chunk)
        assert got == total


# -- the client on its own --------------------------------------------------------------------------


async def test_a_kept_alive_connection_closed_by_the_upstream_is_replaced() -> None:
    async def handler(conn: Conn) -> None:
        head = await conn.request_head()
        if head:
            await conn.send(response(b"first"))  # keep-alive answer, then hang up while idle
        await asyncio.sleep(0.05)

    async with fake_upstream(handler) as (fake, port):
        pool = UpstreamPool()
        try:
            async with await pool.request("GET", f"http://127.0.0.1:{port}", "/a", headers()) as first:
                assert await first.read() == b"first"
            await asyncio.sleep(0.3)  # the upstream closed the idle connection meanwhile
            async with await pool.request("GET", f"http://127.0.0.1:{port}", "/b", headers()) as second:
                assert second.status == 200
                assert await second.read() == b"first"
            assert len(fake.conns) == 2
        finally:
            await pool.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_reused_connection_that_dies_unanswered_is_retried_once_only_when_idempotent(method: str) -> None:
    """The idle connection looks alive, but the upstream reads the next request and hangs up."""
    fakes: list[FakeUpstream] = []

    async def handler(conn: Conn) -> None:
        if len(fakes[0].conns) == 1:
            await conn.request_head()
            await conn.send(response(b"one"))
            await conn.request_head()  # the second request: read, never answered
            return
        await serve_forever(conn)

    async with fake_upstream(handler) as (fake, port):
        fakes.append(fake)
        pool = UpstreamPool()
        base = f"http://127.0.0.1:{port}"
        try:
            async with await pool.request(method, base, "/", headers()) as resp:
                assert await resp.read() == b"one"
            if method == "GET":
                async with await pool.request(method, base, "/", headers()) as resp:
                    assert await resp.read() == b"ok"
                assert len(fake.conns) == 2  # the retry went to a new connection
            else:  # not idempotent: the upstream may have acted on it, so no second try
                with pytest.raises(UpstreamError):
                    await pool.request(method, base, "/", headers())
                assert len(fake.conns) == 1
        finally:
            await pool.close()


async def test_head_204_304_and_chunked_answers_keep_the_connection_usable() -> None:
    def answer(head: bytes) -> bytes:
        path = head.split(b" ", 2)[1]
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
        if path == b"/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if path == b"/304":
            return b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"
        if path == b"/continue":
            return b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"after 100")
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    async with fake_upstream(lambda conn: serve_forever(conn, answer)) as (fake, port):
        pool = UpstreamPool()
        base = f"http://127.0.0.1:{port}"
        try:
            for method, path, status, body in [("HEAD", "/", 200, b""), ("GET", "/204", 204, b""),
                                               ("GET", "/304", 304, b""), ("GET", "/chunked", 200, b"hello world"),
                                               ("GET", "/continue", 200, b"after 100"), ("HEAD", "/", 200, b""),
                                               ("GET", "/chunked", 200, b"hello world")]:
                async with await pool.request(method, base, path, headers()) as resp:
                    assert (resp.status, await resp.read()) == (status, body), (method, path)
            assert len(fake.conns) == 1  # every answer ended cleanly: one connection throughout
        finally:
            await pool.close()


async def test_a_read_until_close_body_ends_at_the_close() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request_head()
        await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")

    async with fake_upstream(handler) as (_, port):
        pool = UpstreamPool()
        try:
            async with await pool.request("GET", f"http://127.0.0.1:{port}", "/", headers()) as resp:
                assert await resp.read() == b"all of it"
        finally:
            await pool.close()


async def test_the_pool_respects_its_bounds() -> None:
    async def handler(conn: Conn) -> None:
        while await conn.request_head():
            await asyncio.sleep(0.1)
            await conn.send(response())

    async with fake_upstream(handler) as (fake, port):
        pool = UpstreamPool(max_connections=2, max_idle=1)
        base = f"http://127.0.0.1:{port}"

        async def one() -> bytes:
            async with await pool.request("GET", base, "/", headers()) as resp:
                return await resp.read()

        try:
            assert await asyncio.gather(*(one() for _ in range(6))) == [b"ok"] * 6
            assert fake.open_max <= 2 and len(fake.conns) == 2  # the other four waited for a connection
            await asyncio.sleep(0.1)
            assert pool.stats()[base]["idle"] == 1  # one kept, the other closed
            assert pool.stats()[base]["open"] == 1
            assert fake.open_now == 1
        finally:
            await pool.close()


async def test_a_full_pool_that_never_frees_is_a_timely_error() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request_head()
        await asyncio.sleep(5)

    async with fake_upstream(handler) as (_, port):
        pool = UpstreamPool(max_connections=1)
        base = f"http://127.0.0.1:{port}"
        try:
            hung = asyncio.create_task(pool.request("GET", base, "/", headers()))
            await asyncio.sleep(0.1)
            with pytest.raises(UpstreamError):
                await pool.request("GET", base, "/", headers(), connect_timeout=0.3)
            hung.cancel()
        finally:
            await pool.close()


# -- TLS: the pin is checked before a byte of the request is written --------------------------------


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return ctx, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


async def test_a_wrong_pin_never_receives_the_request_and_the_right_one_does(tmp_path: Path) -> None:
    tls, digest = _self_signed(tmp_path)
    received: list[bytes] = []

    async def handler(conn: Conn) -> None:
        data = b""
        try:
            while chunk := await conn.reader.read(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    received.append(data)
                    await conn.send(response(b"pinned"))
                    data = b""
        finally:
            if data:
                received.append(data)

    secret = "Bearer relay-device-token"
    async with fake_upstream(handler, tls=tls) as (fake, port):
        pool = UpstreamPool()
        base = f"https://127.0.0.1:{port}"
        wanted = CIMultiDict({**headers(), "Authorization": secret})
        try:
            with pytest.raises(UpstreamError):
                await pool.request("GET", base, "/", wanted, ssl=aiohttp.Fingerprint(b"\xcd" * 32))
            await asyncio.sleep(0.2)
            assert len(fake.conns) == 1  # the handshake happened ...
            assert received == []  # ... and not a byte of the request followed it
            async with await pool.request("GET", base, "/", wanted, ssl=aiohttp.Fingerprint(digest)) as resp:
                assert await resp.read() == b"pinned"
            assert len(received) == 1 and secret.encode() in received[0]
        finally:
            await pool.close()


async def test_repeated_and_changed_response_fields_read_right_each_time() -> None:
    """Response fields are decoded once per field set (memoised with their length, framing and
    close): the same fields again, then a field changed, a length that is not a number, a
    read-until-close body and `Connection: close`, are each framed and reused (or not) as they say."""
    answers = {
        b"/same": lambda: response(b"same body"),
        b"/len": lambda: response(b"twelve bytes"),
        b"/odd-length": lambda: b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Length: 3x\r\n\r\nabc",
        b"/close": lambda: response(b"last", extra="Connection: close\r\n"),
        b"/until-close": lambda: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end",
    }

    async def handler(conn: Conn) -> None:
        while head := await conn.request_head():
            data = answers[head.split(b" ", 2)[1]]()
            await conn.send(data)
            if b"Connection: close" in data:
                return  # as a gateway does after saying so (the read-until-close body ends here)

    async with fake_upstream(handler) as (fake, port):
        pool = UpstreamPool()
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(2):
                for path, body, length in [("/same", b"same body", 9), ("/same", b"same body", 9),
                                           ("/len", b"twelve bytes", 12), ("/odd-length", b"abc", 3)]:
                    async with await pool.request("GET", base, path, headers()) as resp:
                        assert (await resp.read(), resp.content_length) == (body, length), path
                        assert resp.headers["Content-Length"] == str(length)
            assert len(fake.conns) == 1
            for path, body in [("/close", b"last"), ("/until-close", b"to the end"), ("/close", b"last")]:
                async with await pool.request("GET", base, path, headers()) as resp:
                    assert await resp.read() == body and resp.complete
                assert all(p["idle"] == 0 for p in pool.stats().values()), path  # not kept
            assert len(fake.conns) == 3  # the kept-alive one, then one for each answer after a close
        finally:
            await pool.close()


async def test_known_heads_frame_split_bodies_extra_bytes_and_cuts_right() -> None:
    """A head seen before skips the parser (`_known_head`); its answer must be framed exactly as
    the parser frames it: a body in several writes is read whole and the connection reused, bytes
    past the body (an answer nobody asked for) keep the connection from being reused, a body cut
    short is an error, and the same head after a HEAD, a chunked answer or a 100 reads right."""
    split = response(b"0123456789")
    extra = response(b"abc") + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"

    async def handler(conn: Conn) -> None:
        while head := await conn.request_head():
            path = head.split(b" ", 2)[1]
            if head.startswith(b"HEAD"):
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n")
            elif path == b"/split":
                for piece in (split[:-10], split[-10:-7], split[-7:]):  # head alone, then the body in two
                    await conn.send(piece)
                    await asyncio.sleep(0.01)
            elif path == b"/extra":  # the head alone, then the body with stray bytes after it
                await conn.send(extra[:-42])
                await asyncio.sleep(0.01)
                await conn.send(extra[-42:])
            elif path == b"/continue":
                await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n" + split)
            elif path == b"/chunked":
                await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            elif path == b"/cut":
                await conn.send(split[:-4])
                return
            else:
                await conn.send(split)

    async with fake_upstream(handler) as (fake, port):
        pool = UpstreamPool()
        base = f"http://127.0.0.1:{port}"
        try:
            for method, path, body in [("GET", "/", b"0123456789"), ("GET", "/split", b"0123456789"),
                                       ("GET", "/", b"0123456789"), ("HEAD", "/", b""), ("GET", "/", b"0123456789"),
                                       ("GET", "/chunked", b"abc"), ("GET", "/split", b"0123456789"),
                                       ("GET", "/continue", b"0123456789"), ("GET", "/", b"0123456789")]:
                async with await pool.request(method, base, path, headers()) as resp:
                    assert (resp.status, await resp.read(), resp.complete) == (200, body, True), (method, path)
            assert len(fake.conns) == 1  # every answer ended where its length said: one connection
            async with await pool.request("GET", base, "/extra", headers()) as resp:
                assert await resp.read() == b"abc"
            assert all(p["idle"] == 0 for p in pool.stats().values())  # not kept after stray bytes
            async with await pool.request("GET", base, "/", headers()) as resp:
                assert await resp.read() == b"0123456789"
            assert len(fake.conns) == 2
            async with await pool.request("GET", base, "/cut", headers()) as resp:
                with pytest.raises(UpstreamError):
                    await resp.read()
        finally:
            await pool.close()


async def test_the_known_head_memo_holds_only_small_well_framed_heads() -> None:
    """Bounded whatever a VM sends: heads over `MEMO_HEAD_MAX` are never looked up, and only an
    answer framed by one `Content-Length` is taken (anything else stays the parser's)."""
    from proxy.upstream_http import MEMO_HEAD_MAX, _known_head

    assert _known_head.cache_info().maxsize == 512
    ok = _known_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\n")
    assert ok is not None and (ok.status, ok.length, ok.keep_alive, ok.headers["X-A"]) == (200, 5, True, "b")
    assert _known_head(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n").keep_alive is False  # type: ignore[union-attr]
    assert _known_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
                       ).keep_alive is False  # type: ignore[union-attr]
    for head in [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",  # read until close
                 b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                 b"HTTP/1.1 200 OK\nContent-Length: 5\n\nab\r\n\r\n",  # ends before our CRLFCRLF
                 b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
                 b"garbage\r\n\r\n"]:
        assert _known_head(head) is None, head

    async def big_answer() -> None:
        big = f"X-Big: {'b' * MEMO_HEAD_MAX}\r\n"

        async def handler(conn: Conn) -> None:
            await serve_forever(conn, lambda head: response(b"big", extra=big))

        async with fake_upstream(handler) as (_, port):
            pool = UpstreamPool()
            try:
                before = _known_head.cache_info()
                for _ in range(3):
                    async with await pool.request("GET", f"http://127.0.0.1:{port}", "/", headers()) as resp:
                        assert await resp.read() == b"big" and len(resp.headers["X-Big"]) == MEMO_HEAD_MAX
                after = _known_head.cache_info()
                assert (after.hits, after.misses) == (before.hits, before.misses)  # never looked up
            finally:
                await pool.close()

    await big_answer()


async def test_a_memoised_fields_block_is_what_goes_up() -> None:
    """The gateway proxy passes the request's encoded header lines from its memo
    (`headers.upstream_request_head`): the gateway receives exactly the head the pool would have
    built from the fields; with a body the block is built afresh (chunked framing added)."""
    from proxy.headers import upstream_request_head
    from proxy.upstream_http import encode_fields

    incoming = CIMultiDict({"Host": "proxy.test", "Cookie": "a=b", "Accept": "*/*", "Accept-Encoding": "gzip"})
    fields, block = upstream_request_head(incoming, client_ip="203.0.113.9", scheme="http", host="gw.test",
                                          bearer="relay-tok")
    assert upstream_request_head(incoming, client_ip="203.0.113.9", scheme="http", host="gw.test",
                                 bearer="relay-tok") == (fields, block)
    assert block == encode_fields(tuple(fields.items())) and b"Cookie" not in block

    async def body() -> AsyncIterator[bytes]:
        yield b"hi"

    heads: list[bytes] = []

    async def handler(conn: Conn) -> None:
        while head := await conn.request_head():
            heads.append(head + b"\r\n\r\n")
            if head.startswith(b"POST"):
                while b"0\r\n\r\n" not in conn.received:
                    conn.received += await conn.reader.read(65536)
                conn.received = conn.received.partition(b"0\r\n\r\n")[2]  # the chunked body read
            await conn.send(response())

    async with fake_upstream(handler) as (_, port):
        pool = UpstreamPool()
        try:
            async with await pool.request("GET", f"http://127.0.0.1:{port}", "/a", fields, fields_block=block) as r:
                assert await r.read() == b"ok"
            async with await pool.request("POST", f"http://127.0.0.1:{port}", "/b", fields, body(),
                                          fields_block=block) as r:
                assert await r.read() == b"ok"
        finally:
            await pool.close()
    assert heads == [b"GET /a HTTP/1.1\r\n" + block,
                     b"POST /b HTTP/1.1\r\n" + encode_fields(tuple(fields.items()), chunked=True)]
    assert heads[1].endswith(b"Transfer-Encoding: chunked\r\n\r\n")
