"""Shared setup for the metering tests: VPS rows, fake-provider collectors, a worker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from temporalio.client import Client
from temporalio.worker import Worker

from activities.metering import MeteringActivities
from db.engine import make_engine
from metering.collectors import FlyCollector, HetznerCollector, LocalCollector, UsageCollector
from settings import Settings
from tests.histories import record, recording
from workflows.metering import CloseMonth, MeteringCycle

COUNTERS = ("bandwidth_in_bytes", "bandwidth_out_bytes", "cpu_ms", "memory_mb_seconds", "storage_bytes")


def make_vps(sql: psycopg.Connection, user_id: uuid.UUID, config: str, *, ref: str | None,
             created: int, state: str = "running", since: int | None = None,
             destroyed: int | None = None) -> str:
    """A VPS row (and its watermark at `since`, default its creation), as the lifecycle leaves it."""
    provider = config.split("-")[0]
    row = sql.execute(
        "INSERT INTO vpses (user_id, vps_config_id, provider, provider_ref, state, created_at, state_changed_at,"
        " destroyed_at) VALUES (%s, (SELECT id FROM vps_configs WHERE name = %s), %s, %s, %s, %s, %s, %s)"
        " RETURNING id", (user_id, config, provider, ref, state, datetime.fromtimestamp(created, UTC),
                          datetime.fromtimestamp(created, UTC),
                          datetime.fromtimestamp(destroyed, UTC) if destroyed else None)).fetchone()
    assert row is not None
    vps_id = str(row[0])
    if since is not None:
        sql.execute("INSERT INTO vps_meter_state (vps_id, collected_until) VALUES (%s, %s)",
                    (vps_id, datetime.fromtimestamp(since, UTC)))
    return vps_id


def usage(sql: psycopg.Connection, vps_id: str) -> dict[str, dict[str, int]]:
    """`{period_start: {counter: value}}` of one VPS."""
    rows = sql.execute(f"SELECT period_start, {', '.join(COUNTERS)} FROM vps_usage_periods WHERE vps_id = %s",
                       (vps_id,)).fetchall()
    return {r[0].isoformat(): dict(zip(COUNTERS, r[1:], strict=True)) for r in rows}


def watermark(sql: psycopg.Connection, vps_id: str) -> int:
    row = sql.execute("SELECT collected_until FROM vps_meter_state WHERE vps_id = %s", (vps_id,)).fetchone()
    assert row is not None
    return int(row[0].timestamp())


def collectors(settings: Settings, *, hetzner_url: str | None = None, fly_url: str | None = None,
               token: str = "test-token", **hetzner: Any) -> dict[str, UsageCollector]:
    out: dict[str, UsageCollector] = {"local": LocalCollector(settings.data_dir)}
    if hetzner_url:
        out["hetzner"] = HetznerCollector(hetzner_url, token, **{"settle_s": 0, **hetzner})
    if fly_url:
        out["fly"] = FlyCollector(fly_url.rsplit("/v1", 1)[0] + "/prometheus", "personal", token, settle_s=0)
    return out


@asynccontextmanager
async def metering_worker(client: Client, settings: Settings, cols: dict[str, UsageCollector],
                          task_queue: str | None = None, extra_workflows: tuple[type, ...] = ()
                          ) -> AsyncIterator[tuple[MeteringActivities, str]]:
    tq = task_queue or f"tq-meter-{uuid.uuid4().hex[:8]}"
    engine = make_engine(settings)
    acts = MeteringActivities(settings, engine, cols)
    try:
        async with Worker(client, task_queue=tq, workflows=[MeteringCycle, CloseMonth, *extra_workflows],
                          activities=acts.all()):
            yield acts, tq
            if recording():
                await record(client, tq)
    finally:
        await acts.aclose()
        await engine.dispose()
