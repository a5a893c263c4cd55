"""Gateway GETs served below aiohttp's server (`proxy.http_fast`) answer byte for byte what aiohttp did.

Two proxies on one upstream and one user: the production one (fast path on) and one with
`fast_http=False` (every request through aiohttp, as before). The same raw requests, sent on
raw sockets, must get the same status, reason, headers (but `Date`) and body from both: problem
answers, redirects, the rewritten document, HEAD, streamed bodies, malformed and oversized heads,
pipelined mixes of fast and aiohttp requests. Plus keep-alive, `Connection: close`, the idle and
header timeouts, and that the fast path really serves the plain requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httptools
import psycopg
import pytest
import pytest_asyncio
from aiohttp.http import SERVER_SOFTWARE

from db.encryption import configure_keys
from proxy.app import RunningProxy
from proxy.http_fast import _head_template
from settings import Settings
from tests.proxy_harness import (
    IMMUTABLE_ASSET,
    TEST_CONFIG,
    RecordingUpstream,
    Seeded,
    running_proxy,
    seed_gateway_user,
    usage,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Pair:
    seeded: Seeded
    upstream: RecordingUpstream
    fast: RunningProxy
    slow: RunningProxy


@dataclass
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


@pytest_asyncio.fixture(loop_scope="session")
async def pair(settings: Settings, sql: psycopg.Connection) -> AsyncIterator[Pair]:
    async with RecordingUpstream() as upstream:
        upstream.release.set()  # /stream answers at once, chunked
        seeded = seed_gateway_user(sql, settings, port=upstream.port)
        sql.execute("UPDATE vpses SET relay_device_token = %s WHERE id = %s",
                    (configure_keys(settings.secret_keys()).encrypt("relay-token"), seeded.vps_id))
        short = settings.model_copy(update={"proxy_keepalive_timeout_s": 1.5, "proxy_header_timeout_s": 1.0})
        async with running_proxy(short) as fast, \
                running_proxy(short, config=dataclasses.replace(TEST_CONFIG, fast_http=False)) as slow:
            assert fast.gateway is not slow.gateway
            yield Pair(seeded, upstream, fast, slow)


class _Parsed:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self._headers: list[tuple[str, str]] = []
        self._body = b""
        self._reason = ""
        self._status = 0
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self._status = self.parser.get_status_code()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason.decode()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.answers.append(Answer(self._status, self._reason, self._headers, self._body))
        self._headers, self._body, self._reason = [], b"", ""


async def exchange(proxy: RunningProxy, raw: bytes, count: int, *, timeout: float = 10.0
                   ) -> tuple[list[Answer], bool]:
    """Send `raw`, read `count` answers (HEAD answers have no body: one at a time for those);
    returns them and whether the proxy then closed the connection."""
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parsed = _Parsed()
    parser = parsed.parser = httptools.HttpResponseParser(parsed)
    closed = False
    try:
        writer.write(raw)
        await writer.drain()
        while len(parsed.answers) < count:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                closed = True
                break
            parser.feed_data(data)
        if not closed:
            try:
                closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
            except TimeoutError:
                closed = False
    finally:
        writer.close()
    for answer in parsed.answers:
        answer.headers = sorted((k.lower(), v) for k, v in answer.headers if k.lower() != "date")
    return parsed.answers, closed


async def both(pair: Pair, raw: bytes, count: int = 1) -> tuple[list[Answer], bool]:
    fast = await exchange(pair.fast, raw, count)
    slow = await exchange(pair.slow, raw, count)
    assert fast == slow, (raw, fast, slow)
    return fast


def req(pair: Pair, tail: str, *, method: str = "GET", cookie: bool = True, extra: str = "",
        agent: str | None = None, host: str = "proxy.test") -> bytes:
    head = f"{method} /agents/{agent or pair.seeded.agent_id}/gateway{tail} HTTP/1.1\r\nHost: {host}\r\n"
    if cookie:
        head += f"Cookie: authjs.session-token={pair.seeded.session}\r\n"
    return (head + extra + "\r\n").encode()


async def test_fast_path_serves_plain_gets(pair: Pair) -> None:
    front = pair.fast.gateway_front
    assert front is not None and pair.slow.gateway_front is None
    before = front.served
    answers, closed = await both(pair, req(pair, "/assets/app.js") * 3, 3)
    assert [a.status for a in answers] == [200, 200, 200] and not closed
    assert front.served == before + 3


@pytest.mark.parametrize("tail,extra", [
    ("/", "Accept: text/html\r\n"),                     # the document route
    ("/page", "Accept: text/html\r\n"),                 # rewritten, hashed CSP, Set-Cookie dropped
    ("/assets/app.js", "Accept-Encoding: gzip\r\n"),
    ("/assets/app.js?v=1", ""),
    ("/favicon.svg", ""),
    ("/redirect", ""),                                  # a redirect out of the UI: 502
    ("/assets/not-modified", 'If-None-Match: "v1"\r\n'),  # 304: no body, no length
    ("/assets/no-content", ""),                         # 204
    ("/stream", ""),                                    # streamed (chunked) body
    ("/tools/invoke", ""),                              # 403
    ("/TOOLS/%69nvoke", ""),
    ("/assets/%2fetc", ""),                             # 400 ambiguous
    ("/assets/a%zz", ""),
    ("/a/../../x", ""),
    ("/./assets/app.js", ""),
    ("/plugins/x", ""),                                 # 403 not a UI route
    ("", ""),                                           # prefix root: 302
    ("?x=1", ""),
    ("/assets/app.js", "Origin: http://evil.test\r\n"),  # a GET: Origin not checked
    ("/assets/app.js", "Connection: close\r\n"),
    ("/assets/app.js", "Cookie: a=b; authjs.session-token=nope\r\n"),
])
async def test_same_answer_as_aiohttp(pair: Pair, tail: str, extra: str) -> None:
    await both(pair, req(pair, tail, extra=extra))


async def test_same_refusals(pair: Pair) -> None:
    assert (await both(pair, req(pair, "/assets/app.js", cookie=False)))[0][0].status == 401
    assert (await both(pair, req(pair, "/assets/app.js", agent="00000000-0000-0000-0000-000000000000"))
            )[0][0].status == 404
    assert (await both(pair, req(pair, "/assets/app.js", host="bad host")))[0][0].status == 400
    await both(pair, req(pair, "/assets/app.js", host=" \tproxy.test \t"))  # OWS around a value
    await both(pair, req(pair, "/page", extra="Accept:text/html \r\nAccept-Encoding:\t gzip, br  \r\n"))
    await both(pair, req(pair, "/assets/app.js", host="proxy.test\r\nx-empty:"))  # an empty value
    await both(pair, req(pair, "/assets/app.js", extra=" folded: line\r\n"))  # obs-fold
    await both(pair, req(pair, "/assets/app.js", extra="Na me: x\r\n"))
    await both(pair, req(pair, "/assets/app.js", extra=":x\r\n"))
    await both(pair, req(pair, "/assets/app.js", extra="X: caf\u00e9\r\n"))  # UTF-8 in a value
    await both(pair, req(pair, "/assets/app.js", agent="not-a-uuid"))
    await both(pair, req(pair, "/assets/app.js", agent="%2e%2e"))



async def test_cached_asset_same_answer_as_aiohttp(pair: Pair) -> None:
    """A fingerprinted asset from the asset cache (the fast front's light response, headers built once
    per entry and copied per answer) reads exactly as aiohttp's answer, miss and hits alike."""
    assert pair.fast.gateway.assets is not None and pair.slow.gateway.assets is not None
    for extra in ("", "Accept-Encoding: gzip, br\r\n", "Connection: close\r\n"):
        answers, _closed = await both(pair, req(pair, IMMUTABLE_ASSET, extra=extra) * (1 if extra else 3),
                                      1 if extra else 3)
        assert all(a.status == 200 and a.body == b"console.log(1);" for a in answers)
    hits = pair.fast.gateway.assets.hits
    await both(pair, req(pair, IMMUTABLE_ASSET))
    assert pair.fast.gateway.assets.hits == hits + 1  # answered from the cache, on the fast path
    raw = req(pair, IMMUTABLE_ASSET, method="HEAD", extra="Connection: close\r\n")
    assert await raw_until_closed(pair.fast, raw) == await raw_until_closed(pair.slow, raw)


