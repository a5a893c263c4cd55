"""Metering workflows: `MeteringCycle` (every METERING_INTERVAL_S) and `CloseMonth` (00:00 UTC on the 1st).

Deterministic orchestration only; the activities (activities/metering.py) do the HTTP and the
database. A cycle plans batches of due VPSes, collects them a few batches at a time, and never
lets one VPS (or one batch) stop the others: a failed VPS keeps its watermark and is asked again
next cycle. Hetzner requests are rationed per cycle from `hetzner_requests_per_hour` (the share of
the project's 3,600/hour the lifecycle leaves to metering); a 429 defers the rest of the round
until the provider's `Retry-After` has passed, at most `max_rate_waits` times per cycle. A provider
that cannot be reached at all raises an admin alert in the result and stops nobody (PRD §8.3).
"""

from __future__ import annotations

from datetime import date, timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

from metering.periods import epoch, month_of, month_start_date, next_month, previous_month

ENFORCE_USAGE_WORKFLOW = "EnforceUsage"
"""Started by name at the end of a cycle when `start_enforcement` is set (defined by the enforcement module)."""


class MeteringAct:
    plan = "metering.plan"
    collect_batch = "metering.collect_batch"
    report_problems = "metering.report_problems"
    close_month = "metering.close_month"


class MeteringCycleInput(BaseModel):
    until: int | None = Field(default=None, description="collect up to this Unix time; default: now")
    interval_s: int = Field(default=3600, ge=1)
    batch_size: int = Field(default=50, ge=1)
    fly_batch_size: int = Field(default=1000, ge=1)
    parallel_batches: int = Field(default=4, ge=1)
    hetzner_requests_per_hour: int = Field(default=1800, ge=0)
    max_rate_waits: int = Field(default=3, ge=0)
    start_enforcement: bool = False
    """Start the `EnforceUsage` child at the end (`METERING_ENFORCE`)."""
    heartbeat_s: int = Field(default=60, ge=1, description="a worker that died mid-batch is noticed after this")


class BatchSpecIn(BaseModel):
    kind: str
    after_id: str | None = None
    last_id: str = ""
    count: int = 0
    max_collected_until: int | None = None
    ids: list[str] | None = None
    """A retry of deferred VPSes names them."""


class PlanIn(BaseModel):
    until: int
    batch_size: int
    fly_batch_size: int
    hetzner_limit: int | None


class PlanOut(BaseModel):
    batches: list[BatchSpecIn] = Field(default_factory=list)
    due: int = 0
    deferred: dict[str, int] = Field(default_factory=dict)


class CollectBatchIn(BaseModel):
    spec: BatchSpecIn
    until: int
    max_requests: int | None = None


class FailedVps(BaseModel):
    vps_id: str
    user_id: str
    reason: str


class BatchReport(BaseModel):
    kind: str
    vpses: int = 0
    written: int = 0
    lost_race: int = 0
    failed: list[FailedVps] = Field(default_factory=list)
    stale: dict[str, str] = Field(default_factory=dict)
    deferred_ids: list[str] = Field(default_factory=list)
    requests: int = 0
    retry_after_s: float | None = None
    unavailable: str | None = None
    users_changed: list[str] = Field(default_factory=list)
    statements: int = 0


class ProviderAlert(BaseModel):
    provider: str
    message: str


class MeteringReport(BaseModel):
    """The cycle's outcome, as shown in the Temporal UI (and logged)."""

    until: int
    period_start: str
    due: int = 0
    written: int = 0
    lost_race: int = 0
    failed: list[FailedVps] = Field(default_factory=list)
    stale: dict[str, str] = Field(default_factory=dict)
    deferred: dict[str, int] = Field(default_factory=dict)
    requests: dict[str, int] = Field(default_factory=dict)
    rate_waits: int = 0
    alerts: list[ProviderAlert] = Field(default_factory=list)
    """Provider unavailable: for the admins. Nobody is stopped for it."""
    failed_batches: int = 0
    users_changed: list[str] = Field(default_factory=list)
    statements: int = 0
    enforcement_started: bool = False


class CloseMonthInput(BaseModel):
    period_start: str | None = Field(default=None, description="YYYY-MM-01 to close; default: the previous month")
    settle_s: int = Field(default=120, ge=0, description="wait this long after the boundary for provider data")
    cycle: MeteringCycleInput = Field(default_factory=MeteringCycleInput)


class CloseMonthReport(BaseModel):
    period_start: str
    final_cycle: MeteringReport | None = None
    statements: int = 0
    overage_cents: int = 0


_ACTIVITY_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_attempts=3)


def _collect(inp: CollectBatchIn, heartbeat_s: int) -> workflow.ActivityHandle[BatchReport]:
    """Scheduled at once (a handle, not a coroutine), so a group of batches runs concurrently."""
    return workflow.start_activity(
        MeteringAct.collect_batch, inp, result_type=BatchReport, start_to_close_timeout=timedelta(minutes=10),
        heartbeat_timeout=timedelta(seconds=heartbeat_s), retry_policy=_ACTIVITY_RETRY)


