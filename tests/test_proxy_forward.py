"""The agents' forward proxy: Basic auth, HTTP and CONNECT, exact metering, the SSRF guard, plan
enforcement and limits.

Network rule: tests only ever reach 127.0.0.1. The positive path uses a policy that admits one
loopback (address, port) on purpose; every refusal goes through the production policy and must
happen before any connection (a guard fails the test if the proxy dials anything but loopback).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
import pytest_asyncio

from billing.plans import month_start
from proxy.app import serve
from proxy.config import ProxyConfig
from proxy.egress import EgressPolicy, EgressRefused, system_resolver
from proxy.metering import Meter
from settings import Settings
from tests.proxy_harness import TEST_CONFIG, Seeded, running_proxy, seed_gateway_user, usage

pytestmark = pytest.mark.asyncio(loop_scope="session")

GIB = 1024**3
PUBLIC_NAME = "api.example.test"
_dial = asyncio.open_connection  # the tests' own client connections, not seen by the guard below


@dataclass
class RawUpstream:
    """A TCP server on loopback that records every byte and answers with fixed bytes."""

    response: bytes = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    echo: bool = False
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.echo:
                while data := await reader.read(65536):
                    self.received += data
                    writer.write(data)
                    await writer.drain()
                return
            while b"\r\n\r\n" not in self.received:
                data = await reader.read(65536)
                if not data:
                    return
                self.received += data
            head, _, body = bytes(self.received).partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                data = await reader.read(65536)
                if not data:
                    break
                self.received += data
                body += data
            await asyncio.sleep(0.05)  # anything pipelined behind the request would arrive meanwhile
            with_more = await _read_nowait(reader)
            self.received += with_more
            writer.write(self.response)
            await writer.drain()
        finally:
            writer.close()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def _read_nowait(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), 0.05)
    except TimeoutError:
        return b""


def basic(agent_id: uuid.UUID | str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{agent_id}:{token}".encode()).decode()


@dataclass
class Env:
    seeded: Seeded
    proxy_port: int
    meter: Meter | None = None

    def auth(self) -> str:
        return basic(self.seeded.agent_id, self.seeded.gateway_token)

    async def exchange(self, data: bytes, *, then: bytes = b"", read_until_close: bool = True) -> bytes:
        reader, writer = await _dial("127.0.0.1", self.proxy_port)
        writer.write(data)
        await writer.drain()
        if then:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(then)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return head + rest
        out = await asyncio.wait_for(reader.read(), 10) if read_until_close else b""
        writer.close()
        return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail the test if the proxy ever dials anything but loopback."""
    dialled: list[str] = []
    original = asyncio.open_connection

    async def guarded(host: str | None = None, port: int | None = None, **kw: object):  # type: ignore[no-untyped-def]
        dialled.append(str(host))
        assert host is not None and ipaddress.ip_address(host).is_loopback, f"proxy dialled {host}"
        return await original(host, port, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "open_connection", guarded)
    yield dialled


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[RawUpstream]:
    async with RawUpstream() as up:
        yield up


def loopback_policy(up: RawUpstream) -> EgressPolicy:
    """Resolves the test's public name to loopback and admits exactly that upstream."""
    async def resolver(host: str) -> list[str]:
        if host == PUBLIC_NAME:
            return ["127.0.0.1"]
        raise OSError("unknown name")

    return EgressPolicy(resolver, allowed_targets=[("127.0.0.1", up.port)])


@pytest_asyncio.fixture(loop_scope="session")
async def env(settings: Settings, sql: psycopg.Connection, upstream: RawUpstream) -> AsyncIterator[Env]:
    seeded = seed_gateway_user(sql, settings, port=1)
    async with running_proxy(settings, policy=loopback_policy(upstream)) as proxy:
        yield Env(seeded, proxy.forward_port, proxy.meter)


# -- authentication ---------------------------------------------------------------------------------


async def test_missing_or_wrong_credentials_are_407(env: Env, upstream: RawUpstream) -> None:
    target = f"GET http://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: x\r\n"
    token = env.seeded.gateway_token
    for auth in (None, basic(env.seeded.agent_id, "wrong-token"), basic(uuid.uuid4(), token),
                 basic("not-a-uuid", token), "Basic !!!notbase64", "Bearer " + token,
                 basic(env.seeded.agent_id, token + "x")):
        head = target + (f"Proxy-Authorization: {auth}\r\n" if auth else "") + "\r\n"
        out = await env.exchange(head.encode())
        assert status_of(out) == 407, (auth, out)
        assert b'Proxy-Authenticate: Basic realm="slopbox"' in out
    assert upstream.connections == 0


