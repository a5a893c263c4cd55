"""Metering end to end against a real PostgreSQL, a real Temporal dev server and fake provider APIs.

Exactly once: a collection that crashes after fetching and is retried, and two racing
collections, count every sample once; a provider that is down raises an alert and stops nobody;
a 429 storm stays inside the rate budget; bandwidth is max(proxy, provider), never their sum.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY
from temporalio.client import Client

from billing.overage import GIB
from metering.periods import epoch, month_of, month_seconds
from settings import Settings
from tests.fakes.fly_api import FakeFly
from tests.fakes.hetzner_api import FakeHetzner
from tests.helpers import make_user
from tests.metering_harness import collectors, make_vps, metering_worker, usage, watermark
from workflows.metering import CollectBatchIn, MeteringCycle, MeteringCycleInput, MeteringReport

pytestmark = pytest.mark.asyncio(loop_scope="session")

HOUR = 3600
ROOT = Path(__file__).resolve().parent.parent
T0 = (int(time.time()) // 86_400 - 1) * 86_400 + 6 * HOUR  # yesterday 06:00 UTC: one day, one month
CX23_MEM_MB, CX23_DISK = 4096, 40 * GIB


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def storage(alloc: int, a: int, b: int) -> int:
    m0, secs = epoch(month_of(a)), month_seconds(month_of(a))
    return alloc * (b - m0) // secs - alloc * (a - m0) // secs


def hetzner_hour(minutes: int = 60) -> dict[str, int]:
    """What the fake's default rates produce for `minutes` one-minute samples of a cx23."""
    return {"bandwidth_in_bytes": 1000 * 60 * minutes, "bandwidth_out_bytes": 2000 * 60 * minutes,
            "cpu_ms": 50 * 60 * 10 * minutes, "memory_mb_seconds": CX23_MEM_MB * 60 * minutes}


async def run_cycle(client: Client, tq: str, until: int, **kw: object) -> MeteringReport:
    return await client.execute_workflow(MeteringCycle.run, MeteringCycleInput(until=until, **kw),  # type: ignore[arg-type]
                                         id=f"meter-{uuid.uuid4().hex[:8]}", task_queue=tq)


async def test_hetzner_cycle_counts_each_sample_once(temporal_client: Client, settings: Settings,
                                                     sql: psycopg.Connection) -> None:
    user = make_user(sql)
    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        cpu_samples = metric("slopbox_metering_samples_written_total", provider="hetzner", resource="cpu_ms")
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (_, tq):
            first = await run_cycle(temporal_client, tq, T0 + HOUR)
            again = await run_cycle(temporal_client, tq, T0 + HOUR)  # the same window again: nothing new
    period = month_of(T0).isoformat()
    # /metrics: sixty one-minute samples written once; the lag is how old the watermark is (a day, here).
    assert metric("slopbox_metering_samples_written_total", provider="hetzner", resource="cpu_ms") == cpu_samples + 60
    assert metric("slopbox_metering_collection_lag_seconds", provider="hetzner") >= time.time() - (T0 + HOUR) - 5
    assert first.written == 1 and first.requests == {"hetzner": 1} and first.users_changed == [str(user)]
    assert again.due == 0 and again.requests == {}
    assert usage(sql, vps) == {period: {**hetzner_hour(), "storage_bytes": storage(CX23_DISK, T0, T0 + HOUR)}}
    assert watermark(sql, vps) == T0 + HOUR
    calls = fake.calls("GET /servers/*/metrics")
    assert len(calls) == 1 and calls[0].query["type"] == ["cpu,disk,network"]
    # The daily series adds up to the month.
    day = sql.execute("SELECT sum(cpu_ms), sum(bandwidth_in_bytes), sum(storage_bytes) FROM vps_usage_daily"
                      " WHERE vps_id = %s", (vps,)).fetchone()
    assert day == (hetzner_hour()["cpu_ms"], hetzner_hour()["bandwidth_in_bytes"], storage(CX23_DISK, T0, T0 + HOUR))