async def test_repeated_header_blocks(pair: Pair) -> None:
    """The fast front's field parse and the upstream head are memoised per header block: the same
    block again, on another path or connection, and one field changed, all answer as aiohttp does."""
    for _ in range(2):
        for tail in ("/assets/app.js", "/favicon.svg", "/page", "/tools/invoke"):
            await both(pair, req(pair, tail, extra="Accept: */*\r\nX-Requested-With: a\r\n"))
    changed = [await both(pair, req(pair, "/assets/app.js", extra=extra)) for extra in (
        "Accept: */*\r\n", "Accept: text/html\r\n", "Upgrade: websocket\r\nConnection: Upgrade\r\n",
        "Accept: */*\r\n")]
    assert [a[0][0].status for a in changed] == [200, 200, 403, 200]
    sent = [r for r in pair.upstream.requests if r["path"].endswith("/favicon.svg")][-2:]
    assert len(sent) == 2 and sent[0]["headers"] == sent[1]["headers"]


async def test_repeated_heads(pair: Pair) -> None:
    """The front's head parse is memoised per head bytes: the very same head again (on a new
    connection, pipelined, after a refusal of the same bytes) answers as aiohttp does each time,
    and one byte changed is judged afresh."""
    plain = req(pair, "/assets/app.js", extra="Accept: */*\r\n")
    refused = b"GET /agents/x/gateway/ HTTP/1.0\r\nHost: a\r\n\r\n"
    bare_lf = req(pair, "/assets/app.js", extra="X: a\nY: b\r\n")
    for _ in range(2):
        assert (await both(pair, plain))[0][0].status == 200
        assert (await both(pair, plain * 3, 3))[0][2].status == 200
        await both(pair, refused)
        await both(pair, bare_lf)
        head = req(pair, "/assets/app.js", method="HEAD", extra="Accept: */*\r\nConnection: close\r\n")
        assert await raw_until_closed(pair.fast, head) == await raw_until_closed(pair.slow, head)
    assert (await both(pair, plain.replace(b"HTTP/1.1", b"HTTP/1.0")))[0][0].status == 200
    assert (await both(pair, plain.replace(b"GET", b"PUT")))[0][0].status == 403


