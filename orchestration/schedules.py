"""Temporal Schedules the control plane relies on, created idempotently at worker start."""

from __future__ import annotations

import logging
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
)

from workflows.contracts import ReconcileInput
from workflows.lifecycle import Reconcile
from workflows.metering import CloseMonth, CloseMonthInput, MeteringCycle, MeteringCycleInput

log = logging.getLogger(__name__)
RECONCILE_SCHEDULE_ID = "slopbox-reconcile"
METERING_SCHEDULE_ID = "slopbox-metering"
CLOSE_MONTH_SCHEDULE_ID = "slopbox-close-month"


async def ensure_reconcile_schedule(client: Client, task_queue: str, every: timedelta = timedelta(minutes=5)) -> None:
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(Reconcile.run, ReconcileInput(), id="slopbox-reconcile-run",
                                           task_queue=task_queue),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        # A slow run is never stacked with the next one.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(minutes=10)),
        state=ScheduleState(note="Repairs VPS drift, removes orphan VMs, fails stuck provisioning"),
    )
    try:
        await client.create_schedule(RECONCILE_SCHEDULE_ID, schedule)
        log.info("created schedule", extra={"schedule_id": RECONCILE_SCHEDULE_ID})
    except ScheduleAlreadyRunningError:
        pass


async def _ensure(client: Client, schedule_id: str, schedule: Schedule) -> None:
    """Create the schedule, or bring an existing one to this spec and action (settings may have changed)."""
    try:
        await client.create_schedule(schedule_id, schedule)
        log.info("created schedule", extra={"schedule_id": schedule_id})
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(schedule_id).update(lambda _inp: ScheduleUpdate(schedule=schedule))


async def ensure_metering_schedules(client: Client, task_queue: str, cycle: MeteringCycleInput,
                                    *, interval_s: int) -> bool:
    """`MeteringCycle` every `interval_s` and `CloseMonth` at 00:00 UTC on the 1st.

    `interval_s` 0: this worker creates no metering schedule (like RECONCILE_INTERVAL_S=0: a worker that
    sees only part of the fleet, or a test worker, must not meter); schedules made by others are left
    alone. Returns whether the schedules were ensured.
    """
    if interval_s <= 0:
        return False
    every = timedelta(seconds=interval_s)
    cycle = cycle.model_copy(update={"interval_s": interval_s, "until": None})
    await _ensure(client, METERING_SCHEDULE_ID, Schedule(
        action=ScheduleActionStartWorkflow(MeteringCycle.run, cycle, id="slopbox-metering-run", task_queue=task_queue),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        # A slow cycle is never stacked with the next one; the next covers the time it skipped.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=max(every, timedelta(minutes=1))),
        state=ScheduleState(note="Collects usage (provider metrics, local processes) into vps_usage_periods"),
    ))
    await _ensure(client, CLOSE_MONTH_SCHEDULE_ID, Schedule(
        action=ScheduleActionStartWorkflow(CloseMonth.run, CloseMonthInput(cycle=cycle), id="slopbox-close-month-run",
                                           task_queue=task_queue),
        spec=ScheduleSpec(cron_expressions=["0 0 1 * *"], time_zone_name="UTC"),
        # Run even after a long outage (a month must close), but only once.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.BUFFER_ONE, catchup_window=timedelta(days=27)),
        state=ScheduleState(note="Final collection of the month, rows frozen, one statement per user"),
    ))
    return True