async def test_crash_after_fetch_then_retry_counts_once(temporal_client: Client, settings: Settings,
                                                        sql: psycopg.Connection) -> None:
    user = make_user(sql)
    crashes = []

    async def crash_once(inp: CollectBatchIn, _result: object) -> None:
        if not crashes:
            crashes.append(inp)
            raise RuntimeError("worker killed between fetching and writing")

    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (acts, tq):
            acts.after_fetch = crash_once
            report = await run_cycle(temporal_client, tq, T0 + HOUR)
        fetched = len(fake.calls("GET /servers/*/metrics"))
    assert crashes and fetched == 2  # fetched, crashed, Temporal retried the activity, fetched again
    assert report.written == 1
    assert usage(sql, vps)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]


async def test_worker_sigkilled_after_fetch_then_retried_counts_once(
        temporal_client: Client, settings: Settings, sql: psycopg.Connection, tmp_path: Path) -> None:
    """A real worker process killed (SIGKILL) after its batch fetched and before it wrote: another worker
    picks the batch up after the heartbeat timeout, fetches again and counts the hour exactly once."""
    user = make_user(sql)
    tq = f"tq-kill-{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "fetched"
    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        env = {"PATH": os.environ["PATH"], "DATABASE_URL": settings.database_url or "",
               "TEMPORAL_ADDRESS": settings.temporal_target, "TEMPORAL_TASK_QUEUE": tq,
               "CONTROL_PLANE_API_KEY": settings.api_key(), "SLOPBOX_ENCRYPTION_KEYS": ",".join(settings.secret_keys()),
               "METER_FAKE_URL": fake.base_url or "", "METER_MARKER": str(marker)}
        log = (tmp_path / "worker.log").open("wb")
        doomed = subprocess.Popen(  # noqa: ASYNC220 (starting it does not block)
            [sys.executable, "-m", "tests.meter_kill_worker"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            handle = await temporal_client.start_workflow(
                MeteringCycle.run, MeteringCycleInput(until=T0 + HOUR, heartbeat_s=3),
                id=f"meter-kill-{uuid.uuid4().hex[:6]}", task_queue=tq)
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert doomed.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                await asyncio.sleep(0.05)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
        finally:
            if doomed.poll() is None:
                doomed.kill()
                doomed.wait()
        assert usage(sql, vps) == {} and watermark(sql, vps) == T0  # fetched, nothing written
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url),
                                   task_queue=tq):
            report: MeteringReport = await handle.result()
    assert len(fake.calls("GET /servers/*/metrics")) == 2 and report.written == 1
    assert usage(sql, vps)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]


async def test_crash_after_writing_then_retry_counts_once(temporal_client: Client, settings: Settings,
                                                          sql: psycopg.Connection) -> None:
    """The worker dies after the commit, before Temporal hears of it: the retry finds the watermark already
    at the window's end, so it neither asks the provider again nor counts anything twice."""
    user = make_user(sql)
    crashes = []

    async def crash_once(inp: CollectBatchIn) -> None:
        if not crashes:
            crashes.append(inp)
            raise RuntimeError("worker killed after writing")

    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (acts, tq):
            acts.after_write = crash_once
            report = await run_cycle(temporal_client, tq, T0 + HOUR)
    assert crashes and len(fake.calls("GET /servers/*/metrics")) == 1
    assert report.failed_batches == 0 and report.failed == []
    assert usage(sql, vps)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]


async def test_two_racing_collections_count_once(temporal_client: Client, settings: Settings,
                                                 sql: psycopg.Connection) -> None:
    user = make_user(sql)
    arrived = asyncio.Event()
    waiting: list[int] = []

    async def both_fetch_first(_inp: CollectBatchIn, _result: object) -> None:
        waiting.append(1)
        if len(waiting) == 2:
            arrived.set()
        await asyncio.wait_for(arrived.wait(), 30)

    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (acts, tq):
            acts.after_fetch = both_fetch_first
            a, b = await asyncio.gather(run_cycle(temporal_client, tq, T0 + HOUR),
                                        run_cycle(temporal_client, tq, T0 + HOUR))
    assert len(fake.calls("GET /servers/*/metrics")) == 2  # both fetched the same window
    assert sorted([a.written, b.written]) == [0, 1] and a.lost_race + b.lost_race == 1
    assert usage(sql, vps)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]


