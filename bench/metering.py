"""One metering cycle over N VPSes against the fake provider APIs: wall time, provider requests,
database statements and CPU seconds, and how each grows with N.

Starts its own embedded PostgreSQL and Temporal dev server, a worker running MeteringCycle with
the real collectors and ledger, and the fake Hetzner (or Fly) API in a thread of this process (its
CPU is measured per thread and reported apart). Each VPS has one hour to collect (60 one-minute
samples). Statements are counted at the driver (every statement the worker's engine sends).

Usage: `.venv/bin/python -m bench.metering [--sizes 100,1000,10000] [--provider hetzner|fly]
[--budget 1800]` (`--budget`: Hetzner requests per hour for metering; default unlimited, to measure
the cycle itself; with a budget the cycle collects the oldest VPSes within it and defers the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psutil
import psycopg
from cryptography.fernet import Fernet
from sqlalchemy import event
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.metering import MeteringActivities
from bench.stack import standalone_stack
from db.engine import make_engine
from metering.collectors import FlyCollector, HetznerCollector, LocalCollector, UsageCollector
from settings import Settings
from tests.fakes.fly_api import FakeFly
from tests.fakes.hetzner_api import FakeHetzner
from workflows.metering import CloseMonth, MeteringCycle, MeteringCycleInput, MeteringReport

KEY = "bench-key-" + "k" * 40
HOUR = 3600


def thread_cpu(native_id: int | None) -> float:
    for t in psutil.Process().threads():
        if t.id == native_id:
            return float(t.user_time + t.system_time)
    return 0.0


def tree_cpu(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


def fake_thread_id(fake: Any) -> int | None:
    thread: threading.Thread | None = fake._thread  # noqa: SLF001 (the fake's own loop thread)
    return thread.native_id if thread else None


async def one_size(n: int, provider: str, budget: int | None, env: WorkflowEnvironment, settings: Settings,
                   url: str, pg_pid: int) -> dict[str, Any]:
    fake: Any = FakeHetzner() if provider == "hetzner" else FakeFly()
    base = fake.start_in_thread()
    fake.rate_limit = 10**9
    fake.set_budget(10**9) if provider == "hetzner" else None
    start = (int(time.time()) // HOUR - 3) * HOUR
    with psycopg.connect(url, autocommit=True) as sql:
        sql.execute("TRUNCATE vpses, users, vps_usage_periods, vps_meter_state, vps_usage_daily CASCADE")
        user = sql.execute("INSERT INTO users (email) VALUES (%s) RETURNING id", (f"b{n}@x",)).fetchone()[0]  # type: ignore[index]
        rows = []
        for i in range(n):
            vps_id = str(uuid.uuid4())
            if provider == "hetzner":
                ref = str(fake.add_server(f"s{i}")["id"])
                config = "hetzner-cx23"
            else:
                app = f"slopbox-{vps_id}"
                ref = f"{app}/{fake.add_machine(app, state='started')['id']}"
                config = "fly-shared-2x"
            rows.append((vps_id, user, config, provider, ref, datetime.fromtimestamp(start, UTC)))
        with sql.cursor() as cur:
            cur.executemany("INSERT INTO vpses (id, user_id, vps_config_id, provider, provider_ref, state, created_at)"
                            " VALUES (%s, %s, (SELECT id FROM vps_configs WHERE name = %s), %s, %s, 'running', %s)",
                            rows)
    cols: dict[str, UsageCollector] = {"local": LocalCollector(settings.data_dir)}
    if provider == "hetzner":
        cols["hetzner"] = HetznerCollector(base, fake.token, settle_s=0, reserve=0)
    else:
        cols["fly"] = FlyCollector(base.rsplit("/v1", 1)[0] + "/prometheus", "personal", fake.token, settle_s=0)
    engine = make_engine(settings, pool_size=10)
    statements = [0]

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(*_a: Any, **_k: Any) -> None:
        statements[0] += 1

    acts = MeteringActivities(settings, engine, cols)
    tq = f"bench-{uuid.uuid4().hex[:6]}"
    inp = MeteringCycleInput(until=start + HOUR, hetzner_requests_per_hour=budget if budget is not None else 10**9,
                             max_rate_waits=0)
    async with Worker(env.client, task_queue=tq, workflows=[MeteringCycle, CloseMonth], activities=acts.all(),
                      max_concurrent_activities=100):
        fake_before = thread_cpu(fake_thread_id(fake))
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        pg_before = tree_cpu(pg_pid)
        requests_before = len(fake.requests)
        t0 = time.perf_counter()
        report: MeteringReport = await env.client.execute_workflow(MeteringCycle.run, inp, id=f"bench-{n}-{tq}",
                                                                   task_queue=tq)
        wall = time.perf_counter() - t0
        self_after = resource.getrusage(resource.RUSAGE_SELF)
        fake_cpu = thread_cpu(fake_thread_id(fake)) - fake_before
        pg_cpu = tree_cpu(pg_pid) - pg_before
        requests = len(fake.requests) - requests_before
    worker_cpu = (self_after.ru_utime + self_after.ru_stime - self_before.ru_utime - self_before.ru_stime) - fake_cpu
    await acts.aclose()
    await engine.dispose()
    fake.stop()
    out = {"n": n, "wall_s": wall, "requests": requests, "statements": statements[0], "worker_cpu_s": worker_cpu,
           "postgres_cpu_s": pg_cpu, "fake_cpu_s": fake_cpu, "written": report.written,
           "deferred": sum(report.deferred.values()),
           "batches": -(-report.written // (inp.fly_batch_size if provider == "fly" else inp.batch_size))}
    print(f"{n:>6} VPSes: wall {wall:6.2f}s  requests {requests:6d}  statements {statements[0]:5d}  "
          f"worker CPU {worker_cpu:6.2f}s  PostgreSQL CPU {pg_cpu:5.2f}s  (fake API {fake_cpu:5.2f}s)  "
          f"written {report.written}  deferred {out['deferred']}", flush=True)
    return out


async def main(sizes: list[int], provider: str, budget: int | None) -> None:
    async with standalone_stack("slopbox-bench-meter-") as stack:
        settings = Settings(database_url=stack.database_url, control_plane_api_key=KEY, local_provider=True,
                            encryption_keys=[Fernet.generate_key().decode()],
                            temporal_address=stack.temporal_address, data_dir=stack.tmp / "data")
        results = [await one_size(n, provider, budget, stack.temporal, settings, stack.database_url,
                                  stack.postgres_pid) for n in sizes]
    base = results[0]
    print(f"growth relative to {base['n']} VPSes (x{' / x'.join(str(r['n'] // base['n']) for r in results)}):")
    for key in ("wall_s", "requests", "statements", "worker_cpu_s", "postgres_cpu_s"):
        print(f"  {key:>15}: " + "  ".join(f"{r[key] / base[key]:7.1f}x" if base[key] else "-" for r in results))
    print("  statements per batch: " + "  ".join(f"{r['statements'] / max(1, r['batches']):.1f}"
                                                   for r in results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--provider", choices=["hetzner", "fly"], default="hetzner")
    parser.add_argument("--budget", type=int, default=None, help="Hetzner requests per hour for metering")
    args = parser.parse_args()
    asyncio.run(main([int(s) for s in args.sizes.split(",")], args.provider, args.budget))
    sys.exit(0)