async def test_stopped_vm_is_refused(env: Env, sql: psycopg.Connection, upstream: RawUpstream) -> None:
    sql.execute("UPDATE vpses SET state = 'stopped' WHERE id = %s", (env.seeded.vps_id,))
    out = await env.exchange(f"GET http://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: x\r\n"
                             f"Proxy-Authorization: {env.auth()}\r\n\r\n".encode())
    assert status_of(out) == 403 and b"not running" in out
    assert upstream.connections == 0


# -- HTTP and CONNECT, metered ----------------------------------------------------------------------


async def test_http_request_is_forwarded_and_metered(env: Env, sql: psycopg.Connection,
                                                     upstream: RawUpstream, settings: Settings) -> None:
    body = b"x" * 5000
    request = (f"POST http://{PUBLIC_NAME}:{upstream.port}/v1/things?a=1 HTTP/1.1\r\n"
               f"Host: {PUBLIC_NAME}:{upstream.port}\r\nProxy-Authorization: {env.auth()}\r\n"
               f"Proxy-Connection: keep-alive\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    out = await env.exchange(request)
    assert status_of(out) == 200 and out.endswith(b"hello")
    sent = bytes(upstream.received)
    assert sent.startswith(b"POST /v1/things?a=1 HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in sent and b"Proxy-Connection" not in sent
    assert env.seeded.gateway_token.encode() not in sent
    assert b"Connection: close" in sent and sent.endswith(body)
    async with running_proxy(settings) as other:  # a second proxy process adds to the same row
        other.meter.add(env.seeded.vps_id, inbound=1, outbound=2)
    assert env.meter is not None
    await env.meter.flush()
    assert usage(sql, env.seeded.vps_id) == (len(out) + 1, len(sent) + 2)


async def test_connect_tunnel_is_relayed_and_metered(settings: Settings, sql: psycopg.Connection) -> None:
    async with RawUpstream(echo=True) as echo:
        seeded = seed_gateway_user(sql, settings, port=1)
        async with running_proxy(settings, policy=loopback_policy(echo)) as proxy:
            env = Env(seeded, proxy.forward_port)
            payload = b"\x16\x03\x01 pretend TLS " * 1000
            out = await env.exchange(f"CONNECT {PUBLIC_NAME}:{echo.port} HTTP/1.1\r\nHost: {PUBLIC_NAME}:{echo.port}"
                                     f"\r\nProxy-Authorization: {env.auth()}\r\n\r\n".encode(), then=payload)
            assert out.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            assert out.endswith(payload) and bytes(echo.received) == payload
            await proxy.meter.flush()
        assert usage(sql, seeded.vps_id) == (len(payload), len(payload))


async def test_only_one_request_per_connection_reaches_the_target(env: Env, upstream: RawUpstream) -> None:
    first = (f"GET http://{PUBLIC_NAME}:{upstream.port}/one HTTP/1.1\r\nHost: a\r\n"
             f"Proxy-Authorization: {env.auth()}\r\n\r\n")
    smuggled = f"GET /two HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\n\r\n"
    out = await env.exchange((first + smuggled).encode())
    assert status_of(out) == 200
    assert b"/two" not in bytes(upstream.received)


@pytest.mark.parametrize("extra", [
    "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    "Content-Length: 3\r\nContent-Length: 4\r\n",
    "Transfer-Encoding: gzip, chunked\r\n",
    "Content-Length: -1\r\n",
    " folded: header\r\n",
])
async def test_ambiguous_framing_is_refused(env: Env, upstream: RawUpstream, extra: str) -> None:
    out = await env.exchange((f"POST http://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: a\r\n{extra}"
                              f"Proxy-Authorization: {env.auth()}\r\n\r\nabc").encode())
    assert status_of(out) in (400, 501), out
    assert upstream.connections == 0


async def test_chunked_request_body_is_framed(env: Env, upstream: RawUpstream) -> None:
    body = b"5\r\nhello\r\n0\r\n\r\n"
    out = await env.exchange((f"POST http://{PUBLIC_NAME}:{upstream.port}/c HTTP/1.1\r\nHost: a\r\n"
                              f"Transfer-Encoding: chunked\r\nProxy-Authorization: {env.auth()}\r\n\r\n").encode()
                             + body + b"GARBAGE")
    assert status_of(out) == 200
    assert bytes(upstream.received).endswith(body)


async def test_https_urls_need_connect(env: Env, upstream: RawUpstream) -> None:
    out = await env.exchange((f"GET https://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: a\r\n"
                              f"Proxy-Authorization: {env.auth()}\r\n\r\n").encode())
    assert status_of(out) == 400


# -- SSRF: the production policy, refusals before any connection ------------------------------------


async def _stub_public_resolver(host: str) -> list[str]:
    answers = {
        "rebind.example.com": ["10.0.0.7"],  # a public-looking name answering a private address
        "meta.example.com": ["169.254.169.254"],
        "loop.example.com": ["127.0.0.1"],
        "mixed.example.com": ["93.184.215.14", "127.0.0.1"],
        "v6loop.example.com": ["::1"],
        "mapped.example.com": ["::ffff:10.1.2.3"],
    }
    if host in answers:
        return answers[host]
    if host in ("localhost",):
        return await system_resolver(host)  # /etc/hosts, no network
    raise OSError("no such name")


FORBIDDEN_TARGETS = [
    "localhost:80", "LOCALHOST.:80", "foo.localhost:80", "printer.local:631", "metadata.google.internal:80",
    "127.0.0.1:{port}", "127.1:80", "2130706433:80", "0x7f000001:80", "0x7f.0.0.1:80", "0177.0.0.1:80",
    "[::1]:80", "[::ffff:127.0.0.1]:80", "[::ffff:7f00:1]:80", "[0:0:0:0:0:0:0:1]:80",
    "169.254.169.254:80", "[fe80::1]:80", "[fd00:ec2::254]:80", "10.0.0.1:80", "172.16.5.4:80",
    "192.168.1.1:80", "100.64.0.1:80", "0.0.0.0:80", "224.0.0.1:80", "255.255.255.255:80", "[2002:a00:1::]:80",
    "rebind.example.com:443", "meta.example.com:80", "loop.example.com:80", "mixed.example.com:443",
    "v6loop.example.com:443", "mapped.example.com:443", "8.8.4.4:443", "1.1.1.1:443", "1.2.3.999:80",
    "unknown.example.com:443",
]


@pytest.mark.parametrize("target", FORBIDDEN_TARGETS)
@pytest.mark.parametrize("method", ["CONNECT", "GET"])
async def test_forbidden_destinations_are_refused_before_connecting(
        settings: Settings, sql: psycopg.Connection, upstream: RawUpstream, loopback_only: list[str],
        target: str, method: str) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    policy = EgressPolicy(_stub_public_resolver, denied=["8.8.4.4/32"],
                          denied_dynamic=lambda: {ipaddress.ip_address("1.1.1.1")})
    target = target.format(port=upstream.port)
    async with running_proxy(settings, policy=policy) as proxy:
        env = Env(seeded, proxy.forward_port)
        line = f"CONNECT {target} HTTP/1.1" if method == "CONNECT" else f"GET http://{target}/ HTTP/1.1"
        out = await env.exchange(f"{line}\r\nHost: {target}\r\nProxy-Authorization: {env.auth()}\r\n\r\n".encode())
    assert status_of(out) == 403, out
    assert loopback_only == [] and upstream.connections == 0
    if target.startswith(("8.8.4.4", "1.1.1.1")):
        assert b"control-plane" in out


# -- plan enforcement and limits ----------------------------------------------------------------------


async def test_over_plan_and_over_budget_is_403_with_the_reason(settings: Settings, sql: psycopg.Connection,
                                                                upstream: RawUpstream) -> None:
    seeded = seed_gateway_user(sql, settings, port=1, plan="starter")  # 100 GiB, 2 cents per GiB over
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes) VALUES (%s, %s, %s)",
                (seeded.vps_id, month_start(), 101 * GIB))
    request = (f"GET http://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: a\r\n"
               f"Proxy-Authorization: {basic(seeded.agent_id, seeded.gateway_token)}\r\n\r\n").encode()
    async with running_proxy(settings, policy=loopback_policy(upstream)) as proxy:
        env = Env(seeded, proxy.forward_port)
        out = await env.exchange(request)
        assert status_of(out) == 403 and b"bandwidth" in out and b"budget" in out, out
        assert upstream.connections == 0
        sql.execute("INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES (%s, %s, 500)",
                    (seeded.user_id, month_start()))
        assert status_of(await env.exchange(request)) == 200
        connect = (f"CONNECT {PUBLIC_NAME}:{upstream.port} HTTP/1.1\r\nHost: a\r\n"
                   f"Proxy-Authorization: {basic(seeded.agent_id, seeded.gateway_token)}\r\n\r\n").encode()
        sql.execute("UPDATE overage_budgets SET budget_cents = 1 WHERE user_id = %s", (seeded.user_id,))
        out = await env.exchange(connect)
        assert status_of(out) == 403 and b"budget" in out