@workflow.defn(name="MeteringCycle")
class MeteringCycle:
    @workflow.run
    async def run(self, inp: MeteringCycleInput) -> MeteringReport:
        until = inp.until if inp.until is not None else int(workflow.now().timestamp())
        hetzner_budget = inp.hetzner_requests_per_hour * inp.interval_s // 3600
        plan: PlanOut = await workflow.execute_activity(
            MeteringAct.plan, PlanIn(until=until, batch_size=inp.batch_size, fly_batch_size=inp.fly_batch_size,
                                     hetzner_limit=hetzner_budget),
            result_type=PlanOut, start_to_close_timeout=timedelta(minutes=5), retry_policy=_ACTIVITY_RETRY)
        report = MeteringReport(until=until, period_start=month_start_date(until), due=plan.due,
                                deferred=dict(plan.deferred))
        users: set[str] = set()
        hetzner_left = hetzner_budget
        pending = list(plan.batches)
        while True:
            deferred: dict[str, list[str]] = {}
            wait_s = 0.0
            for i in range(0, len(pending), inp.parallel_batches):
                group = pending[i:i + inp.parallel_batches]
                calls = []
                for spec in group:
                    cap = None
                    if spec.kind == "hetzner":
                        cap = min(hetzner_left, spec.count if spec.ids is None else len(spec.ids))
                        hetzner_left -= cap
                    calls.append(_collect(CollectBatchIn(spec=spec, until=until, max_requests=cap), inp.heartbeat_s))
                for spec, outcome in zip(group, await _gather(calls), strict=True):
                    if isinstance(outcome, BaseException):
                        report.failed_batches += 1
                        workflow.logger.warning("metering batch failed", extra={"kind": spec.kind,
                                                                                "error": str(outcome)})
                        continue
                    self._merge(report, outcome, users)
                    if outcome.deferred_ids:
                        deferred.setdefault(spec.kind, []).extend(outcome.deferred_ids)
                    wait_s = max(wait_s, outcome.retry_after_s or 0.0)
                    if spec.kind == "hetzner" and spec.ids is None:
                        hetzner_left += max(0, (spec.count - outcome.requests))  # unused share goes back
            budget_left = hetzner_left > 0 or "hetzner" not in deferred
            if not deferred or report.rate_waits >= inp.max_rate_waits or not budget_left or wait_s <= 0:
                for kind, ids in deferred.items():
                    report.deferred[kind] = report.deferred.get(kind, 0) + len(ids)
                break
            report.rate_waits += 1
            await workflow.sleep(timedelta(seconds=wait_s))
            pending = [BatchSpecIn(kind=kind, ids=ids[j:j + inp.batch_size], count=len(ids[j:j + inp.batch_size]))
                       for kind, ids in deferred.items() for j in range(0, len(ids), inp.batch_size)]
        report.users_changed = sorted(users)
        if report.alerts or report.failed:
            await workflow.execute_activity(MeteringAct.report_problems, report,
                                            start_to_close_timeout=timedelta(minutes=1), retry_policy=_ACTIVITY_RETRY)
        workflow.logger.info("metering cycle done", extra={
            "until": until, "due": report.due, "written": report.written, "failed": len(report.failed),
            "deferred": report.deferred, "alerts": len(report.alerts), "stale": len(report.stale)})
        if inp.start_enforcement and report.users_changed:
            try:
                await workflow.start_child_workflow(
                    ENFORCE_USAGE_WORKFLOW, {"period_start": report.period_start, "user_ids": report.users_changed},
                    id=f"enforce-usage-{until}", parent_close_policy=ParentClosePolicy.ABANDON)
                report.enforcement_started = True
            except WorkflowAlreadyStartedError:  # a racing cycle for the same instant already started it
                pass
        return report

    @staticmethod
    def _merge(report: MeteringReport, b: BatchReport, users: set[str]) -> None:
        report.written += b.written
        report.lost_race += b.lost_race
        report.failed.extend(b.failed)
        report.stale.update(b.stale)
        report.requests[b.kind] = report.requests.get(b.kind, 0) + b.requests
        report.statements += b.statements
        users.update(b.users_changed)
        if b.unavailable and not any(a.provider == b.kind and a.message == b.unavailable for a in report.alerts):
            report.alerts.append(ProviderAlert(provider=b.kind, message=b.unavailable))


async def _gather(calls: list[workflow.ActivityHandle[BatchReport]]) -> list[BatchReport | BaseException]:
    out: list[BatchReport | BaseException] = []
    for call in calls:  # already scheduled: awaiting in order does not serialise them
        try:
            out.append(await call)
        except ActivityError as err:
            out.append(err)
    return out


@workflow.defn(name="CloseMonth")
class CloseMonth:
    """Final collection up to the boundary, the month's rows frozen, one statement per user.

    Counters start from zero in the new month (new rows), so limits and usage thresholds begin
    afresh; statements are written once per user and month, so a second run adds nothing.
    """

    @workflow.run
    async def run(self, inp: CloseMonthInput) -> CloseMonthReport:
        now = int(workflow.now().timestamp())
        if inp.period_start is not None:
            period = month_of(epoch(date.fromisoformat(inp.period_start)))
        else:
            period = previous_month(month_of(now))
        boundary = epoch(next_month(period))
        if now < boundary + inp.settle_s:
            await workflow.sleep(timedelta(seconds=boundary + inp.settle_s - now))
        report = CloseMonthReport(period_start=period.isoformat())
        cycle = inp.cycle.model_copy(update={"until": boundary + inp.settle_s, "start_enforcement": False})
        try:
            report.final_cycle = await workflow.execute_child_workflow(
                MeteringCycle.run, cycle, id=f"metering-final-{period.isoformat()}", result_type=MeteringReport)
        except ChildWorkflowError as err:
            workflow.logger.warning("final collection failed; closing with what is counted",
                                    extra={"error": str(err)})
        statements, cents = await workflow.execute_activity(
            MeteringAct.close_month, period.isoformat(), result_type=tuple[int, int],
            start_to_close_timeout=timedelta(minutes=10), retry_policy=_ACTIVITY_RETRY)
        report.statements, report.overage_cents = statements, cents
        return report
