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
)

from workflows.contracts import ReconcileInput
from workflows.lifecycle import Reconcile

log = logging.getLogger(__name__)
RECONCILE_SCHEDULE_ID = "slopbox-reconcile"


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