async def test_provider_down_alerts_and_stops_nobody(temporal_client: Client, settings: Settings,
                                                     sql: psycopg.Connection,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    user, admin = make_user(sql), make_user(sql)
    sql.execute("UPDATE users SET is_admin = true WHERE id = %s", (admin,))
    errors_503 = metric("slopbox_provider_errors_total", provider="hetzner", code="503")
    async with FakeHetzner() as fake:
        servers = [fake.add_server(n) for n in ("a", "b")]
        vpses = [make_vps(sql, user, "hetzner-cx23", ref=str(s["id"]), created=T0) for s in servers]
        local = make_vps(sql, user, "local-small", ref=None, created=T0, state="stopped")
        fake.fail_next("GET /servers/*/metrics", status=503, times=100)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (_, tq):
            with caplog.at_level("WARNING", logger="metering.alerts"):
                report = await run_cycle(temporal_client, tq, T0 + HOUR)
    assert [a.provider for a in report.alerts] == ["hetzner"]
    assert "unavailable" in report.alerts[0].message
    assert sorted(f.vps_id for f in report.failed) == sorted(vpses)
    assert {f.user_id for f in report.failed} == {str(user)}
    assert any("provider unavailable" in r.getMessage() for r in caplog.records)
    # The admin is alerted, the user told their figures are late (in the API, not by email), once each.
    notes = sql.execute("SELECT user_id, kind, email_status FROM notifications ORDER BY kind").fetchall()
    assert notes == [(user, "collection_failed", "skipped"), (admin, "provider_outage", "pending")], notes
    assert metric("slopbox_provider_errors_total", provider="hetzner", code="503") >= errors_503 + 2
    for vps in vpses:  # not counted, not stopped, asked again next cycle (watermark unchanged)
        assert watermark(sql, vps) == T0
        assert sql.execute("SELECT state FROM vpses WHERE id = %s", (vps,)).fetchone() == ("running",)
        assert sql.execute("SELECT last_error FROM vps_meter_state WHERE vps_id = %s", (vps,)).fetchone()[0]  # type: ignore[index]
    # One VPS's provider being down blocks nobody else: the stopped local VPS accrued its storage.
    assert usage(sql, local)[month_of(T0).isoformat()]["storage_bytes"] == storage(5 * GIB, T0, T0 + HOUR)


async def test_429_storm_stays_inside_the_budget(temporal_client: Client, settings: Settings,
                                                 sql: psycopg.Connection) -> None:
    user = make_user(sql)
    async with FakeHetzner() as fake:
        servers = [fake.add_server(f"s{i}") for i in range(12)]
        vpses = [make_vps(sql, user, "hetzner-cx23", ref=str(s["id"]), created=T0) for s in servers]
        fake.enforce_rate_limit = True
        fake.set_budget(3)  # the project is nearly exhausted (the lifecycle used it): 429s from the 4th request
        async with metering_worker(temporal_client, settings,
                                   collectors(settings, hetzner_url=fake.base_url, reserve=0, concurrency=2)) \
                as (_, tq):
            # Budget for this cycle: 8 requests (8/hour over a one-hour interval), two rate waits at most.
            report = await run_cycle(temporal_client, tq, T0 + HOUR, hetzner_requests_per_hour=8, batch_size=4,
                                     parallel_batches=2, max_rate_waits=2)
        metric_calls = fake.calls("GET /servers/*/metrics")
    answered = [c for c in metric_calls if c.status == 200]
    refused = [c for c in metric_calls if c.status == 429]
    assert len(answered) <= 8 and report.requests["hetzner"] <= 8  # inside the cycle's budget
    assert len(refused) >= 1  # the storm happened, and each 429 stopped its batch's requests
    assert report.rate_waits >= 1
    assert report.written == len(answered)
    assert sum(report.deferred.values()) == len(vpses) - report.written
    counted = [v for v in vpses if usage(sql, v)]
    assert len(counted) == report.written  # the rest keep their watermark: counted by a later cycle
    for v in counted:
        assert usage(sql, v)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]


