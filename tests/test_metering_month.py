"""Across a month boundary in Temporal's time-skipping environment (V2, offline).

The real clock says early December; the workflow's virtual clock runs to January 1st in an
instant. A VPS that ran the last hour of December is collected by CloseMonth: a Hetzner sample
straddling midnight is split between the two months exactly, December is frozen with one
statement for the user, and a second CloseMonth for the same month adds nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime

import psycopg
import pytest
import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from billing.overage import GIB
from devstack.temporal import temporal_cli
from metering.periods import epoch, month_seconds, next_month
from settings import Settings
from tests.fakes.hetzner_api import FakeHetzner
from tests.helpers import make_user
from tests.metering_harness import collectors, make_vps, metering_worker, usage
from workflows.metering import CloseMonth, CloseMonthInput, CloseMonthReport, MeteringCycleInput

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_time_skipping_v2(
        dev_server_existing_path=temporal_cli(), data_converter=pydantic_data_converter, ui=False,
        dev_server_extra_args=["--dynamic-config-value", "frontend.WorkflowTimeSkippingEnabled=true"],
    ) as env:
        yield env


async def test_close_month_splits_the_boundary_and_runs_once(ts_env: WorkflowEnvironment, settings: Settings,
                                                             sql: psycopg.Connection) -> None:
    today = datetime.now(UTC).date()
    december = date(today.year, today.month, 1)
    january = next_month(december)
    boundary = epoch(january)
    start = boundary - 3600
    step = 420  # Hetzner raised the step: samples every 7 minutes, one of them across midnight
    user = make_user(sql)
    async with FakeHetzner() as fake:
        fake.metrics_step = step
        server = fake.add_server("a")
        vps = make_vps(sql, user, "hetzner-cx23", ref=str(server["id"]), created=start)
        # The proxies counted some bytes into December's row (proxy/metering.py adds them like this).
        sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_out_bytes) VALUES (%s, %s, %s)",
                    (vps, december, 99_000_000))
        cols = collectors(settings, hetzner_url=fake.base_url, settle_s=120)
        async with metering_worker(ts_env.client, settings, cols) as (_, tq):
            inp = CloseMonthInput(period_start=december.isoformat(), settle_s=120,
                                  cycle=MeteringCycleInput(interval_s=3600))
            first: CloseMonthReport = await ts_env.client.execute_workflow(
                CloseMonth.run, inp, id=f"close-{uuid.uuid4().hex[:6]}", task_queue=tq)
            second: CloseMonthReport = await ts_env.client.execute_workflow(
                CloseMonth.run, inp, id=f"close-{uuid.uuid4().hex[:6]}", task_queue=tq)

    # Samples the fake produced over the collected window [start, boundary): stamps at multiples of the step.
    stamps = [t for t in range(-(-start // step) * step, boundary, step)]
    per_sample = 50 * step * 10  # cpu 50 % for one step, in ms
    straddler = stamps[-1]
    assert straddler < boundary < straddler + step
    dec_part = per_sample * (boundary - straddler) // step
    rows = usage(sql, vps)
    assert rows[december.isoformat()]["cpu_ms"] == per_sample * (len(stamps) - 1) + dec_part
    assert rows[january.isoformat()]["cpu_ms"] == per_sample - dec_part
    alloc = 40 * GIB
    secs = month_seconds(december)
    assert rows[december.isoformat()]["storage_bytes"] == alloc * (secs) // secs - alloc * (secs - 3600) // secs
    # The final cycle's window ended at boundary + settle for storage; January accrued those 120 s.
    assert first.final_cycle is not None and first.final_cycle.written == 1
    assert first.statements == 1 and second.statements == 0
    statements = sql.execute("SELECT user_id, bandwidth_bytes, cpu_ms, overage_cost_cents FROM usage_statements"
                             " WHERE period_start = %s", (december,)).fetchall()
    assert statements == [(user, rows[december.isoformat()]["bandwidth_in_bytes"]
                           + rows[december.isoformat()]["bandwidth_out_bytes"],
                           rows[december.isoformat()]["cpu_ms"], 0)]
    frozen = sql.execute("SELECT frozen_at IS NOT NULL FROM vps_usage_periods WHERE vps_id = %s"
                         " ORDER BY period_start", (vps,)).fetchall()
    assert frozen == [(True,), (False,)]
    assert sql.execute("SELECT count(*) FROM metering_months").fetchone() == (1,)
    # Bandwidth is max(proxy, provider) per direction, and the daily series adds up to December's row.
    assert rows[december.isoformat()]["bandwidth_out_bytes"] == 99_000_000  # the proxies' count, ahead
    assert rows[december.isoformat()]["bandwidth_in_bytes"] == sum(
        1000 * step * (1 if t != straddler else 0) for t in stamps) + 1000 * (boundary - straddler)
    daily = sql.execute("SELECT sum(bandwidth_in_bytes), sum(bandwidth_out_bytes), sum(cpu_ms) FROM vps_usage_daily"
                        " WHERE vps_id = %s AND day < %s", (vps, january)).fetchone()
    assert daily == (rows[december.isoformat()]["bandwidth_in_bytes"], 99_000_000, rows[december.isoformat()]["cpu_ms"])