async def test_plan_without_overage_stops_at_the_limit(settings: Settings, sql: psycopg.Connection,
                                                       upstream: RawUpstream) -> None:
    seeded = seed_gateway_user(sql, settings, port=1, plan="free")  # 5 GiB, no overage rate
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_out_bytes) VALUES (%s, %s, %s)",
                (seeded.vps_id, month_start(), 5 * GIB + 1))
    sql.execute("INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES (%s, %s, 10000)",
                (seeded.user_id, month_start()))
    async with running_proxy(settings, policy=loopback_policy(upstream)) as proxy:
        out = await Env(seeded, proxy.forward_port).exchange(
            (f"GET http://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: a\r\n"
             f"Proxy-Authorization: {basic(seeded.agent_id, seeded.gateway_token)}\r\n\r\n").encode())
    assert status_of(out) == 403 and b"no overage" in out


async def test_unflushed_bytes_count_towards_the_limit(settings: Settings, sql: psycopg.Connection,
                                                       upstream: RawUpstream) -> None:
    seeded = seed_gateway_user(sql, settings, port=1, plan="free")
    request = (f"GET http://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: a\r\n"
               f"Proxy-Authorization: {basic(seeded.agent_id, seeded.gateway_token)}\r\n\r\n").encode()
    async with running_proxy(settings, policy=loopback_policy(upstream)) as proxy:
        env = Env(seeded, proxy.forward_port)
        assert status_of(await env.exchange(request)) == 200
        proxy.meter.add(seeded.vps_id, inbound=5 * GIB)  # counted here, not yet in the database
        assert status_of(await env.exchange(request)) == 403


