"""The proxy scaled out: per-user rate limits shared through PostgreSQL, N supervised processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from aiohttp import web

from db.engine import make_engine
from proxy.config import ProxyConfig
from proxy.limits import RateLimiter
from proxy.shared_limits import SharedRateLimiter
from settings import Settings
from tests.conftest import API_KEY, free_port
from tests.proxy_harness import seed_gateway_user

pytestmark = pytest.mark.asyncio(loop_scope="session")

SLOPBOX = Path(sys.executable).parent / "slopbox"


async def test_shared_bucket_holds_across_processes(settings: Settings, db: str) -> None:
    """Two limiters on two engines (two processes' views): together they allow the burst once, not twice."""
    engines = [make_engine(settings), make_engine(settings)]
    try:
        shared = [SharedRateLimiter(e, "test", rate=0.001, burst=20) for e in engines]
        local = [RateLimiter(0.001, 20), RateLimiter(0.001, 20)]
        user = uuid.uuid4()
        allowed_shared = [await shared[i % 2].take(user) == 0.0 for i in range(40)]
        allowed_local = [local[i % 2].acquire(user) == 0.0 for i in range(40)]
        assert sum(allowed_local) == 40  # what each process alone used to allow: twice the limit
        assert sum(allowed_shared) == 20
        assert allowed_shared[:20] == [True] * 20
        # Another user has a bucket of their own.
        assert await shared[1].take(uuid.uuid4()) == 0.0
        # Over the limit: the answer is remembered until the bucket could allow it, no statement each time.
        before = shared[0].statements
        waits = [await shared[0].take(user) for _ in range(50)]
        assert all(w > 0 for w in waits)
        assert shared[0].statements == before
    finally:
        for limiter in shared:
            await limiter.store.close()
        for e in engines:
            await e.dispose()


async def test_leases_spend_from_memory(settings: Settings, db: str) -> None:
    """A steady user costs one statement per leased slice, not one per request."""
    engine = make_engine(settings)
    try:
        limiter = SharedRateLimiter(engine, "lease", rate=50.0, burst=300)  # the HTTP defaults: slices of 10
        user = uuid.uuid4()
        assert all([await limiter.take(user) == 0.0 for _ in range(100)])
        assert limiter.statements == 10
        await limiter.store.close()
    finally:
        await engine.dispose()


async def test_database_down_refuses_with_a_short_retry(settings: Settings) -> None:
    broken = settings.model_copy(update={"database_url": f"postgresql://nobody@127.0.0.1:{free_port()}/none"})
    engine = make_engine(broken)
    try:
        limiter = SharedRateLimiter(engine, "down", rate=50.0, burst=300)
        assert await limiter.take(uuid.uuid4()) > 0
    finally:
        await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def upstream() -> AsyncIterator[int]:
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100, content_type="application/javascript")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def _two_free_ports() -> int:
    """p with p and p + 1 free: worker i serves /metrics on PROXY_METRICS_PORT + i."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two adjacent free ports")


def _gone(pid: int) -> bool:
    """Dead: reaped, or a zombie (its sockets are closed either way)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.update(int(p) for p in (task / "children").read_text().split())
    return out


async def _metric(http: aiohttp.ClientSession, port: int, name: str, label: str) -> float:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_two_processes_share_the_limit_and_a_dead_worker_is_replaced(
        settings: Settings, sql: psycopg.Connection, encryption_key: str, database_url: str, upstream: int) -> None:
    cfg = ProxyConfig()
    seeded = seed_gateway_user(sql, settings, port=upstream)
    port, forward_port, metrics_port = free_port(), free_port(), _two_free_ports()
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    env.update(DATABASE_URL=database_url, SLOPBOX_ENCRYPTION_KEYS=encryption_key, CONTROL_PLANE_API_KEY=API_KEY,
               PROXY_HOST="127.0.0.1", PROXY_PORT=str(port), FORWARD_PROXY_PORT=str(forward_port), LOG_LEVEL="INFO",
               PROXY_PROCESSES="2", PROXY_METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1")
    proc = await asyncio.create_subprocess_exec(str(SLOPBOX), "proxy", env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    stderr: list[bytes] = []

    async def drain() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            stderr.append(line)

    drainer = asyncio.create_task(drain())
    url = f"http://127.0.0.1:{port}/agents/{seeded.agent_id}/gateway/assets/index-AbCdEf12.js"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"http://127.0.0.1:{metrics_port + 1}/metrics") as resp:
                        async with http.get(f"http://127.0.0.1:{port}/healthz") as health:
                            if resp.status == 200 and health.status == 200:
                                break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("proxy workers did not come up:\n" + b"".join(stderr).decode()[-3000:])
            assert len(_children(proc.pid)) == 2

            # A new connection per request: the kernel spreads them over both workers.
            ok = refused = 0
            fresh = aiohttp.TCPConnector(force_close=True)
            started = time.monotonic()
            async with aiohttp.ClientSession(connector=fresh, headers=seeded.cookie) as browser:
                async def one() -> int:
                    async with browser.get(url) as resp:
                        await resp.read()
                        return resp.status

                while refused < 20 and ok + refused < 3000:
                    statuses = await asyncio.gather(*(one() for _ in range(16)))
                    ok += sum(s == 200 for s in statuses)
                    refused += sum(s == 429 for s in statuses)
                    assert set(statuses) <= {200, 429}, statuses
            elapsed = time.monotonic() - started
            # At most one burst plus the refill over the whole run, plus one leased slice per worker;
            # per-process buckets would have allowed about twice this.
            assert refused >= 20
            assert ok <= cfg.http_burst + cfg.http_rate_per_s * elapsed + 2 * 10, (ok, elapsed)
            label = 'limit="gateway_http_rate"'
            per_worker = [await _metric(http, metrics_port + i, "slopbox_proxy_limit_refusals_total", label)
                          for i in (0, 1)]
            assert all(n > 0 for n in per_worker), per_worker  # both workers served and both refused

            # A worker killed outright is replaced; the port keeps answering meanwhile.
            before = _children(proc.pid)
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            # Connections the victim held or had queued die with it (reset): that is what losing a
            # process means. New connections, once it is gone, all land on a live worker.
            for _ in range(100):
                if _gone(victim):
                    break
                await asyncio.sleep(0.1)
            for _ in range(200):
                now = _children(proc.pid)
                if len(now) == 2 and victim not in now:
                    break
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh_http, \
                        fresh_http.get(f"http://127.0.0.1:{port}/healthz") as health:
                    assert health.status == 200
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"worker {victim} was not replaced: {_children(proc.pid)}")
            for _ in range(300):
                try:
                    async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the replacement worker did not come up")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 40)
        await drainer
        logs = b"".join(stderr).decode()
        assert proc.returncode == 0, logs[-3000:]
        assert "proxy worker exited; replacing it" in logs
        assert logs.count("proxy stopped; usage flushed") == 2  # both workers flushed on SIGTERM
        assert seeded.session not in logs and seeded.gateway_token not in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        drainer.cancel()
