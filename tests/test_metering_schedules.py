"""The metering schedules the worker creates, and the EnforceUsage contract at the end of a cycle."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.service import RPCError

from orchestration.schedules import CLOSE_MONTH_SCHEDULE_ID, METERING_SCHEDULE_ID, ensure_metering_schedules
from settings import Settings
from tests.fakes.hetzner_api import FakeHetzner
from tests.helpers import make_user
from tests.metering_harness import collectors, make_vps, metering_worker
from worker import metering_cycle_input
from workflows.metering import MeteringCycle, MeteringCycleInput

pytestmark = pytest.mark.asyncio(loop_scope="session")
ENFORCED: list[dict[str, object]] = []


@workflow.defn(name="EnforceUsage", sandboxed=False)
class RecordingEnforceUsage:
    """Stands in for the enforcement module's workflow: records the input the cycle hands it."""

    @workflow.run
    async def run(self, inp: dict[str, object]) -> None:
        ENFORCED.append(inp)


async def test_schedules_created_updated_not_by_a_worker_with_0(temporal_client: Client, settings: Settings) -> None:
    tq = settings.temporal_task_queue
    cycle = metering_cycle_input(settings.model_copy(update={"metering_interval_s": 5}))
    assert await ensure_metering_schedules(temporal_client, tq, cycle, interval_s=5)
    assert await ensure_metering_schedules(temporal_client, tq, cycle, interval_s=7)  # again: updated, not duplicated
    desc = await temporal_client.get_schedule_handle(METERING_SCHEDULE_ID).describe()
    assert desc.schedule.spec.intervals[0].every.total_seconds() == 7
    assert desc.schedule.policy.overlap.name == "SKIP"
    close = await temporal_client.get_schedule_handle(CLOSE_MONTH_SCHEDULE_ID).describe()
    assert close.schedule.spec.cron_expressions == ["0 0 1 * *"] or close.schedule.spec.calendars
    assert close.schedule.spec.time_zone_name == "UTC"
    # 0: this worker makes none (a test worker, a worker seeing part of the fleet), and deletes none.
    assert not await ensure_metering_schedules(temporal_client, tq, cycle, interval_s=0)
    await temporal_client.get_schedule_handle(METERING_SCHEDULE_ID).describe()
    for schedule_id in (METERING_SCHEDULE_ID, CLOSE_MONTH_SCHEDULE_ID):
        await temporal_client.get_schedule_handle(schedule_id).delete()
        with pytest.raises(RPCError):
            await temporal_client.get_schedule_handle(schedule_id).describe()
    assert not await ensure_metering_schedules(temporal_client, tq, cycle, interval_s=0)
    with pytest.raises(RPCError):
        await temporal_client.get_schedule_handle(METERING_SCHEDULE_ID).describe()


async def test_cycle_starts_enforce_usage_for_the_users_whose_usage_changed(
        temporal_client: Client, settings: Settings, sql: psycopg.Connection) -> None:
    user, idle = make_user(sql), make_user(sql)
    start = (int(time.time()) // 3600 - 2) * 3600
    async with FakeHetzner() as fake:
        make_vps(sql, user, "hetzner-cx23", ref=str(fake.add_server("a")["id"]), created=start)
        make_vps(sql, idle, "hetzner-cx23", ref=None, created=start + 3600)  # nothing before `until`
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url),
                                   extra_workflows=(RecordingEnforceUsage,)) as (_, tq):
            report = await temporal_client.execute_workflow(
                MeteringCycle.run, MeteringCycleInput(until=start + 3600, start_enforcement=True),
                id=f"meter-{uuid.uuid4().hex[:6]}", task_queue=tq)
            await temporal_client.get_workflow_handle(f"enforce-usage-{start + 3600}").result()
    assert report.enforcement_started
    assert ENFORCED[-1] == {"period_start": report.period_start, "user_ids": [str(user)]}