async def raw_until_closed(proxy: RunningProxy, raw: bytes) -> list[bytes]:
    """The answer's lines but `Date`, read until the proxy closes (a HEAD answer has no body to frame)."""
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return sorted(line for line in data.split(b"\r\n") if not line.lower().startswith(b"date:"))


@pytest.mark.parametrize("tail", ["/assets/app.js", "/tools/invoke", "", "/page"])
async def test_head_same_as_aiohttp(pair: Pair, tail: str) -> None:
    raw = req(pair, tail, method="HEAD", extra="Accept: text/html\r\nConnection: close\r\n")
    fast, slow = await raw_until_closed(pair.fast, raw), await raw_until_closed(pair.slow, raw)
    assert fast == slow
    assert any(line.startswith(b"HTTP/1.1 ") for line in fast) and b"upstream:" not in b"".join(fast)


@pytest.mark.parametrize("raw", [
    b"GET /agents/x/gateway/ HTTP/1.1 extra\r\nHost: a\r\n\r\n",       # malformed request line
    b"get /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /agents/x/gateway/ HTTP/1.0\r\nHost: a\r\n\r\n",              # HTTP/1.0: aiohttp's
    b"GET /agents/x/gateway/ HTTP/1.1\r\n\r\n",                         # no Host
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",   # two
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",        # bare LF inside
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 9000 + b"\r\n\r\n",  # oversized field
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 140 + b"\r\n",  # too many fields
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET /agents/x/gatewayz HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
])
async def test_unusual_requests_get_aiohttps_answer(pair: Pair, raw: bytes) -> None:
    answers, _closed = await both(pair, raw)
    assert answers and answers[0].status in (200, 302, 400, 401, 403, 404, 431)


