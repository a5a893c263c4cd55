"""Gateway proxy overhead: direct to the upstream vs nginx (plain reverse proxy) vs our proxy.

One run on this machine measures, for each of the three paths to the same upstream:

  HTTP      requests/s and p50/p99 latency, `--concurrency` keep-alive clients, `--seconds` each
  WS        frames/s and p50/p99 round trip on one connection (request -> response, one at a time),
            frames/s over `--ws-parallel` connections, and the added p50 latency vs direct
  memory    RSS growth of the proxying process per open WebSocket (`--ws-conns` held open)
  CPU       user + system CPU microseconds of the proxying process per HTTP request and per frame
  asset     requests/s and CPU for a fingerprinted Control UI asset (`immutable`): our proxy
            answers it from its asset cache (after the session and rate checks), nginx proxies it

The upstream is a small aiohttp server in its own process that speaks the gateway's handshake
(challenge, connect, hello-ok) and echoes every request frame as a response, so our proxy does
its full work: session lookup (cached as in production), handshake termination with a real
Ed25519 signature check, per-frame parsing and method filtering, byte metering. nginx 1.22 from
Debian runs with one worker (our proxy is one process, one event loop) as a plain HTTP/WS
reverse proxy. Our proxy's per-user and per-address limits (request and frame rates, byte budget,
connections per address) are raised for the run (one bench user on one address would hit them at
once); everything else is the production configuration. The load generator is Python
(aiohttp) in this process: on a 2-core machine all parties share the CPUs, so compare ratios.

The **python floor** (bench/proxy_floor.py) is one more path, always measured: a minimal relay in
its own process (uvloop, raw asyncio protocols, httptools finding message boundaries, bytes
forwarded verbatim over kept-alive upstream connections, WebSocket bytes piped after the 101),
doing nothing else. It is the upper bound any Python proxy reaches on this machine: the report
prints its ratios against nginx next to ours, and our cost above it. `--no-floor` skips it.

`--processes N` (N > 1) adds another path in the same run: our proxy as N worker processes on
one port (SO_REUSEPORT, `PROXY_PROCESSES=N`) with the per-user rate limits shared through
PostgreSQL, leased in production-sized slices (10 requests, 10 frames, 200 KiB), and reports the
statements that sharing cost per request and per frame (rows upserted in `proxy_rate_buckets`).

Usage: `.venv/bin/python -m bench.proxy [--seconds 4] [--concurrency 32] [--ws-conns 300] [--processes 2]
[--no-floor] [--http-only | --ws-only]`
(needs `nginx` on PATH: `apt-get install -y nginx`). `BENCH_PROFILE=/tmp/p.out` also writes a
cProfile of our (single-process) proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import WSMsgType, web
from cryptography.fernet import Fernet

from openclaw.device import DeviceIdentity

BODY = b"x" * 1024
ASSET = "assets/index-Bench123.js"
"""A fingerprinted Control UI asset (immutable): our proxy answers it from its asset cache."""
ASSET_GZIP = gzip.compress(BODY * 8, mtime=0)
KEY = "bench-key-" + "k" * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int, system_only: bool = False) -> float:
    """User + system CPU seconds of one process so far (stable under load, unlike wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[12]) + (0 if system_only else int(fields[11]))) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(p) for p in text)
    return out


# -- the upstream ("gateway") -------------------------------------------------------------------------


async def upstream_ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=32 * 1024 * 1024)
    await ws.prepare(request)
    await ws.send_str(json.dumps({"type": "event", "event": "connect.challenge",
                                  "payload": {"nonce": str(uuid.uuid4()), "ts": int(time.time() * 1000),
                                              "capabilities": []}}))
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        frame = json.loads(msg.data)
        if frame.get("method") == "connect":
            await ws.send_str(json.dumps({"type": "res", "id": frame["id"], "ok": True, "payload": {
                "type": "hello-ok", "protocol": 4, "auth": {"method": "token", "role": "operator",
                                                            "scopes": ["operator.read"]},
                "features": {"methods": ["chat.send"], "events": []}, "policy": {"maxPayload": 26214400}}}))
        else:
            await ws.send_str(json.dumps({"type": "res", "id": frame.get("id"), "ok": True,
                                          "payload": {"runId": frame.get("id"), "status": "started"}}))
    return ws