async def test_stale_data_is_used_and_flagged(temporal_client: Client, settings: Settings,
                                              sql: psycopg.Connection) -> None:
    user = make_user(sql)
    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        fake.metrics_available_until = T0 + 30 * 60  # the provider has only the first half hour
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (_, tq):
            report = await run_cycle(temporal_client, tq, T0 + HOUR)
            assert vps in report.stale and "lags" in report.stale[vps]
            assert usage(sql, vps)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour(30)["cpu_ms"]
            fake.metrics_available_until = None  # the late samples arrive: counted next cycle, once
            await run_cycle(temporal_client, tq, T0 + HOUR)
    assert usage(sql, vps)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]
    assert sql.execute("SELECT stale FROM vps_meter_state WHERE vps_id = %s", (vps,)).fetchone() == (False,)


async def test_bandwidth_is_max_of_proxy_and_provider_never_the_sum(temporal_client: Client, settings: Settings,
                                                                    sql: psycopg.Connection) -> None:
    user = make_user(sql)
    period = month_of(T0)
    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        # The proxies counted 10 MB in before the provider's figures arrived (as proxy/metering.py adds them).
        sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes) VALUES (%s, %s, %s)",
                    (vps, period, 10_000_000))
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (_, tq):
            await run_cycle(temporal_client, tq, T0 + HOUR)  # provider: 3.6 MB in, 7.2 MB out
            row = usage(sql, vps)[period.isoformat()]
            assert row["bandwidth_in_bytes"] == 10_000_000  # proxy ahead: max is the proxy's
            assert row["bandwidth_out_bytes"] == 2000 * 3600
            await run_cycle(temporal_client, tq, T0 + 4 * HOUR)  # provider now 14.4 MB in: ahead of the proxy
            sql.execute("UPDATE vps_usage_periods SET bandwidth_in_bytes = bandwidth_in_bytes + 1000"
                        " WHERE vps_id = %s", (vps,))  # a proxy flush after it
    row = usage(sql, vps)[period.isoformat()]
    assert row["bandwidth_in_bytes"] == 1000 * 4 * 3600 + 1000  # never 10 MB + 14.4 MB


async def test_fly_one_query_for_all_machines(temporal_client: Client, settings: Settings,
                                              sql: psycopg.Connection) -> None:
    user = make_user(sql)
    async with FakeFly() as fake:
        vpses = []
        for _ in range(3):
            vps_id = str(uuid.uuid4())
            app = f"slopbox-{vps_id}"
            machine = fake.add_machine(app, state="started")
            sql.execute("INSERT INTO vpses (id, user_id, vps_config_id, provider, provider_ref, state, created_at)"
                        " VALUES (%s, %s, (SELECT id FROM vps_configs WHERE name = 'fly-shared-2x'), 'fly', %s,"
                        " 'running', %s)", (vps_id, user, f"{app}/{machine['id']}", datetime.fromtimestamp(T0, UTC)))
            vpses.append(vps_id)
        async with metering_worker(temporal_client, settings, collectors(settings, fly_url=fake.base_url)) as (_, tq):
            report = await run_cycle(temporal_client, tq, T0 + HOUR)
    assert report.requests == {"fly": 1} and report.written == 3
    assert len(fake.prom_queries) == 1
    assert f'app=~"{"|".join(sorted(f"slopbox-{v}" for v in vpses))}"' in fake.prom_queries[0]
    for vps in vpses:
        row = usage(sql, vps)[month_of(T0).isoformat()]
        assert row["cpu_ms"] == 30_000 * 60 and row["bandwidth_out_bytes"] == 120_000 * 60
        assert row["memory_mb_seconds"] == 256 * 60 * 60