async def test_oversized_head_without_end(pair: Pair) -> None:
    """A head that never ends within the limit is aiohttp's to refuse, not left to the header timer."""
    raw = b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 20000
    answers, closed = await both(pair, raw)
    assert answers[0].status == 400 and closed


async def test_pipelined_mix(pair: Pair) -> None:
    """Fast, aiohttp (a body), fast again: in order, each answered once, on one connection."""
    post = (f"POST /agents/{pair.seeded.agent_id}/gateway/assets/x HTTP/1.1\r\nHost: proxy.test\r\n"
            f"Cookie: authjs.session-token={pair.seeded.session}\r\nContent-Length: 2\r\n\r\nhi").encode()
    raw = req(pair, "/assets/app.js") + req(pair, "/tools/invoke") + post + req(pair, "/favicon.svg")
    answers, closed = await both(pair, raw, 4)
    assert [a.status for a in answers] == [200, 403, 403, 200] and not closed


async def test_connection_close_and_keepalive(pair: Pair) -> None:
    answers, closed = await exchange(pair.fast, req(pair, "/assets/app.js", extra="Connection: close\r\n"), 1)
    assert ("connection", "close") in answers[0].headers and closed
    answers, closed = await exchange(pair.fast, req(pair, "/assets/app.js"), 1)
    assert not any(k == "connection" for k, _ in answers[0].headers) and not closed


