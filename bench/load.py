"""Load test: N simulated users each create an agent, open the Control UI through the proxy and chat.

The stack runs as production runs it, one process per tier: an embedded PostgreSQL and a Temporal
dev server (bench/stack.py), then `slopbox api`, `slopbox worker` and `slopbox proxy`, so each
process's CPU is its own. Local VMs run the gateway simulator (`--real-gateway` runs the real
OpenClaw gateway from OPENCLAW_BIN: about 300 MB of RAM per agent). Each simulated user connects
from its own loopback address (127.0.0.x), so per-address limits apply per user as on the internet:

  1. agent       POST /agents
  2. running     POST /agents/{id}/vps, then GET /agents/{id} every 0.5 s until `running`
  3. ui page     GET /agents/{id}/gateway/ through the proxy with the user's Auth.js session cookie
  4. ws open     the Control UI's WebSocket through the proxy: challenge, connect (device proof), hello-ok
  5. chat        --messages `chat.send` one after another, each timed until the agent's final reply
  6. destroyed   DELETE /agents/{id}/vps, then poll until `destroyed`

It prints, per phase, how many ran, failed, and p50/p99 seconds; the API requests and workflow
operations it caused; and CPU seconds per process (API, worker, proxy, Temporal, PostgreSQL, the
gateways, and this load generator), in total and per user.

    .venv/bin/python -m bench.load --users 20 --messages 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from cryptography.fernet import Fernet

from bench.procs import cmdline, cpu_seconds, descendants, processes_in
from bench.stack import free_port, standalone_stack
from openclaw.device import DeviceIdentity

PHASES = ("agent", "running", "ui page", "ws open", "chat", "destroyed")
KEY = "load-key-" + "k" * 40
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class UserRun:
    index: int
    user_id: str
    session: str
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    errors: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    @property
    def address(self) -> str:
        return f"127.0.{1 + self.index // 250}.{2 + self.index % 250}"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def seed_users(url: str, count: int) -> list[UserRun]:
    """A plan that fits everyone, N verified users on it, and an Auth.js session each."""
    with psycopg.connect(url, autocommit=True) as sql:
        sql.execute("INSERT INTO plans (name, display_name, max_agents, max_vpses, max_bandwidth_bytes, "
                    "max_storage_bytes, max_cpu_ms, max_memory_mb_seconds, overage_bandwidth_cost_per_gb_cents, "
                    "overage_storage_cost_per_gb_cents, overage_cpu_cost_per_hour_cents, "
                    "overage_memory_cost_per_gb_hour_cents) "
                    "VALUES ('load', 'Load', 10, 10, 10^15, 10^15, 10^15, 10^15, 0, 0, 0, 0)")
        sql.execute("INSERT INTO plan_vps_configs SELECT p.id, c.id FROM plans p, vps_configs c "
                    "WHERE p.name = 'load' AND c.name = 'local-small'")
        runs = []
        for i in range(count):
            user = sql.execute('INSERT INTO users (email, "emailVerified", plan_id) VALUES (%s, now(), '
                               "(SELECT id FROM plans WHERE name = 'load')) RETURNING id",
                               (f"load-{i}@example.com",)).fetchone()[0]  # type: ignore[index]
            token = str(uuid.uuid4())
            sql.execute('INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (%s, %s, %s)',
                        (user, datetime.now(UTC) + timedelta(days=1), token))
            runs.append(UserRun(i, str(user), token))
        return runs


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, run: UserRun) -> None:
        self.session, self.base, self.run = session, base, run
        self.headers = {"Authorization": f"Bearer {KEY}", "X-User-Id": run.user_id}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        self.run.requests += 1
        async with self.session.request(method, self.base + path, json=body, headers=self.headers) as resp:
            return resp.status, (await resp.json() if resp.content_length != 0 else None)

    async def wait_state(self, agent: str, *states: str, within_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        vps: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, body = await self.call("GET", f"/agents/{agent}")
            vps = (body or {}).get("vps") or {} if status == 200 else {}
            if vps.get("state") in states and not vps.get("operation_id"):
                return vps
            await asyncio.sleep(0.5)
        return vps


async def timed(run: UserRun, phase: str, coro: Any) -> Any:
    t0 = time.perf_counter()
    try:
        result = await coro
    except Exception as exc:  # a failed phase is counted and reported, not raised: the run goes on
        run.errors[f"{phase}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
        return None
    run.times[phase].append(time.perf_counter() - t0)
    return result


def browser_headers(proxy: str, run: UserRun) -> dict[str, str]:
    return {"Cookie": f"authjs.session-token={run.session}", "Origin": proxy}


async def load_page(session: aiohttp.ClientSession, proxy: str, agent: str, run: UserRun) -> bool:
    async with session.get(f"{proxy}/agents/{agent}/gateway/", headers=browser_headers(proxy, run)) as page:
        if page.status != 200:
            raise RuntimeError(f"Control UI page answered {page.status}")
        await page.read()
    return True


async def open_socket(session: aiohttp.ClientSession, proxy: str, agent: str,
                      run: UserRun) -> aiohttp.ClientWebSocketResponse:
    cookie = browser_headers(proxy, run)
    ws = await session.ws_connect(f"{proxy.replace('http', 'ws', 1)}/agents/{agent}/gateway/", headers=cookie)
    challenge = json.loads((await ws.receive(timeout=30)).data)["payload"]
    scopes = ["operator.read", "operator.write"]
    device = DeviceIdentity.generate().connect_proof(
        nonce=challenge["nonce"], signed_at_ms=challenge["ts"], client_id="openclaw-control-ui",
        client_mode="webchat", role="operator", scopes=scopes, token="", platform="load")
    await ws.send_str(json.dumps({"type": "req", "id": "c", "method": "connect", "params": {
        "minProtocol": 4, "maxProtocol": 4, "role": "operator", "scopes": scopes,
        "client": {"id": "openclaw-control-ui", "version": "load", "platform": "load", "mode": "webchat"},
        "device": device}}))
    while True:
        frame = json.loads((await ws.receive(timeout=30)).data)
        if frame.get("type") == "res" and frame.get("id") == "c":
            if not frame.get("ok"):
                raise RuntimeError(f"connect refused: {frame.get('error')}")
            return ws


async def chat_once(ws: aiohttp.ClientWebSocketResponse, n: int) -> bool:
    """One message, until the agent's final reply event for its run (what a person waits for)."""
    run_id = f"load-{n}-{uuid.uuid4().hex[:8]}"
    await ws.send_str(json.dumps({"type": "req", "id": run_id, "method": "chat.send", "params": {
        "sessionKey": "agent:main:main", "message": f"hello {n}", "idempotencyKey": run_id}}))
    while True:
        msg = await ws.receive(timeout=60)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"socket ended: {msg.type.name} {msg.data}")
        frame = json.loads(msg.data)
        if frame.get("type") == "res" and frame.get("id") == run_id and not frame.get("ok"):
            raise RuntimeError(f"chat.send refused: {frame.get('error')}")
        payload = frame.get("payload") or {}
        if frame.get("event") == "chat" and payload.get("runId") == run_id and payload.get("state") == "final":
            return True