async def test_final_collection_before_delete_then_storage_stops_at_destroy(
        temporal_client: Client, settings: Settings, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=T0)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (acts, tq):
            final = await acts.collect_now(vps, T0 + HOUR)  # what DestroyVps should run before deleting
            assert final.written == 1 and final.kind == "hetzner"
            # The VM is deleted at T0 + 1.5 h; Hetzner no longer knows it.
            sql.execute("UPDATE vpses SET state = 'destroyed', destroyed_at = %s, state_changed_at = %s"
                        " WHERE id = %s", (datetime.fromtimestamp(T0 + 5400, UTC),
                                           datetime.fromtimestamp(T0 + 5400, UTC), vps))
            fake.servers.pop(server["id"])
            report = await run_cycle(temporal_client, tq, T0 + 3 * HOUR)
            later = await run_cycle(temporal_client, tq, T0 + 4 * HOUR)
    assert report.written == 1 and report.failed == [] and later.due == 0
    row = usage(sql, vps)[month_of(T0).isoformat()]
    assert row["cpu_ms"] == hetzner_hour()["cpu_ms"]  # the final collection; nothing after the VM went
    assert row["storage_bytes"] == storage(CX23_DISK, T0, T0 + 5400)  # accrued up to the destruction only
    assert watermark(sql, vps) == T0 + 5400


async def test_samples_for_a_closed_month_are_carried_into_the_next(temporal_client: Client, settings: Settings,
                                                                   sql: psycopg.Connection) -> None:
    """A VPS whose last hour of a month was not collected before CloseMonth (its provider was down, say):
    the late samples go into the next open month, counted once, never into the frozen statement."""
    user = make_user(sql)
    this_month = month_of(T0)
    boundary = epoch(this_month)
    previous = month_of(boundary - 1)
    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=boundary - HOUR)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (acts, tq):
            assert await acts.close_month(previous.isoformat()) == (0, 0)  # closed with nothing of this VPS
            await run_cycle(temporal_client, tq, boundary)
    rows = usage(sql, vps)
    assert previous.isoformat() not in rows
    assert rows[this_month.isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]
    day = sql.execute("SELECT day FROM vps_usage_daily WHERE vps_id = %s", (vps,)).fetchall()
    assert day == [(this_month,)]


async def test_a_long_gap_is_one_request_with_a_coarser_step(temporal_client: Client, settings: Settings,
                                                            sql: psycopg.Connection) -> None:
    """A VPS that waited two days for its turn (rate budget, outage) is caught up in one request: the step
    grows so the gap fits in Hetzner's 500 samples, and the total is the same as minute by minute."""
    user = make_user(sql)
    since = T0 - 86_400
    async with FakeHetzner() as fake:
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=since)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (_, tq):
            report = await run_cycle(temporal_client, tq, T0 + 86_400)
    calls = fake.calls("GET /servers/*/metrics")
    assert len(calls) == 1 and calls[0].query["step"] == ["360"] and report.stale == {}
    rows = usage(sql, vps)
    assert sum(r["cpu_ms"] for r in rows.values()) == 50 * 10 * 2 * 86_400
    assert sum(r["bandwidth_in_bytes"] for r in rows.values()) == 1000 * 2 * 86_400
    assert watermark(sql, vps) == T0 + 86_400


async def test_one_vps_failing_blocks_no_other(temporal_client: Client, settings: Settings,
                                               sql: psycopg.Connection) -> None:
    user = make_user(sql)
    async with FakeHetzner() as fake:
        servers = [fake.add_server(f"s{i}") for i in range(5)]
        vpses = [make_vps(sql, user, "hetzner-cx23", ref=str(s["id"]), created=T0) for s in servers]
        fake.fail_next(f"GET /servers/{servers[2]['id']}/metrics", status=500, times=1)
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (_, tq):
            report = await run_cycle(temporal_client, tq, T0 + HOUR, batch_size=2)
            assert [f.vps_id for f in report.failed] == [vpses[2]]
            assert report.alerts == []  # one server failing is not the provider being down
            assert report.written == 4 and watermark(sql, vpses[2]) == T0
            again = await run_cycle(temporal_client, tq, T0 + HOUR)  # the next cycle asks for it again
    assert again.written == 1 and again.failed == []
    for vps in vpses:
        assert usage(sql, vps)[month_of(T0).isoformat()]["cpu_ms"] == hetzner_hour()["cpu_ms"]
