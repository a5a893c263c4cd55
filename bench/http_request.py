"""One plain proxied Control UI GET, in process and without sockets: the proxy's CPU per request.

Builds the production gateway path (the listener's `GuardedProtocol`, the fast front
`proxy.http_fast`, `GatewayProxy.handle` with every check, instrumented limiters, the counting
byte meter, the asset cache, our upstream client `proxy.upstream_http`) over two in-memory
transports: the browser's (it gets the request bytes `bench.proxy`'s aiohttp load generator sends,
with a session cookie and an `Origin`) and one kept-alive connection to the "gateway" (it answers
every request head with the bytes `bench.proxy`'s aiohttp upstream sends: 200, 1 KiB
`application/octet-stream`). The session lookup is answered once (no database) and cached, as in
production within `auth_cache_ttl_s`; the per-user and per-address limits are raised as in
`bench.proxy`. Prints CPU µs per request (process time, median and best of `--repeat` runs of
`--n` requests), which is everything but the kernel's part (reads, sends, epoll).

Usage: `.venv/bin/python -m bench.http_request [--n 20000] [--repeat 7] [--profile]`.
`--profile` prints a cProfile (CPU time) of `--n` requests instead. Runs against an older tree too
(copy this file into its `bench/`), which is how the before/after figures were taken.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.helpers import rfc822_formatted_time

from proxy.access import AccessResolver, GatewayTarget
from proxy.app import event_loop_factory
from proxy.asset_cache import AssetCache
from proxy.config import ProxyConfig
from proxy.gateway import GatewayProxy
from proxy.http_fast import FastFront
from proxy.listener import ConnectionGuard, listener_limits
from proxy.metrics import CountingMeter, instrument_gateway
from settings import Settings

BODY = b"x" * 1024
SESSION = "bench-session-" + "s" * 22
PLAIN = "assets/bench"


def request_bytes(agent_id: uuid.UUID, tail: str) -> bytes:
    """What `bench.proxy`'s load generator (aiohttp's client) sends."""
    return (f"GET /agents/{agent_id}/gateway/{tail} HTTP/1.1\r\n"
            "Host: 127.0.0.1:8080\r\n"
            f"Cookie: authjs.session-token={SESSION}\r\n"
            "Origin: http://127.0.0.1:8080\r\n"
            "Accept: */*\r\n"
            "Accept-Encoding: gzip, deflate\r\n"
            "User-Agent: Python/3.11 aiohttp/3.14.5\r\n"
            "\r\n").encode()


def response_bytes() -> bytes:
    """What `bench.proxy`'s aiohttp upstream answers."""
    date = rfc822_formatted_time()
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(BODY)}\r\n"
            f"Date: {date}\r\nServer: Python/3.11 aiohttp/3.14.5\r\n\r\n").encode() + BODY