async def one_user(run: UserRun, api_base: str, proxy: str, config_id: str, messages: int,
                   within_s: float) -> None:
    connector = aiohttp.TCPConnector(local_addr=(run.address, 0), limit=4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        api = Api(session, api_base, run)

        async def create() -> str:
            status, body = await api.call("POST", "/agents", {"name": f"load-{run.index}"})
            if status != 201:
                raise RuntimeError(f"POST /agents answered {status}: {body}")
            return str(body["id"])

        agent = await timed(run, "agent", create())
        if agent is None:
            return

        async def provision() -> bool:
            status, body = await api.call("POST", f"/agents/{agent}/vps", {"vps_config_id": config_id})
            if status != 202:
                raise RuntimeError(f"POST vps answered {status}: {body}")
            vps = await api.wait_state(agent, "running", "error", within_s=within_s)
            if vps.get("state") != "running":
                raise RuntimeError(f"VPS ended {vps.get('state')}: {vps.get('last_error')}")
            return True

        ws = None
        if await timed(run, "running", provision()):
            if await timed(run, "ui page", load_page(session, proxy, agent, run)):
                ws = await timed(run, "ws open", open_socket(session, proxy, agent, run))
        if ws is not None:
            for n in range(messages):
                if await timed(run, "chat", chat_once(ws, n)) is None:
                    break
            await ws.close()

        async def destroy() -> None:
            status, body = await api.call("DELETE", f"/agents/{agent}/vps")
            if status not in (202, 404):
                raise RuntimeError(f"DELETE vps answered {status}: {body}")
            vps = await api.wait_state(agent, "destroyed", within_s=within_s)
            if vps.get("state") != "destroyed":
                raise RuntimeError(f"VPS ended {vps.get('state')}: {vps.get('last_error')}")

        await timed(run, "destroyed", destroy())


def start(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", name], cwd=ROOT, env=env,
                            stdout=(logs / f"{name}.log").open("ab"), stderr=subprocess.STDOUT)


def tree_cpu(pid: int) -> float:
    """A process, its reaped children and its live descendants (PostgreSQL forks a backend per connection)."""
    return cpu_seconds(pid, children=True) + sum(cpu_seconds(d) for d in descendants(pid))


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu(pid) for name, pid in pids.items()}