async def test_idle_keepalive_connection_is_closed(pair: Pair) -> None:
    port = int(pair.fast.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(req(pair, "/assets/app.js"))
        first = await asyncio.wait_for(reader.readuntil(b"upstream:"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after keepalive_timeout (1.5 s)
    finally:
        writer.close()


async def test_partial_head_after_a_fast_request_times_out(pair: Pair) -> None:
    """The listener's header timeout still applies between fast requests (slowloris)."""
    port = int(pair.fast.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(req(pair, "/assets/app.js"))
        await asyncio.wait_for(reader.readuntil(b"upstream:"), 5)
        writer.write(b"GET /agents/x/gateway/ HTTP/1.1\r\nHost: a\r\n")  # never finished
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - started < 1.4  # the header timeout (1 s), not keep-alive's 1.5 s
    finally:
        writer.close()


async def test_metered_on_the_connection_exactly(pair: Pair, sql: psycopg.Connection) -> None:
    """The fast front's answers are metered on their browser connection (`ConnectionBytes`): the
    bytes are in `pending` and flushed while it stays open, the rest when it closes; the totals are
    the bodies' bytes (none rewritten here), as through aiohttp."""
    meter, vps = pair.fast.meter, pair.seeded.vps_id
    await meter.flush()
    start = usage(sql, vps)
    port = int(pair.fast.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parsed = _Parsed()
    parser = parsed.parser = httptools.HttpResponseParser(parsed)

    async def answers(raw: bytes, count: int) -> None:
        writer.write(raw)
        while len(parsed.answers) < count:
            parser.feed_data(await asyncio.wait_for(reader.read(65536), 10))

    try:
        await answers(req(pair, "/assets/app.js") + req(pair, "/favicon.svg"), 2)
        first = sum(len(a.body) for a in parsed.answers)
        assert first > 0 and meter.pending({vps}) == first
        await meter.flush()
        assert usage(sql, vps) == (start[0], start[1] + first)
        await answers(req(pair, "/assets/app.js") + req(pair, "/assets/stream"), 4)
    finally:
        writer.close()
    assert [a.status for a in parsed.answers] == [200] * 4
    total = sum(len(a.body) for a in parsed.answers)
    assert total > first + 20  # the streamed body too
    for _ in range(100):  # the proxy sees the close
        if not any(c.transport is not None for c in pair.fast.gateway_front.connections):  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    await meter.flush()
    assert usage(sql, vps) == (start[0], start[1] + total)


async def test_answer_heads_from_templates(pair: Pair) -> None:
    """The front writes each head from a template per (status, reason, fields, HEAD, close, length):
    the same answer as GET, HEAD and with `Connection: close`, in turn and repeated, reads as
    aiohttp's, and only `Date` is filled in per answer (it moves on with the clock)."""
    for _ in range(2):
        for extra in ("", "Connection: close\r\n"):
            for tail in ("/assets/app.js", "/tools/invoke", "/assets/no-content", ""):
                await both(pair, req(pair, tail, extra=extra))
                raw = req(pair, tail, method="HEAD", extra="Connection: close\r\n")
                assert await raw_until_closed(pair.fast, raw) == await raw_until_closed(pair.slow, raw)
    port = int(pair.fast.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        heads = []
        for _ in range(2):
            writer.write(req(pair, "/assets/app.js"))
            heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            assert await asyncio.wait_for(reader.readexactly(9), 10) == b"upstream:"
            await asyncio.sleep(1.1)
    finally:
        writer.close()
    date = [next(line for line in h.split(b"\r\n") if line.startswith(b"Date: ")) for h in heads]
    assert date[0] != date[1]
    assert heads[0].replace(date[0], b"") == heads[1].replace(date[1], b"")


async def test_head_template_refuses_cr_lf() -> None:
    """A field or reason with CR or LF is refused (the front answers 500, as aiohttp), every time."""
    for _ in range(2):
        with pytest.raises(ValueError, match="Newline or carriage return"):
            _head_template(200, None, (("X", "a\r\nSet-Cookie: x=1"),), False, False, 0, True)
        with pytest.raises(ValueError, match="Newline or carriage return"):
            _head_template(200, "OK\r\nX: y", (), False, False, 0, True)
    before, after, empty = _head_template(204, None, (("Content-Length", "0"),), False, True, 0, True)
    assert before == b"HTTP/1.1 204 No Content\r\nDate: " and empty
    assert after == b"\r\nServer: " + SERVER_SOFTWARE.encode() + b"\r\nConnection: close\r\n\r\n"


async def test_timeouts_count_from_the_latest_head_and_idle_spell(pair: Pair) -> None:
    """The header and keep-alive timers are lazy (kept across requests, re-aimed when they fire):
    a head begun late is still given the whole header timeout (1 s) from its first byte, a
    connection used more often than the keep-alive timeout (1.5 s) stays open past it, and once
    idle it is closed after the keep-alive timeout."""
    port = int(pair.fast.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    try:
        head = req(pair, "/assets/app.js")
        writer.write(head)  # the header timer is made here: due in 1 s
        await asyncio.wait_for(reader.readuntil(b"upstream:"), 5)
        await asyncio.sleep(0.7)
        writer.write(head[:20])  # the next head begins 0.7 s later: due 1 s from now, not 0.3 s
        await asyncio.sleep(0.6)  # past the first head's deadline
        writer.write(head[20:])
        assert (await asyncio.wait_for(reader.readuntil(b"upstream:"), 5)).startswith(b"HTTP/1.1 200")
        for _ in range(2):  # 2 x 1.0 s of use, each gap shorter than the keep-alive timeout
            await asyncio.sleep(1.0)
            writer.write(head)
            assert (await asyncio.wait_for(reader.readuntil(b"upstream:"), 5)).startswith(b"HTTP/1.1 200")
        idle = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 1.3 < loop.time() - idle < 3.0  # the keep-alive timeout from the last answer
    finally:
        writer.close()


def _serving_tasks() -> list[asyncio.Task[object]]:
    """The fast front's connection tasks still alive (`_FastProtocol._serve`)."""
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "_FastProtocol._serve"]


async def _gone(pair: Pair) -> None:
    """Every fast-front connection and its task ended (within 2 s)."""
    front = pair.fast.gateway_front
    assert front is not None
    for _ in range(200):
        if not front.connections and not _serving_tasks():
            return
        await asyncio.sleep(0.01)
    raise AssertionError((front.connections, _serving_tasks()))


async def test_keepalive_pipelined_and_handed_over_requests_on_one_connection(pair: Pair) -> None:
    """One connection's requests run one after another on one task that waits between them: sent
    one at a time with pauses, pipelined (a streamed answer among them), then an aiohttp request
    after a pause (the connection goes to aiohttp, which answers it and the fast one after it),
    every answer in order; when the browser hangs up, nothing of the connection is left."""
    await _gone(pair)
    port = int(pair.fast.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parsed = _Parsed()
    parser = parsed.parser = httptools.HttpResponseParser(parsed)

    async def answers(count: int) -> list[Answer]:
        while len(parsed.answers) < count:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "closed"
            parser.feed_data(data)
        return parsed.answers[count - 1:count]

    try:
        served = pair.fast.gateway_front.served  # type: ignore[union-attr]
        for i in range(3):
            writer.write(req(pair, "/assets/app.js"))
            assert (await answers(i + 1))[0].body == b"upstream:"
            await asyncio.sleep(0.05)  # the connection waits for its next request
        assert len(_serving_tasks()) == 1
        writer.write(req(pair, "/assets/app.js") + req(pair, "/assets/stream") + req(pair, "/favicon.svg"))
        await answers(6)
        assert [a.body for a in parsed.answers[3:6]] == [b"upstream:", b"data: first\n\ndata: second\n\n",
                                                         b"upstream:"]
        assert pair.fast.gateway_front.served == served + 6  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy.test\r\n\r\n" + req(pair, "/assets/app.js"))
        await answers(8)
        assert [a.status for a in parsed.answers] == [200] * 8 and parsed.answers[7].body == b"upstream:"
        assert pair.fast.gateway_front.served == served + 6  # type: ignore[union-attr]  # aiohttp's from there
        assert not _serving_tasks()  # the fast front's task ended with the hand-over
    finally:
        writer.close()
    await _gone(pair)


async def test_a_browser_gone_mid_answer_ends_its_connection_only(pair: Pair) -> None:
    """A browser that hangs up while its streamed answer is being written: its connection and task
    end, and the next connection is served as usual."""
    await _gone(pair)
    pair.upstream.release.clear()
    try:
        port = int(pair.fast.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(pair, "/assets/stream"))
        assert b"data: first" in await asyncio.wait_for(reader.readuntil(b"data: first"), 5)
        writer.transport.abort()  # gone, mid-answer
        await asyncio.sleep(0.1)
    finally:
        pair.upstream.release.set()
    await _gone(pair)
    answers, closed = await exchange(pair.fast, req(pair, "/assets/app.js") + req(pair, "/favicon.svg"), 2)
    assert [a.status for a in answers] == [200, 200] and not closed
    await _gone(pair)


async def test_a_cancelled_waiting_connection_task_does_not_lose_the_next_request(pair: Pair) -> None:
    """If the connection's waiting task is cancelled (as at loop shutdown), the connection's next
    request still gets its answer."""
    await _gone(pair)
    port = int(pair.fast.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(req(pair, "/assets/app.js"))
        assert (await asyncio.wait_for(reader.readuntil(b"upstream:"), 5)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.05)
        (task,) = _serving_tasks()
        task.cancel()
        writer.write(req(pair, "/favicon.svg"))  # may arrive before or after the cancelled task ends
        assert (await asyncio.wait_for(reader.readuntil(b"upstream:"), 5)).startswith(b"HTTP/1.1 200")
        assert task.cancelled() and len(_serving_tasks()) == 1
    finally:
        writer.close()
    await _gone(pair)