async def upstream_http(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await upstream_ws(request)
    if request.path.endswith(ASSET):
        # As the gateway serves its static files: gzip to a client that takes it. (Answered uncompressed,
        # our asset cache looked up the gzip copy it would pick for this client, missed, and the row
        # measured a cache fill per request instead of a hit.)
        immutable = {"Cache-Control": "public, max-age=31536000, immutable", "Vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=ASSET_GZIP, content_type="application/javascript",
                                headers={**immutable, "Content-Encoding": "gzip"})
        return web.Response(body=BODY * 8, content_type="application/javascript", headers=immutable)
    return web.Response(body=BODY, content_type="application/octet-stream")


def run_upstream(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream_http)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- our proxy, as `slopbox proxy` runs it, with the per-user limits raised ---------------------------


def run_ours(port: int, forward_port: int, database_url: str, key: str, processes: int = 1) -> None:
    from proxy.app import serve
    from proxy.config import ProxyConfig
    from settings import Settings
    from telemetry.logs import configure_logging

    try:  # also runs against an older tree (before/after tables): plain asyncio there
        from proxy.app import event_loop_factory
    except ImportError:
        def event_loop_factory() -> None:  # type: ignore[misc]
            return None

    configure_logging("proxy", "WARNING")
    settings = Settings(database_url=database_url, control_plane_api_key=KEY, encryption_keys=[key],
                        proxy_host="127.0.0.1", proxy_port=port, forward_proxy_port=forward_port,
                        proxy_max_connections_per_ip=10**4, proxy_metrics_port=0)
    config = ProxyConfig(http_rate_per_s=1e9, http_burst=10**9, ws_frame_rate_per_s=1e9, ws_frame_burst=10**9,
                         ws_connections_per_user=10**6, ws_byte_rate_per_s=1e12, ws_byte_burst=10**12,
                         preauth_rate_per_s=1e9, preauth_burst=10**9)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        scale = {"shared_limits": True, "reuse_port": True} if processes > 1 else {}
        async with serve(settings, config=config, host="127.0.0.1", port=port, forward_port=forward_port,
                         **scale) as running:
            if processes > 1:  # production-sized leases, so the sharing costs what it would for real
                from proxy.metrics import CountingRateLimiter
                from proxy.shared_limits import BucketStore, SharedRateLimiter

                gw = running.gateway
                store = BucketStore.for_engine(running.engine)
                gw.http_limiter = CountingRateLimiter(SharedRateLimiter(store, "http", 1e9, 10**9, lease=10),
                                                      "gateway_http_rate")
                gw.frame_limiter = CountingRateLimiter(
                    SharedRateLimiter(store, "ws_frame", 1e9, 10**9, lease=10), "gateway_ws_frame_rate")
                gw.byte_limiter = SharedRateLimiter(store, "ws_byte", 1e12, 10**12, lease=200 * 1024)
            try:  # as `slopbox proxy` does once it serves (absent from older trees)
                from proxy.app import freeze_startup_heap
            except ImportError:
                pass
            else:
                freeze_startup_heap()
            await stop.wait()

    def worker(_settings: Settings, _index: int) -> None:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(main())

    if processes > 1:
        from proxy.supervisor import supervise

        supervise(settings, worker, processes=processes)
    elif os.environ.get("BENCH_PROFILE"):
        import cProfile

        prof = cProfile.Profile(time.process_time)  # CPU time: preemption on a shared machine is not ours
        prof.runctx("worker(settings, 0)", globals(), locals())
        prof.dump_stats(os.environ["BENCH_PROFILE"])
    else:
        worker(settings, 0)


NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    upstream gw {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gw;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""


# -- load generation ----------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


async def http_load(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    total = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker(deadline: float, record: bool) -> None:
            nonlocal errors, total
            while time.perf_counter() < deadline:
                total += 1
                t0 = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                if record:
                    latencies.append(time.perf_counter() - t0)

        warm = time.perf_counter() + 1.0
        await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, "p50_ms": pct(latencies, 0.5) * 1000,
            "p99_ms": pct(latencies, 0.99) * 1000, "errors": errors, "requests": total}


class WsClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.session, self.url, self.headers = session, url, headers
        self.device = DeviceIdentity.generate()

    async def open(self) -> aiohttp.ClientWebSocketResponse:
        ws = await self.session.ws_connect(self.url, headers=self.headers, max_msg_size=32 * 1024 * 1024)
        challenge = json.loads((await ws.receive()).data)["payload"]
        scopes = ["operator.read", "operator.write"]
        device = self.device.connect_proof(nonce=challenge["nonce"], signed_at_ms=challenge["ts"],
                                           client_id="openclaw-control-ui", client_mode="webchat", role="operator",
                                           scopes=scopes, token="", platform="bench")
        await ws.send_str(json.dumps({"type": "req", "id": "c", "method": "connect", "params": {
            "minProtocol": 4, "maxProtocol": 4, "role": "operator", "scopes": scopes,
            "client": {"id": "openclaw-control-ui", "version": "bench", "platform": "bench", "mode": "webchat"},
            "device": device}}))
        hello = json.loads((await ws.receive()).data)
        assert hello.get("ok") is True, hello
        return ws


async def ping_pong(ws: aiohttp.ClientWebSocketResponse, deadline: float, rtts: list[float]) -> None:
    i = 0
    frame = {"type": "req", "id": "", "method": "chat.send",
             "params": {"sessionKey": "agent:main:main", "message": "y" * 200, "idempotencyKey": ""}}
    while time.perf_counter() < deadline:
        i += 1
        frame["id"] = frame["params"]["idempotencyKey"] = str(i)  # type: ignore[index]
        t0 = time.perf_counter()
        await ws.send_str(json.dumps(frame))
        await ws.receive()
        rtts.append(time.perf_counter() - t0)


async def ws_load(url: str, headers: dict[str, str], seconds: float, parallel: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        client = WsClient(session, url, headers)
        ws = await client.open()
        warm: list[float] = []
        await ping_pong(ws, time.perf_counter() + 0.5, warm)
        single: list[float] = []
        start = time.perf_counter()
        await ping_pong(ws, start + seconds, single)
        single_elapsed = time.perf_counter() - start
        await ws.close()
        sockets = [await client.open() for _ in range(parallel)]
        many: list[list[float]] = [[] for _ in sockets]
        start = time.perf_counter()
        await asyncio.gather(*(ping_pong(s, start + seconds, r) for s, r in zip(sockets, many, strict=True)))
        many_elapsed = time.perf_counter() - start
        for s in sockets:
            await s.close()
    return {"frames_per_s_1conn": len(single) / single_elapsed, "rtt_p50_ms": pct(single, 0.5) * 1000,
            "rtt_p99_ms": pct(single, 0.99) * 1000,
            f"frames_per_s_{parallel}conn": sum(len(r) for r in many) / many_elapsed,
            "frames": len(warm) + len(single) + sum(len(r) for r in many)}


async def ws_memory(url: str, headers: dict[str, str], pids: list[int], count: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        client = WsClient(session, url, headers)
        warm = [await client.open() for _ in range(10)]  # first-use allocations are not per connection
        await asyncio.sleep(0.5)
        before = sum(rss_kib(p) for p in pids)
        opened = []
        for _ in range(count // 50):
            opened += await asyncio.gather(*(client.open() for _ in range(50)))
        await asyncio.sleep(1.0)
        after = sum(rss_kib(p) for p in pids)
        for ws in opened + warm:
            await ws.close()
    return (after - before) / len(opened)


# -- orchestration --------------------------------------------------------------------------------


def seed(url: str, key: str, upstream_port: int) -> tuple[str, str]:
    from db.encryption import configure_keys

    ring = configure_keys([key])
    with psycopg.connect(url, autocommit=True) as sql:
        user = sql.execute("INSERT INTO users (email, plan_id) VALUES ('bench@example.com', "
                           "(SELECT id FROM plans WHERE name = 'pro')) RETURNING id").fetchone()[0]  # type: ignore[index]
        token = str(uuid.uuid4())
        sql.execute('INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (%s, %s, %s)',
                    (user, datetime.now(UTC) + timedelta(days=1), token))
        config_id = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
        vps = sql.execute(
            "INSERT INTO vpses (user_id, vps_config_id, provider, provider_ref, state, host, gateway_port, "
            "relay_device_key) VALUES (%s, %s, 'local', 'bench', 'running', '127.0.0.1', %s, %s) RETURNING id",
            (user, config_id, upstream_port, ring.encrypt(DeviceIdentity.generate().private_pem().decode())),
        ).fetchone()[0]  # type: ignore[index]
        gw_token = secrets.token_urlsafe(32)
        agent = sql.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) "
                            "VALUES (%s, 'bench', %s, %s, %s) RETURNING id",
                            (user, ring.encrypt(gw_token), gw_token[-4:], vps)).fetchone()[0]  # type: ignore[index]
    return str(agent), token


def shared_statements(database_url: str) -> int:
    """Rows upserted in proxy_rate_buckets so far (one per lease statement), after the stats flush."""
    time.sleep(1.5)  # backends report table statistics about once a second
    with psycopg.connect(database_url, autocommit=True) as sql:
        row = sql.execute("SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables "
                          "WHERE relname = 'proxy_rate_buckets'").fetchone()
    return int(row[0]) if row else 0


async def run_loads(targets: dict[str, tuple[str, str, dict[str, str], list[int]]],
                    args: argparse.Namespace, database_url: str) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, (http_url, ws_url, headers, pids) in targets.items():
        print(f"-- {name}", flush=True)
        res: dict[str, Any] = {}
        counted = name.startswith("slopbox x")
        procs = [p for p in pids if p > 0] + [c for p in pids if p < 0 for c in children(-p)]
        before = shared_statements(database_url) if counted else 0
        if args.ws_only:
            nan = float("nan")
            res.update({"http_rps": nan, "http_p50_ms": nan, "http_p99_ms": nan, "http_errors": 0,
                        "http_requests": 0, "http_cpu_us": nan, "http_sys_us": nan, "asset_rps": nan,
                        "asset_cpu_us": nan})
        else:
            cpu0 = sum(cpu_s(p) for p in procs)
            sys0 = sum(cpu_s(p, system_only=True) for p in procs)
            res.update({f"http_{k}": v for k, v in
                        (await http_load(http_url, headers, args.seconds, args.concurrency)).items()})
            cpu1 = sum(cpu_s(p) for p in procs)
            res["http_cpu_us"] = (cpu1 - cpu0) * 1e6 / max(1, res["http_requests"])
            sys1 = sum(cpu_s(p, system_only=True) for p in procs)
            res["http_sys_us"] = (sys1 - sys0) * 1e6 / max(1, res["http_requests"])
            asset = await http_load(http_url.replace("assets/bench", ASSET), headers, args.seconds / 2,
                                    args.concurrency)
            res["asset_rps"] = asset["rps"]
            res["asset_cpu_us"] = (sum(cpu_s(p) for p in procs) - cpu1) * 1e6 / max(1, asset["requests"])
            res["http_requests"] += asset["requests"]  # the statements below count both loads
        after_http = shared_statements(database_url) if counted else 0
        if args.http_only:
            nan = float("nan")
            res.update({"frames_per_s_1conn": nan, "rtt_p50_ms": nan, "rtt_p99_ms": nan, "ws_cpu_us": nan,
                        "ws_sys_us": nan, "ws_open_cpu_ms": nan,
                        f"frames_per_s_{args.ws_parallel}conn": nan, "ws_kib_per_conn": nan})
            results[name] = res
            print("   " + ", ".join(f"{k}={v:.1f}" for k, v in res.items()), flush=True)
            continue
        cpu1 = sum(cpu_s(p) for p in procs)
        sys1 = sum(cpu_s(p, system_only=True) for p in procs)
        res.update(await ws_load(ws_url, headers, args.seconds, args.ws_parallel))
        res["ws_cpu_us"] = (sum(cpu_s(p) for p in procs) - cpu1) * 1e6 / max(1, res["frames"])
        res["ws_sys_us"] = (sum(cpu_s(p, system_only=True) for p in procs) - sys1) * 1e6 / max(1, res["frames"])
        if counted:
            res["stmts_per_request"] = (after_http - before) / max(1, res["http_requests"])
            res["stmts_per_frame"] = (shared_statements(database_url) - after_http) / max(1, res["frames"])
        cpu2 = sum(cpu_s(p) for p in procs)
        res["ws_kib_per_conn"] = await ws_memory(ws_url, headers, procs, args.ws_conns)
        res["ws_open_cpu_ms"] = (sum(cpu_s(p) for p in procs) - cpu2) * 1e3 / (args.ws_conns // 50 * 50 + 10)
        results[name] = res
        print("   " + ", ".join(f"{k}={v:.1f}" for k, v in res.items()), flush=True)
    return results


def measure(args: argparse.Namespace) -> None:
    """Start PostgreSQL, the upstream, our proxy and nginx; load each path; stop everything we started."""
    from db.migrate import migrate_and_seed
    from devstack import postgres
    from devstack.postgres import EmbeddedPostgres

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        sys.exit("nginx not found: apt-get install -y nginx")
    tmp = Path(tempfile.mkdtemp(prefix="slopbox-proxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    pg = EmbeddedPostgres(tmp / "pg", free_port())
    pg_proc = pg.spawn()
    try:
        pg.wait_ready(pg_proc)
        pg.ensure_database()
        url = pg.url()
        migrate_and_seed(url.replace("postgresql://", "postgresql+psycopg://"))
        key = Fernet.generate_key().decode()
        up_port, ours_port, nginx_port = free_port(), free_port(), free_port()
        agent, session = seed(url, key, up_port)
        me = [sys.executable, "-m", "bench.proxy"]
        upstream = subprocess.Popen([*me, "upstream", "--port", str(up_port)])
        procs.append(upstream)
        floor_port = free_port()
        if not args.no_floor:
            procs.append(floor := subprocess.Popen([*me, "floor", "--port", str(floor_port),
                                                    "--upstream-port", str(up_port)]))
        ours = subprocess.Popen([*me, "ours", "--port", str(ours_port), "--forward-port", str(free_port()),
                                 "--database-url", url], env={**os.environ, "BENCH_KEY": key})
        procs.append(ours)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, upstream=up_port, port=nginx_port))
        ngx = subprocess.Popen([nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c",
                                str(tmp / "nginx.conf"), "-g", "daemon off;"])
        procs.append(ngx)
        many_port = free_port()
        if args.processes > 1:
            many = subprocess.Popen([*me, "ours", "--port", str(many_port), "--forward-port", str(free_port()),
                                     "--database-url", url, "--processes", str(args.processes)],
                                    env={**os.environ, "BENCH_KEY": key})
            procs.append(many)
        ports = (up_port, ours_port, nginx_port) + ((many_port,) if args.processes > 1 else ())
        for port in ports + (() if args.no_floor else (floor_port,)):
            wait_port(port)
        if args.processes > 1:
            deadline = time.monotonic() + 30
            while len(children(many.pid)) < args.processes and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)  # every worker listening
        origin = f"http://127.0.0.1:{ours_port}"
        targets = {
            "direct": (f"http://127.0.0.1:{up_port}/openclaw/assets/bench", f"ws://127.0.0.1:{up_port}/openclaw", {},
                       [upstream.pid]),
            "nginx": (f"http://127.0.0.1:{nginx_port}/openclaw/assets/bench",
                      f"ws://127.0.0.1:{nginx_port}/openclaw", {}, children(ngx.pid)),
            "slopbox": (f"{origin}/agents/{agent}/gateway/assets/bench", f"ws://127.0.0.1:{ours_port}/agents/{agent}/gateway",
                        {"Cookie": f"authjs.session-token={session}", "Origin": origin}, [ours.pid]),
        }
        if not args.no_floor:
            targets["python floor"] = (f"http://127.0.0.1:{floor_port}/openclaw/assets/bench",
                                       f"ws://127.0.0.1:{floor_port}/openclaw", {}, [floor.pid])
        if args.processes > 1:  # pids < 0: the supervisor's children (its workers) are measured too
            many_origin = f"http://127.0.0.1:{many_port}"
            targets[f"slopbox x{args.processes}"] = (
                f"{many_origin}/agents/{agent}/gateway/assets/bench",
                f"ws://127.0.0.1:{many_port}/agents/{agent}/gateway",
                {"Cookie": f"authjs.session-token={session}", "Origin": many_origin}, [many.pid, -many.pid])
        report(asyncio.run(run_loads(targets, args, url)), args)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        postgres.stop(pg_proc)
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    d, n = results["direct"], results["nginx"]
    ours = [name for name in results if name not in ("direct", "nginx")]
    par = f"frames_per_s_{args.ws_parallel}conn"
    rows = [
        ("HTTP req/s", "http_rps", "{:.0f}"), ("HTTP p50 ms", "http_p50_ms", "{:.2f}"),
        ("HTTP p99 ms", "http_p99_ms", "{:.2f}"), ("WS frames/s (1 conn)", "frames_per_s_1conn", "{:.0f}"),
        (f"WS frames/s ({args.ws_parallel} conns)", par, "{:.0f}"), ("WS RTT p50 ms", "rtt_p50_ms", "{:.3f}"),
        ("WS RTT p99 ms", "rtt_p99_ms", "{:.3f}"), ("KiB per open WS", "ws_kib_per_conn", "{:.1f}"),
        ("CPU us per HTTP request", "http_cpu_us", "{:.0f}"), ("  of which system (kernel)", "http_sys_us", "{:.0f}"),
        ("CPU us per WS frame", "ws_cpu_us", "{:.1f}"), ("  of which system (kernel) ", "ws_sys_us", "{:.1f}"),
        ("CPU ms per WS open + close", "ws_open_cpu_ms", "{:.2f}"),
        ("asset req/s (immutable)", "asset_rps", "{:.0f}"), ("CPU us per asset request", "asset_cpu_us", "{:.0f}"),
    ]
    head = f"\n{'':26}{'direct':>10}{'nginx':>10}" + "".join(f"{name:>14}" for name in ours)
    head += "".join(f"{name + '/direct':>22}{name + '/nginx':>21}" for name in ours)
    print(head)
    for label, key, fmt in rows:
        line = f"{label:26}{fmt.format(d[key]):>10}{fmt.format(n[key]):>10}"
        line += "".join(f"{fmt.format(results[name][key]):>14}" for name in ours)
        for name in ours:
            s = results[name]
            ratio_d = s[key] / d[key] if d[key] else float("nan")
            ratio_n = s[key] / n[key] if n[key] else float("nan")
            line += f"{ratio_d:>21.2f}x{ratio_n:>20.2f}x"
        print(line)
    for name in ["nginx", *ours]:
        res = results[name]
        print(f"added WS latency p50 ({name} - direct): {res['rtt_p50_ms'] - d['rtt_p50_ms']:.3f} ms")
    for name in ours:
        if "stmts_per_request" in results[name]:
            print(f"{name}: shared rate limits cost {results[name]['stmts_per_request']:.3f} PostgreSQL statements "
                  f"per HTTP request, {results[name]['stmts_per_frame']:.3f} per WebSocket frame")
    if "python floor" in results and args.ws_only:
        f, s = results["python floor"], results["slopbox"]
        print(f"slopbox above the python floor: CPU per WS frame +{s['ws_cpu_us'] - f['ws_cpu_us']:.1f} us "
              f"(floor {f['ws_cpu_us']:.1f}, nginx {n['ws_cpu_us']:.1f})")
    elif "python floor" in results and not args.http_only:
        f, s = results["python floor"], results["slopbox"]
        print(f"slopbox above the python floor: HTTP req/s {s['http_rps'] / f['http_rps']:.2f}x of the floor's, "
              f"CPU per HTTP request +{s['http_cpu_us'] - f['http_cpu_us']:.0f} us "
              f"(floor {f['http_cpu_us']:.0f}, nginx {n['http_cpu_us']:.0f}), CPU per WS frame "
              f"+{s['ws_cpu_us'] - f['ws_cpu_us']:.0f} us (floor {f['ws_cpu_us']:.0f}, nginx {n['ws_cpu_us']:.0f})")
    errors = {k: v["http_errors"] for k, v in results.items() if v["http_errors"]}
    if errors:
        print(f"HTTP errors: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    ours = sub.add_parser("ours")
    ours.add_argument("--port", type=int, required=True)
    ours.add_argument("--forward-port", type=int, required=True)
    ours.add_argument("--database-url", required=True)
    ours.add_argument("--processes", type=int, default=1)
    floor = sub.add_parser("floor")
    floor.add_argument("--port", type=int, required=True)
    floor.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ws-parallel", type=int, default=16)
    parser.add_argument("--ws-conns", type=int, default=300)
    parser.add_argument("--processes", type=int, default=1,
                        help="also measure our proxy as N worker processes with shared rate limits")
    parser.add_argument("--no-floor", action="store_true", help="skip the python floor path")
    parser.add_argument("--http-only", action="store_true", help="skip the WebSocket loads (quicker repeats)")
    parser.add_argument("--ws-only", action="store_true", help="skip the HTTP and asset loads (quicker repeats)")
    args = parser.parse_args()
    if args.cmd == "floor":
        from bench.proxy_floor import run_floor

        run_floor(args.port, args.upstream_port)
    elif args.cmd == "upstream":
        run_upstream(args.port)
    elif args.cmd == "ours":
        run_ours(args.port, args.forward_port, args.database_url, os.environ["BENCH_KEY"], args.processes)
    else:
        measure(args)


if __name__ == "__main__":
    main()
