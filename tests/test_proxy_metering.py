"""Byte metering: batched upserts that add, several proxies adding up, nothing lost at shutdown."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import date

import psycopg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from billing.plans import month_start
from db.engine import make_engine
from proxy.enforcement import UsageEnforcer
from proxy.metering import ConnectionBytes, Meter
from settings import Settings
from tests.proxy_harness import seed_gateway_user, usage

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_two_proxies_add_up(settings: Settings, sql: psycopg.Connection) -> None:
    a = seed_gateway_user(sql, settings, port=1)
    b = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    try:
        first, second = Meter(engine), Meter(engine)
        for _ in range(1000):  # many frames, one statement per flush
            first.add(a.vps_id, inbound=3, outbound=5)
            second.add(a.vps_id, inbound=7)
        second.add(b.vps_id, outbound=11)
        await asyncio.gather(first.flush(), second.flush())
        first.add(a.vps_id, inbound=1)
        await first.flush()
        assert usage(sql, a.vps_id) == (3000 + 7000 + 1, 5000)
        assert usage(sql, b.vps_id) == (0, 11)
        rows = sql.execute("SELECT period_start FROM vps_usage_periods WHERE vps_id = %s", (a.vps_id,)).fetchall()
        assert rows == [(month_start(),)]
    finally:
        await engine.dispose()


async def test_close_flushes_what_is_left(settings: Settings, sql: psycopg.Connection) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    try:
        meter = Meter(engine, flush_interval_s=3600)
        meter.start()
        meter.add(seeded.vps_id, inbound=42, outbound=43)
        assert usage(sql, seeded.vps_id) == (0, 0)
        await meter.close()
        assert usage(sql, seeded.vps_id) == (42, 43)
    finally:
        await engine.dispose()


async def test_periodic_flush(settings: Settings, sql: psycopg.Connection) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    meter = Meter(engine, flush_interval_s=0.05)
    try:
        meter.start()
        meter.add(seeded.vps_id, outbound=9)
        for _ in range(100):
            if usage(sql, seeded.vps_id) == (0, 9):
                break
            await asyncio.sleep(0.05)
        assert usage(sql, seeded.vps_id) == (0, 9)
    finally:
        await meter.close()
        await engine.dispose()


async def test_failed_flush_keeps_the_counts(settings: Settings, sql: psycopg.Connection) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    good = make_engine(settings)
    bad = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        meter = Meter(bad)
        meter.add(seeded.vps_id, inbound=5)
        with pytest.raises(Exception):  # noqa: B017 - any connection error
            await meter.flush()
        meter.add(seeded.vps_id, inbound=1)
        meter._engine = good
        await meter.flush()
        assert usage(sql, seeded.vps_id) == (6, 0)
    finally:
        await good.dispose()
        await bad.dispose()


async def test_deleted_vps_does_not_block_the_batch(settings: Settings, sql: psycopg.Connection) -> None:
    kept = seed_gateway_user(sql, settings, port=1)
    gone = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    try:
        meter = Meter(engine)
        meter.add(kept.vps_id, inbound=1)
        meter.add(gone.vps_id, inbound=2)
        sql.execute("DELETE FROM agents WHERE id = %s", (gone.agent_id,))
        sql.execute("DELETE FROM vpses WHERE id = %s", (gone.vps_id,))
        await meter.flush()
        assert usage(sql, kept.vps_id) == (1, 0)
        assert meter.pending({gone.vps_id}) == 0
    finally:
        await engine.dispose()


async def test_counts_land_in_their_month(settings: Settings, sql: psycopg.Connection) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    try:
        meter = Meter(engine)
        meter.add_for((seeded.vps_id, date(2020, 1, 1)), 5, 6)
        meter.add(seeded.vps_id, inbound=1)
        await meter.flush()
        rows = sql.execute("SELECT period_start, bandwidth_in_bytes, bandwidth_out_bytes FROM vps_usage_periods "
                           "WHERE vps_id = %s ORDER BY period_start", (seeded.vps_id,)).fetchall()
        assert rows == [(date(2020, 1, 1), 5, 6), (month_start(), 1, 0)]
    finally:
        await engine.dispose()


async def test_overage_exactly_the_budget_is_allowed(settings: Settings, sql: psycopg.Connection) -> None:
    """Starter: CPU 3 cents per hour and memory 1 cent per GB-hour over the plan. 7,600,000 ms of CPU
    over (6 1/3 cents) plus 2,457,600 MB-s of memory over (2/3 cent) is exactly 7 cents: within a
    7-cent budget. Floats summed it to 7.000000000000001 and refused the user; one more ms is 8 cents."""
    seeded = seed_gateway_user(sql, settings, port=1, plan="starter")
    max_cpu_ms, max_memory = sql.execute(
        "SELECT max_cpu_ms, max_memory_mb_seconds FROM plans WHERE name = 'starter'").fetchone()  # type: ignore[misc]
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, cpu_ms, memory_mb_seconds) "
                "VALUES (%s, %s, %s, %s)", (seeded.vps_id, month_start(), max_cpu_ms + 7_600_000,
                                            max_memory + 2_457_600))
    sql.execute("INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES (%s, %s, 7)",
                (seeded.user_id, month_start()))
    engine = make_engine(settings)
    try:
        enforcer = UsageEnforcer(engine, Meter(engine), ttl_s=0.0)
        verdict = await enforcer.check(seeded.user_id)
        assert verdict.allowed, verdict.reason
        sql.execute("UPDATE vps_usage_periods SET cpu_ms = cpu_ms + 1 WHERE vps_id = %s", (seeded.vps_id,))
        verdict = await enforcer.check(seeded.user_id)
        assert not verdict.allowed
        assert verdict.reason is not None and "overage 8 cents (rounded up)" in verdict.reason, verdict.reason
        assert "budget of 7 cents" in verdict.reason and "CPU time 302.11 of 300.00 hours" in verdict.reason
    finally:
        await engine.dispose()


class _Counting:
    """A stream that counts its own bytes (as an open WebSocket relay does)."""

    def __init__(self, vps_id: object) -> None:
        self.vps_id, self.inbound, self.outbound = vps_id, 0, 0

    def drain(self) -> tuple[object, int, int]:
        counts = (self.vps_id, self.inbound, self.outbound)
        self.inbound = self.outbound = 0
        return counts


async def test_attached_sources_are_drained_exactly(settings: Settings, sql: psycopg.Connection) -> None:
    """Bytes a source counted in place reach the database at the next flush, count in `pending`
    (enforcement) before that, the rest when it is detached, and the month that ended keeps what
    was counted in it."""
    seeded = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    try:
        meter = Meter(engine, flush_interval_s=3600)
        source = _Counting(seeded.vps_id)
        meter.attach(source)  # type: ignore[arg-type]
        source.inbound, source.outbound = 100, 7
        meter.add(seeded.vps_id, inbound=1)
        assert meter.pending({seeded.vps_id}) == 108
        source.outbound += 3
        await meter.flush()
        assert usage(sql, seeded.vps_id) == (101, 10)
        source.inbound = 5
        meter._month, meter._month_ends = date(2020, 1, 1), 0.0  # the month just ended
        meter.add(seeded.vps_id, inbound=2)  # rolls the month: the source's 5 bytes stay in January 2020
        source.outbound = 9
        meter.detach(source)  # type: ignore[arg-type]
        source.outbound = 1000  # detached: no longer counted
        await meter.flush()
        rows = sql.execute("SELECT period_start, bandwidth_in_bytes, bandwidth_out_bytes FROM vps_usage_periods "
                           "WHERE vps_id = %s ORDER BY period_start", (seeded.vps_id,)).fetchall()
        assert rows == [(date(2020, 1, 1), 5, 0), (month_start(), 101 + 2, 10 + 9)]
    finally:
        await engine.dispose()


async def test_month_timer_drains_sources_at_the_boundary(settings: Settings, sql: psycopg.Connection) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    meter = Meter(engine, flush_interval_s=3600)
    try:
        source = _Counting(seeded.vps_id)
        meter.attach(source)  # type: ignore[arg-type]
        source.inbound = 11
        meter._month, meter._month_ends = date(2020, 2, 1), time.time() + 0.05  # ends in 50 ms
        meter.start()
        await asyncio.sleep(0.3)  # nothing else touches the meter: the timer drains at the boundary
        source.inbound = 4
        await meter.flush()
        rows = sql.execute("SELECT period_start, bandwidth_in_bytes FROM vps_usage_periods "
                           "WHERE vps_id = %s ORDER BY period_start", (seeded.vps_id,)).fetchall()
        assert rows == [(date(2020, 2, 1), 11), (month_start(), 4)]
    finally:
        await meter.close()
        await engine.dispose()


async def test_connection_bytes_are_exact(settings: Settings, sql: psycopg.Connection) -> None:
    """A browser connection's counter (`ConnectionBytes`, the fast front's plain answers): drained at
    `pending` and flush while the connection stays open, handed over when a request on it goes to
    another VPS (an equal id looked up again is the same VPS), kept in the month it was counted in,
    the rest taken at close, and bytes counted after the close still reach the meter."""
    a = seed_gateway_user(sql, settings, port=1)
    b = seed_gateway_user(sql, settings, port=1)
    engine = make_engine(settings)
    try:
        meter = Meter(engine, flush_interval_s=3600)
        conn = ConnectionBytes(meter)
        conn.count(a.vps_id, outbound=100)
        conn.count(uuid.UUID(str(a.vps_id)), outbound=5)  # equal, another object: same VPS
        conn.count(a.vps_id, inbound=2)
        assert meter.pending({a.vps_id}) == 107
        conn.count(a.vps_id, outbound=1)
        await meter.flush()
        assert usage(sql, a.vps_id) == (2, 106)
        conn.count(a.vps_id, outbound=10)
        conn.count(b.vps_id, outbound=20)  # another agent's VPS on the same connection
        conn.count(a.vps_id, outbound=30)
        assert meter.pending({a.vps_id}) == 40 and meter.pending({b.vps_id}) == 20
        conn.count(a.vps_id, outbound=7)
        meter._month, meter._month_ends = date(2020, 3, 1), 0.0  # the month just ended
        meter.add(b.vps_id, inbound=1)  # rolls the month: the 7 bytes counted before stay in March 2020
        conn.count(a.vps_id, outbound=3)
        conn.close()
        conn.count(a.vps_id, outbound=4)  # after the close (a body still being written): straight to the meter
        conn.close()  # twice: nothing more
        await meter.flush()
        rows = sql.execute("SELECT period_start, bandwidth_in_bytes, bandwidth_out_bytes FROM vps_usage_periods "
                           "WHERE vps_id = %s ORDER BY period_start", (a.vps_id,)).fetchall()
        assert rows == [(date(2020, 3, 1), 0, 7), (month_start(), 2, 106 + 10 + 30 + 3 + 4)]
        assert usage(sql, b.vps_id) == (1, 20)
        assert not meter._sources
    finally:
        await engine.dispose()