async def test_rate_and_connection_limits_are_429(settings: Settings, sql: psycopg.Connection,
                                                  upstream: RawUpstream) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "forward_burst": 2, "forward_rate_per_s": 0.01,
                         "forward_connections_per_user": 1})
    request = (f"GET http://{PUBLIC_NAME}:{upstream.port}/ HTTP/1.1\r\nHost: a\r\n"
               f"Proxy-Authorization: {basic(seeded.agent_id, seeded.gateway_token)}\r\n\r\n").encode()
    async with RawUpstream(echo=True) as echo:
        policy = EgressPolicy(loopback_policy(upstream)._resolver,  # noqa: SLF001
                              allowed_targets=[("127.0.0.1", upstream.port), ("127.0.0.1", echo.port)])
        async with running_proxy(settings, config=cfg, policy=policy) as proxy:
            env = Env(seeded, proxy.forward_port)
            # One tunnel open: a second connection of the same user is refused.
            reader, writer = await _dial("127.0.0.1", proxy.forward_port)
            writer.write((f"CONNECT {PUBLIC_NAME}:{echo.port} HTTP/1.1\r\nHost: a\r\n"
                          f"Proxy-Authorization: {env.auth()}\r\n\r\n").encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            busy = await env.exchange(request)
            assert status_of(busy) == 429 and b"Retry-After: 5" in busy
            writer.close()
            await asyncio.sleep(0.2)
            # Rate: the burst (2, one used by the tunnel) runs out.
            assert status_of(await env.exchange(request)) == 200
            limited = await env.exchange(request)
            assert status_of(limited) == 429 and b"Retry-After:" in limited


# -- plan enforcement on running tunnels --------------------------------------------------------------


def _config(**changes: object) -> ProxyConfig:
    return ProxyConfig(**{**TEST_CONFIG.__dict__, **changes})


async def _open_tunnel(proxy_port: int, seeded: Seeded, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _dial("127.0.0.1", proxy_port)
    writer.write((f"CONNECT {PUBLIC_NAME}:{port} HTTP/1.1\r\nHost: {PUBLIC_NAME}:{port}\r\n"
                  f"Proxy-Authorization: {basic(seeded.agent_id, seeded.gateway_token)}\r\n\r\n").encode())
    await writer.drain()
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
    return reader, writer


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the proxy closes the tunnel (10 s bound: a tunnel that stays open fails)."""
    out = bytearray()
    async with asyncio.timeout(10):
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionError:
                break
            if not data:
                break
            out += data
    return bytes(out)


async def test_open_tunnel_is_cut_when_the_user_goes_over_plan_and_budget(
        settings: Settings, sql: psycopg.Connection) -> None:
    seeded = seed_gateway_user(sql, settings, port=1, plan="starter")  # 100 GiB, 2 cents per GiB over
    sql.execute("INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES (%s, %s, 10)",
                (seeded.user_id, month_start()))
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes) VALUES (%s, %s, %s)",
                (seeded.vps_id, month_start(), 101 * GIB))  # over the plan, overage 2 cents: within the budget
    cfg = _config(forward_recheck_s=0.2, forward_tunnel_byte_budget=1 << 40,  # only the timer can cut
                  forward_idle_timeout_s=60.0)
    async with RawUpstream(echo=True) as echo, running_proxy(settings, config=cfg,
                                                             policy=loopback_policy(echo)) as proxy:
        reader, writer = await _open_tunnel(proxy.forward_port, seeded, echo.port)
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        await asyncio.sleep(0.5)  # a few re-checks while within the budget: the tunnel stays open
        writer.write(b"pong")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"pong"
        # Usage counted elsewhere (another proxy process, a flush) takes the overage to 20 cents.
        sql.execute("UPDATE vps_usage_periods SET bandwidth_in_bytes = %s WHERE vps_id = %s",
                    (110 * GIB, seeded.vps_id))
        assert await _read_to_eof(reader) == b""
        with contextlib.suppress(ConnectionError):
            writer.write(b"after the cut")
            await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        assert bytes(echo.received) == b"pingpong"
        assert proxy.forward._live == {}  # noqa: SLF001 - the cut tunnel is no longer tracked


async def test_tunnel_that_spends_its_byte_budget_is_rechecked_and_cut(
        settings: Settings, sql: psycopg.Connection) -> None:
    seeded = seed_gateway_user(sql, settings, port=1, plan="free")  # 5 GiB, no overage
    headroom = 256 * 1024
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_out_bytes) VALUES (%s, %s, %s)",
                (seeded.vps_id, month_start(), 5 * GIB - headroom))
    budget = 32 * 1024
    cfg = _config(forward_recheck_s=3600.0, forward_tunnel_byte_budget=budget,  # only the byte budget can cut
                  forward_idle_timeout_s=60.0)
    payload = b"z" * (4 * 1024 * 1024)
    async with RawUpstream(echo=True) as echo, running_proxy(settings, config=cfg,
                                                             policy=loopback_policy(echo)) as proxy:
        reader, writer = await _open_tunnel(proxy.forward_port, seeded, echo.port)

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                for i in range(0, len(payload), 16 * 1024):
                    writer.write(payload[i:i + 16 * 1024])
                    await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await _read_to_eof(reader)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        assert len(echo.received) < len(payload) and len(echoed) < len(payload)
        await proxy.meter.flush()
    metered = sum(usage(sql, seeded.vps_id)) - (5 * GIB - headroom)  # both directions count towards the plan
    assert metered >= len(echo.received) + len(echoed)
    assert metered > headroom, "the tunnel ran on through several budgets while under the plan (re-checked)"
    assert metered <= headroom + budget + 2 * 64 * 1024, metered  # cut at the first check over the plan


async def test_http_request_cut_before_its_answer_gets_403_with_the_reason(
        settings: Settings, sql: psycopg.Connection) -> None:
    """A plain-HTTP request waiting for a slow destination when the user goes over the plan is
    answered 403 with the reason (nothing was sent back yet), not left hanging or reset."""
    seeded = seed_gateway_user(sql, settings, port=1, plan="free")
    received = asyncio.Event()
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policy = EgressPolicy(loopback_policy(RawUpstream(port=port))._resolver,  # noqa: SLF001
                          allowed_targets=[("127.0.0.1", port)])
    cfg = _config(forward_recheck_s=0.2, forward_idle_timeout_s=60.0)
    try:
        async with running_proxy(settings, config=cfg, policy=policy) as proxy:
            reader, writer = await _dial("127.0.0.1", proxy.forward_port)
            writer.write((f"GET http://{PUBLIC_NAME}:{port}/slow HTTP/1.1\r\nHost: a\r\n"
                          f"Proxy-Authorization: {basic(seeded.agent_id, seeded.gateway_token)}\r\n\r\n").encode())
            await writer.drain()
            await asyncio.wait_for(received.wait(), 10)
            sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes) "
                        "VALUES (%s, %s, %s)", (seeded.vps_id, month_start(), 5 * GIB + 1))
            out = await _read_to_eof(reader)
            writer.close()
    finally:
        release.set()
        server.close()
    assert status_of(out) == 403 and b"bandwidth" in out and b"no overage" in out, out


# -- destination ports ---------------------------------------------------------------------------------


async def test_connect_to_smtp_is_refused_while_https_is_allowed(
        settings: Settings, sql: psycopg.Connection, loopback_only: list[str]) -> None:
    """The production policy (built by `serve` from the settings): port 25 on a public address is
    refused before any lookup or connection; 443 passes the policy (checked without connecting)."""
    seeded = seed_gateway_user(sql, settings, port=1)
    async with serve(settings, config=TEST_CONFIG, host="127.0.0.1", port=0, forward_port=0) as proxy:
        env = Env(seeded, proxy.forward_port)
        for line in ("CONNECT 93.184.215.14:25 HTTP/1.1", "GET http://93.184.215.14:25/ HTTP/1.1",
                     "CONNECT 93.184.215.14:22 HTTP/1.1", "CONNECT [2606:4700:4700::1111]:587 HTTP/1.1"):
            out = await env.exchange(f"{line}\r\nHost: x\r\nProxy-Authorization: {env.auth()}\r\n\r\n".encode())
            assert status_of(out) == 403, (line, out)
            assert b"is not allowed (allowed ports: 80, 443)" in out, out
        target = await proxy.forward.policy.check("93.184.215.14", 443)
        assert (str(target.ip), target.port) == ("93.184.215.14", 443)
        assert (await proxy.forward.policy.check("93.184.215.14", 80)).port == 80
    assert loopback_only == []


async def test_allowed_ports_are_configurable(settings: Settings, sql: psycopg.Connection,
                                              loopback_only: list[str]) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    custom = settings.model_copy(update={"forward_proxy_allowed_ports": [443, 5222]})
    async with serve(custom, config=TEST_CONFIG, host="127.0.0.1", port=0, forward_port=0) as proxy:
        env = Env(seeded, proxy.forward_port)
        out = await env.exchange(f"GET http://93.184.215.14/ HTTP/1.1\r\nHost: x\r\n"
                                 f"Proxy-Authorization: {env.auth()}\r\n\r\n".encode())
        assert status_of(out) == 403 and b"port 80 is not allowed (allowed ports: 443, 5222)" in out, out
        assert (await proxy.forward.policy.check("93.184.215.14", 5222)).port == 5222
    assert loopback_only == []


async def test_allowed_ports_setting_is_parsed_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARD_PROXY_ALLOWED_PORTS", " 443, 8443,443 ")
    assert Settings().forward_proxy_allowed_ports == [443, 8443]
    for bad in ("", "443,https", "0", "70000"):
        monkeypatch.setenv("FORWARD_PROXY_ALLOWED_PORTS", bad)
        with pytest.raises(ValueError, match="FORWARD_PROXY_ALLOWED_PORTS|forward_proxy_allowed_ports"):
            Settings()


async def test_exact_test_targets_still_need_an_allowed_port_otherwise(upstream: RawUpstream) -> None:
    """The loopback escape hatch of the tests admits its own (address, port) pair, nothing more."""
    policy = loopback_policy(upstream)
    assert (await policy.check(PUBLIC_NAME, upstream.port)).port == upstream.port
    with pytest.raises(EgressRefused, match="port 25 is not allowed"):
        await policy.check(PUBLIC_NAME, 25)
