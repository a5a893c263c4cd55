"""Byte metering: batched upserts that add, several proxies adding up, nothing lost at shutdown."""

from __future__ import annotations

import asyncio
from datetime import date

import psycopg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from billing.plans import month_start
from db.engine import make_engine
from proxy.metering import Meter
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
