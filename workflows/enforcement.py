"""`EnforceUsage`: judge users' usage against their plans, stop the over-budget ones, deliver the mail.

Started by `MeteringCycle` as a child after each collection (and directly by tests/operators) with
`EnforceUsageInput`. Three steps, each an idempotent activity, so a schedule that fires twice or a
worker that dies anywhere changes nothing:

1. `evaluate_usage`: per user, in one transaction, the decision (billing/overage.py), the
   enforcement row, the threshold warnings and the stop notice (unique dedupe keys: written once).
   It returns the VPSes to stop, each with an operation id derived from user, period, budget
   revision and VPS.
2. `stop_for_overage` per VPS: submits that stop to the VPS's entity workflow (update-with-start).
   The entity answers a repeated id with the original while it knows it; an id that already has a
   row in `vps_operations` ran (or runs) and is never submitted again. A VPS busy with another
   lifecycle operation is left to the next run, with the same id.
3. The email outbox: every pending notification (any writer's, e.g. the collector's alerts) is
   sent by `send_email`, which marks it sent in the same transaction that holds its row lock, so a
   retried or repeated send never mails twice. A send that keeps failing stays pending for the
   next run; the notification is in the API regardless.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

from workflows.contracts import (
    Act,
    EmailOutcome,
    EnforceUsageInput,
    EnforceUsageResult,
    EvaluateInput,
    EvaluateResult,
    OverageStop,
    StopOutcome,
)
from workflows.lifecycle import DB_RETRY, reason

STOP_BATCH = 20
"""Stops submitted at once: each is one update RPC to an entity workflow."""
EMAIL_BATCH = 10
OUTBOX_PAGE = 200
STOP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                         maximum_interval=timedelta(seconds=20), maximum_attempts=10,
                         non_retryable_error_types=["VpsError"])
EMAIL_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=500), backoff_coefficient=2.0,
                          maximum_interval=timedelta(seconds=10), maximum_attempts=4,
                          non_retryable_error_types=["EmailRejected"])
"""A few quick tries; an SMTP server down for longer is retried by the next run (the row stays pending)."""


@workflow.defn(name="EnforceUsage")
class EnforceUsage:
    @workflow.run
    async def run(self, inp: EnforceUsageInput) -> EnforceUsageResult:
        evaluated: EvaluateResult = await workflow.execute_activity(
            Act.evaluate_usage, EvaluateInput(period_start=inp.period_start, user_ids=inp.user_ids),
            start_to_close_timeout=timedelta(minutes=10), heartbeat_timeout=timedelta(seconds=60),
            retry_policy=DB_RETRY, result_type=EvaluateResult)
        result = EnforceUsageResult(decisions=evaluated.decisions)
        stops = [stop for d in evaluated.decisions for stop in d.stops]
        for i in range(0, len(stops), STOP_BATCH):
            batch = stops[i:i + STOP_BATCH]
            outcomes = await asyncio.gather(*(self._stop(stop) for stop in batch))
            result.stops.extend(outcomes)
        await self._deliver(result)
        return result

    async def _stop(self, stop: OverageStop) -> StopOutcome:
        try:
            outcome: StopOutcome = await workflow.execute_activity(
                Act.stop_for_overage, stop, start_to_close_timeout=timedelta(seconds=60), retry_policy=STOP_RETRY,
                result_type=StopOutcome)
            return outcome
        except ActivityError as err:
            workflow.logger.warning("overage stop not submitted", extra={"operation_id": stop.operation_id,
                                                                       "reason": reason(err)})
            return StopOutcome(operation_id=stop.operation_id, outcome=f"failed: {reason(err)}")

    async def _deliver(self, result: EnforceUsageResult) -> None:
        pending: list[str] = await workflow.execute_activity(
            Act.pending_emails, OUTBOX_PAGE, start_to_close_timeout=timedelta(seconds=30), retry_policy=DB_RETRY,
            result_type=list[str])
        for i in range(0, len(pending), EMAIL_BATCH):
            sent = await asyncio.gather(*(self._send(n) for n in pending[i:i + EMAIL_BATCH]))
            for outcome in sent:
                if outcome is None:
                    result.email_failures += 1
                else:
                    result.emails.append(outcome)

    async def _send(self, notification_id: str) -> EmailOutcome | None:
        try:
            outcome: EmailOutcome = await workflow.execute_activity(
                Act.send_email, notification_id, start_to_close_timeout=timedelta(seconds=60),
                retry_policy=EMAIL_RETRY, result_type=EmailOutcome)
            return outcome
        except ActivityError as err:
            workflow.logger.warning("email not sent; it stays in the outbox",
                                    extra={"notification_id": notification_id, "reason": reason(err)})
            return None