async def measure(args: argparse.Namespace) -> None:
    async with standalone_stack("slopbox-load-", remove=not args.keep) as stack:
        data = stack.tmp / "data"
        logs = stack.tmp / "load-logs"
        logs.mkdir(exist_ok=True)
        api_port, proxy_port = free_port(), free_port()
        env = {
            "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
            "DATABASE_URL": stack.database_url, "TEMPORAL_ADDRESS": stack.temporal_address,
            "CONTROL_PLANE_API_KEY": KEY, "SLOPBOX_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "SLOPBOX_DATA_DIR": str(data), "SLOPBOX_LOCAL_PROVIDER": "true", "LOG_LEVEL": "WARNING",
            "API_PORT": str(api_port), "PROXY_PORT": str(proxy_port), "FORWARD_PROXY_PORT": str(free_port()),
            "CONTROL_PLANE_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
            "WORKER_METRICS_PORT": "0", "WORKER_TEMPORAL_METRICS_PORT": "0", "PROXY_METRICS_PORT": "0",
            "METERING_INTERVAL_S": "0", "RECONCILE_INTERVAL_S": "0",
        }
        if args.real_gateway:
            if not os.environ.get("OPENCLAW_BIN"):
                sys.exit("--real-gateway needs OPENCLAW_BIN (scripts/install-openclaw.sh prints it)")
            env["OPENCLAW_BIN"] = os.environ["OPENCLAW_BIN"]
        procs = {name: start(name, env, logs) for name in ("api", "worker", "proxy")}
        try:
            wait_port(api_port)
            wait_port(proxy_port)
            runs = seed_users(stack.database_url, args.users)
            with psycopg.connect(stack.database_url) as sql:
                config_id = str(sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'")
                                .fetchone()[0])  # type: ignore[index]
            own = os.getpid()
            others = [p for p in descendants(own) if p not in {x.pid for x in procs.values()}]
            temporal = next(p for p in others if "temporal" in cmdline(p) and "server" in cmdline(p))
            pids = {"api": procs["api"].pid, "worker": procs["worker"].pid, "proxy": procs["proxy"].pid,
                    "temporal": temporal, "postgres": stack.postgres_pid}
            before = cpu_by_process(pids)
            load_before = cpu_seconds(own)
            gateway_cpu: dict[int, float] = {}

            async def watch_gateways(stop: asyncio.Event) -> None:
                """Gateways come and go with their VMs: keep each one's last CPU reading."""
                while not stop.is_set():
                    for pid in processes_in(data / "vms") if (data / "vms").exists() else []:
                        gateway_cpu[pid] = max(gateway_cpu.get(pid, 0.0), cpu_seconds(pid, children=True))
                    await asyncio.sleep(0.5)

            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_gateways(stop))
            started = time.perf_counter()
            await asyncio.gather(*(one_user(r, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{proxy_port}",
                                            config_id, args.messages, args.timeout) for r in runs))
            wall = time.perf_counter() - started
            stop.set()
            await watcher
            after = cpu_by_process(pids)
            cpu = {name: after[name] - before[name] for name in pids}
            cpu["gateways"] = sum(gateway_cpu.values())
            cpu["load generator"] = cpu_seconds(own) - load_before
            with psycopg.connect(stack.database_url) as sql:
                operations = dict(sql.execute("SELECT kind || ' ' || status, count(*) FROM vps_operations "
                                              "GROUP BY 1 ORDER BY 1").fetchall())
            report(runs, cpu, operations, wall, args)
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"!! {name} exited with {proc.returncode}; see {logs / (name + '.log')}")
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if args.keep:
                print(f"kept {stack.tmp} (logs in {logs})")


def report(runs: list[UserRun], cpu: dict[str, float], operations: dict[str, int], wall: float,
           args: argparse.Namespace) -> None:
    gateway = "real OpenClaw gateway" if args.real_gateway else "gateway simulator"
    print(f"\n{args.users} users x {args.messages} messages, {gateway}, {wall:.1f} s wall\n")
    print(f"{'phase':<12}{'ok':>6}{'failed':>8}{'p50 s':>10}{'p99 s':>10}{'max s':>10}")
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r.errors)
    for phase in PHASES:
        times = [t for r in runs for t in r.times[phase]]
        failed = sum(n for e, n in errors.items() if e.startswith(phase + ":"))
        print(f"{phase:<12}{len(times):>6}{failed:>8}{pct(times, 0.5):>10.3f}{pct(times, 0.99):>10.3f}"
              f"{max(times, default=float('nan')):>10.3f}")
    print(f"\nAPI requests: {sum(r.requests for r in runs)} (including status polls every 0.5 s)")
    print("operations:   " + ", ".join(f"{k}: {v}" for k, v in operations.items()))
    print(f"\n{'process':<16}{'CPU s':>8}{'per user':>10}")
    for name, seconds in cpu.items():
        print(f"{name:<16}{seconds:>8.2f}{seconds / max(len(runs), 1):>10.3f}")
    print(f"{'control plane':<16}{sum(cpu[n] for n in ('api', 'worker', 'proxy')):>8.2f}"
          f"{sum(cpu[n] for n in ('api', 'worker', 'proxy')) / max(len(runs), 1):>10.3f}")
    if errors:
        print("\nerrors:")
        for text, n in errors.most_common(10):
            print(f"  {n} x {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10, help="chat messages per user")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a provision or destroy may take")
    parser.add_argument("--real-gateway", action="store_true", help="local VMs run OPENCLAW_BIN, not the simulator")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