class _Transport:
    """An in-memory transport; `on_write` gets what the protocol writes."""

    def __init__(self, peer: tuple[str, int], on_write: Any) -> None:
        self.peer = peer
        self.on_write = on_write
        self.protocol: Any = None
        self.closed = False

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def writelines(self, data: list[bytes]) -> None:
        self.on_write(b"".join(data))

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Rig:
    """The proxy's gateway path wired to an in-memory browser and gateway."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        settings = Settings(database_url="postgresql+psycopg://bench@127.0.0.1:1/bench",
                            control_plane_api_key="bench-key-" + "k" * 40,
                            proxy_max_connections_per_ip=10**4, proxy_metrics_port=0)
        cfg = ProxyConfig(http_rate_per_s=1e9, http_burst=10**9, ws_frame_rate_per_s=1e9, ws_frame_burst=10**9,
                          ws_connections_per_user=10**6, ws_byte_rate_per_s=1e12, ws_byte_burst=10**12,
                          preauth_rate_per_s=1e9, preauth_burst=10**9, auth_cache_ttl_s=3600.0)
        self.target = GatewayTarget(user_id=uuid.uuid4(), agent_id=uuid.uuid4(), vps_id=uuid.uuid4(),
                                    base_url="http://127.0.0.1:18789", gateway_token="t", relay_key_pem=None,
                                    session_expires=datetime.now(UTC) + timedelta(days=1),
                                    relay_device_token="relay-token")
        access = AccessResolver(None, settings, ttl_s=cfg.auth_cache_ttl_s)  # type: ignore[arg-type]

        async def lookup(token: str, agent_id: uuid.UUID) -> GatewayTarget:  # the database, once
            assert token == SESSION and agent_id == self.target.agent_id
            return self.target

        access._lookup = lookup  # type: ignore[method-assign]
        self.meter = CountingMeter(None, flush_interval_s=3600.0)  # type: ignore[arg-type]  # never flushed
        assets = AssetCache(max_bytes=settings.proxy_asset_cache_bytes, max_entry_bytes=cfg.max_cached_asset_bytes,
                            manifest=None)
        self.gateway = GatewayProxy(config=cfg, access=access, client=None, meter=self.meter,  # type: ignore[arg-type]
                                    relay_origin="http://127.0.0.1", assets=assets)
        instrument_gateway(self.gateway)
        self.front = FastFront(self.gateway.handle, keepalive_timeout=settings.proxy_keepalive_timeout_s)
        browser_limits, _ = listener_limits(settings)
        guard = ConnectionGuard("bench", browser_limits)
        factory = guard.factory(self.front.factory(lambda: (_ for _ in ()).throw(AssertionError("fell back"))))
        self.request = request_bytes(self.target.agent_id, PLAIN)
        self.response = response_bytes()
        self.answers = 0
        self.answered_bytes = 0
        self.upstream_requests = 0
        self._waiter: asyncio.Future[None] | None = None

        # The browser's connection.
        self.browser = _Transport(("127.0.0.1", 40000), self._browser_got)
        self.guarded = factory()
        self.browser.protocol = self.guarded
        self.guarded.connection_made(self.browser)  # type: ignore[arg-type]

        # One kept-alive connection to the gateway, idle in the pool.
        assert self.gateway.upstream is not None
        pool = self.gateway.upstream._pool("http", "127.0.0.1", 18789, True)
        from proxy.upstream_http import _Conn

        conn = _Conn(pool)
        self.upstream = _Transport(("127.0.0.1", 18789), lambda data: self._gateway_got(conn, data))
        conn.connection_made(self.upstream)  # type: ignore[arg-type]
        pool.open += 1
        pool._members.add(conn)
        pool.release(conn)

    def _gateway_got(self, conn: Any, data: bytes) -> None:
        self.upstream_requests += 1
        self.loop.call_soon(conn.data_received, self.response)  # the gateway answers on the next turn

    def _browser_got(self, data: bytes) -> None:
        self.answers += 1
        self.answered_bytes += len(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def one(self) -> None:
        self._waiter = self.loop.create_future()
        self.guarded.data_received(self.request)
        await self._waiter

    async def run(self, n: int) -> float:
        """CPU seconds for `n` requests, one after another on one kept-alive connection."""
        one = self.one
        start = time.process_time()
        for _ in range(n):
            await one()
        return time.process_time() - start


async def main(n: int, repeat: int, profile: bool) -> None:
    rig = Rig()
    await rig.one()
    answer = rig.answered_bytes
    assert answer > len(BODY), "no whole answer"
    await rig.run(200)  # warm: memos and caches
    assert rig.answered_bytes == answer * 201, "answers differ in size"
    assert rig.front.served == rig.answers, "not all on the fast path"
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile(time.process_time)
        prof.enable()
        await rig.run(n)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    runs = [await rig.run(n) / n * 1e6 for _ in range(repeat)]
    print(f"plain GET: CPU µs per request, median {statistics.median(runs):.2f}, best {min(runs):.2f} "
          f"({repeat} runs of {n}: {', '.join(f'{r:.2f}' for r in runs)}); "
          f"upstream requests {rig.upstream_requests}, answers {rig.answers}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="cProfile (CPU time) instead")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main(args.n, args.repeat, args.profile))


if __name__ == "__main__":
    cli()
