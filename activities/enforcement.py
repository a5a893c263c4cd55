"""Usage enforcement activities for `EnforceUsage` (workflows/enforcement.py).

`evaluate_usage` judges each user in one transaction that holds the user's row lock (two runs of
the schedule judging the same user queue up behind each other): the decision from
billing/overage.py, the enforcement row, the threshold warnings and the stop notice are written
together or not at all. `stop_for_overage` submits one stop to a VPS's entity workflow with a
deterministic operation id, never twice (see its docstring).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from billing.overage import UsageSnapshot, Verdict, overage_verdict, warnings
from billing.plans import month_start
from billing.usage import load_snapshot
from db.models import Agent, UsageEnforcement, User, Vps, VpsOperation, VpsState, VpsUsagePeriod
from notifications.store import notify_user
from orchestration.search_attributes import run_attributes
from settings import Settings
from telemetry.metrics import ENFORCEMENT_STOPS
from workflows.contracts import (
    Act,
    EntityInput,
    EvaluateInput,
    EvaluateResult,
    OperationKind,
    OperationRequest,
    OverageStop,
    StopOutcome,
    Submitted,
    UserDecision,
    VpsRef,
)
from workflows.entity import ENTITY_RUN_TIMEOUT, VpsEntity, entity_id

log = logging.getLogger(__name__)


def overage_operation_id(user_id: Any, period: date, revision: int, vps_id: Any) -> str:
    """The stop's operation id: the same user, period, budget revision and VPS always give the same id.

    A raised budget is a new revision, so a user who goes over the new budget is stopped again.
    """
    digest = hashlib.sha256(f"{user_id}:{period.isoformat()}:{revision}".encode()).hexdigest()[:12]
    return f"stop-{vps_id}-overage-{digest}"


def _warning_text(label: str, threshold: int, used: str, limit: str, unit: str,
                  period: date) -> tuple[str, str]:
    title = f"{label[0].upper()}{label[1:]} at {threshold}% of your plan"
    body = (f"Your agents used {used} of the {limit} {unit} of {label} your plan includes for "
            f"{period:%B %Y} ({threshold}% or more).")
    if threshold >= 100:
        body += (" Usage beyond the plan is charged at the plan's overage rates up to your monthly overage "
                 "budget; past the budget your agents are stopped. Raise the budget with "
                 "PUT /users/me/overage-budget.")
    return title, body


class EnforcementActivities:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self.sessions = sessions

    def all(self) -> list[Any]:
        return [self.evaluate_usage, self.stop_for_overage]

    # --- the decision ------------------------------------------------------------------------------

    @activity.defn(name=Act.evaluate_usage)
    async def evaluate_usage(self, inp: EvaluateInput) -> EvaluateResult:
        """Judge the given users (all with usage this period when none are given); returns those with
        something to report (a stop, an exemption, new warnings)."""
        period = inp.period_start
        if inp.user_ids:
            user_ids = sorted({uuid.UUID(u) for u in inp.user_ids})
        else:
            async with self.sessions() as s:
                user_ids = list((await s.exec(
                    select(Vps.user_id).join(VpsUsagePeriod, col(VpsUsagePeriod.vps_id) == col(Vps.id))
                    .where(VpsUsagePeriod.period_start == period).distinct().order_by(col(Vps.user_id)))).all())
        result = EvaluateResult()
        past = period < month_start()
        for user_id in user_ids:
            activity.heartbeat(str(user_id))
            decision = await self._evaluate_user(user_id, period, past=past)
            if decision.decision != "ok" or decision.warnings:
                result.decisions.append(decision)
        log.info("usage evaluated", extra={"period": period.isoformat(), "users": len(user_ids),
                                           "stops": sum(len(d.stops) for d in result.decisions)})
        return result

    async def _evaluate_user(self, user_id: uuid.UUID, period: date, *, past: bool) -> UserDecision:
        async with self.sessions() as s, s.begin():
            user = (await s.exec(select(User).where(User.id == user_id).with_for_update())).first()
            if user is None:
                return UserDecision(user_id=str(user_id), decision="gone")
            snapshot = await load_snapshot(s, user_id, period, user=user)
            verdict = overage_verdict(snapshot)
            made = await self._warn(s, user_id, snapshot, period)
            decision = UserDecision(user_id=str(user_id), decision="ok", overage_cents=verdict.overage_cents,
                                    budget_cents=verdict.budget_cents, warnings=made)
            if verdict.allowed and not verdict.exempt:
                return decision
            if verdict.exempt:
                await self._record(s, user_id, period, snapshot, verdict, "exempt", [])
                decision.decision = "exempt"
                return decision
            if past:
                # A month already over is billed on its statement; nothing runs on it any more.
                decision.decision = "past-period"
                return decision
            running = (await s.exec(
                select(Vps.id, Agent.id).join(Agent, col(Agent.vps_id) == col(Vps.id), isouter=True)
                .where(Vps.user_id == user_id, Vps.state == VpsState.running).order_by(col(Vps.id)))).all()
            vps_ids = [str(v) for v, _ in running]
            new = await self._record(s, user_id, period, snapshot, verdict, "stop", vps_ids)
            if new:
                await self._stop_notice(s, user_id, period, snapshot.budget_revision, verdict, new)
            decision.decision = "stop"
            decision.stops = [
                OverageStop(vps=VpsRef(vps_id=str(v), agent_id=str(a) if a else "", user_id=str(user_id)),
                            operation_id=overage_operation_id(user_id, period, snapshot.budget_revision, v))
                for v, a in running]
            return decision

    async def _warn(self, s: AsyncSession, user_id: uuid.UUID, snapshot: UsageSnapshot, period: date) -> int:
        """The highest threshold each resource reached; each (period, resource, threshold) once."""
        made = 0
        for w in warnings(snapshot):
            title, body = _warning_text(w.label, w.threshold, w.used, w.limit, w.unit_name, period)
            new = await notify_user(
                s, user_id, kind="usage_warning", severity="critical" if w.threshold >= 100 else "warning",
                title=title, body=body, dedupe_key=f"usage:{period.isoformat()}:{w.resource}:{w.threshold}",
                data={"period_start": period.isoformat(), "resource": w.resource, "threshold": w.threshold,
                      "used": w.used, "limit": w.limit, "unit": w.unit_name})
            made += new is not None
        return made

    async def _record(self, s: AsyncSession, user_id: uuid.UUID, period: date, snapshot: UsageSnapshot,
                      verdict: Verdict, decision: str, vps_ids: list[str]) -> list[str]:
        """The enforcement row of this (user, period, revision); returns the VPSes new to it."""
        row = (await s.exec(select(UsageEnforcement).where(
            UsageEnforcement.user_id == user_id, UsageEnforcement.period_start == period,
            UsageEnforcement.budget_revision == snapshot.budget_revision))).first()
        now = datetime.now(UTC)
        if row is None:
            await s.exec(insert(UsageEnforcement).values(  # type: ignore[call-overload]
                user_id=user_id, period_start=period, budget_revision=snapshot.budget_revision, decision=decision,
                reason=verdict.reason or "", overage_cents=verdict.overage_cents, budget_cents=verdict.budget_cents,
                vps_ids=vps_ids))
            return vps_ids
        new = [v for v in vps_ids if v not in row.vps_ids]
        row.vps_ids = [*row.vps_ids, *new]
        row.decision, row.reason, row.overage_cents, row.updated_at = (
            decision, verdict.reason or "", verdict.overage_cents, now)
        s.add(row)
        return new

    async def _stop_notice(self, s: AsyncSession, user_id: uuid.UUID, period: date, revision: int,
                           verdict: Verdict, vps_ids: list[str]) -> None:
        fix = (f"Raise your overage budget to at least {verdict.overage_cents} cents with "
               "PUT /users/me/overage-budget, then start your agents again."
               if verdict.budget_can_fix else
               "Your plan has no overage for this resource: upgrade the plan, or wait for next month.")
        key = hashlib.sha256(",".join(sorted(vps_ids)).encode()).hexdigest()[:16]
        await notify_user(
            s, user_id, kind="overage_stop", severity="critical",
            title=f"{len(vps_ids)} agent VM(s) stopped: over your plan and overage budget",
            body=f"Your agents were stopped automatically: {verdict.reason}. {fix}",
            dedupe_key=f"stop:{period.isoformat()}:{revision}:{key}",
            data={"period_start": period.isoformat(), "vps_ids": vps_ids, "overage_cents": verdict.overage_cents,
                  "budget_cents": verdict.budget_cents, "required_budget_cents": verdict.required_budget_cents})

    # --- the stop ----------------------------------------------------------------------------------

    @activity.defn(name=Act.stop_for_overage)
    async def stop_for_overage(self, stop: OverageStop) -> StopOutcome:
        """Submit the stop to the VPS's entity workflow (update-with-start), exactly once.

        An operation id with a row in `vps_operations` was submitted before (the row is written right
        after the submit and by the stop's first activity): it is not sent again, even after the
        entity forgot it. Without a row, a repeat (a retried activity, a second run of the schedule)
        reaches an entity that still holds the operation, and it answers with the original.
        """
        ref = stop.vps
        async with self.sessions() as s:
            known = (await s.exec(select(VpsOperation.id).where(VpsOperation.id == stop.operation_id))).first()
            state = (await s.exec(select(Vps.state).where(Vps.id == uuid.UUID(ref.vps_id)))).first()
        if known is not None:
            return StopOutcome(operation_id=stop.operation_id, outcome="known")
        if state is None or state == VpsState.destroyed:
            return StopOutcome(operation_id=stop.operation_id, outcome="gone")
        req = OperationRequest(vps=ref, operation_id=stop.operation_id, operation=OperationKind.stop)
        start = WithStartWorkflowOperation(
            VpsEntity.run, EntityInput(vps=ref), id=entity_id(ref.vps_id), task_queue=activity.info().task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING, run_timeout=ENTITY_RUN_TIMEOUT,
            search_attributes=run_attributes(user_id=ref.user_id, agent_id=ref.agent_id or None,
                                             vps_id=ref.vps_id))
        try:
            submitted: Submitted = await activity.client().execute_update_with_start_workflow(
                VpsEntity.submit, req, start_workflow_operation=start)
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            kind = cause.type if isinstance(cause, ApplicationError) else None
            if kind == "Closed":
                return StopOutcome(operation_id=stop.operation_id, outcome="gone")
            if kind == "Conflict":
                return StopOutcome(operation_id=stop.operation_id, outcome="busy")
            raise ApplicationError(f"the entity refused the stop: {cause}", type="StopRefused") from None
        # The row (the stop's first activity may have written it already): `detail` says why it was stopped,
        # which GET /agents/{id}/operations shows.
        row = insert(VpsOperation).values(id=stop.operation_id, vps_id=ref.vps_id, user_id=ref.user_id,
                                          kind=OperationKind.stop, status="queued", detail={"reason": "overage"})
        async with self.sessions() as s, s.begin():
            await s.exec(row.on_conflict_do_update(  # type: ignore[call-overload]
                index_elements=["id"], set_={"detail": row.excluded.detail}))
        log.info("overage stop submitted", extra={"vps_id": ref.vps_id, "operation_id": stop.operation_id,
                                                  "new": submitted.new})
        if submitted.new:
            ENFORCEMENT_STOPS.inc()
        return StopOutcome(operation_id=stop.operation_id, outcome="submitted" if submitted.new else "known")
