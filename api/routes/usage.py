"""An agent's usage this month against the plan (PRD §4.9): limits are per user, so totals are too."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import CurrentUser, SessionDep
from api.routes.agents import owned_agent
from api.schemas import ResourceUsage, UsageDay, UsageOut, UsageResources, problem_responses
from billing.overage import UsageSnapshot, overage_cost_cents
from billing.plans import effective_plan
from metering.periods import epoch, month_of, next_month

router = APIRouter(prefix="/agents/{agent_id}", tags=["agents"])

_TOTALS = text("""
    SELECT u.vps_id, u.bandwidth_in_bytes + u.bandwidth_out_bytes, u.cpu_ms, u.memory_mb_seconds, u.storage_bytes,
           u.bandwidth_in_bytes, u.bandwidth_out_bytes
    FROM vps_usage_periods u JOIN vpses v ON v.id = u.vps_id
    WHERE v.user_id = :user AND u.period_start = :period
""")
_DAILY = text("""
    SELECT d.day, SUM(d.bandwidth_in_bytes + d.bandwidth_out_bytes), SUM(d.cpu_ms), SUM(d.memory_mb_seconds),
           SUM(d.storage_bytes), SUM(d.bandwidth_in_bytes), SUM(d.bandwidth_out_bytes)
    FROM vps_usage_daily d JOIN vpses v ON v.id = d.vps_id
    WHERE v.user_id = :user AND d.day >= :period AND d.day < :next
    GROUP BY d.day ORDER BY d.day
""")
_WATERMARKS = text("""
    SELECT MIN(s.collected_until), BOOL_OR(s.stale)
    FROM vps_meter_state s JOIN vpses v ON v.id = s.vps_id
    WHERE v.user_id = :user AND (v.destroyed_at IS NULL OR v.destroyed_at > s.collected_until)
""")
_BUDGET = text("SELECT budget_cents FROM overage_budgets WHERE user_id = :user AND period_start = :period")


@router.get("/usage", response_model=UsageOut, responses=problem_responses(404))
async def agent_usage(agent_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> UsageOut:
    """This month's bandwidth, CPU, memory and storage against the plan's limits, the overage so far and
    projected to the month's end (linear), the budget, and the daily series. Usage is counted by the
    metering cycle (every METERING_INTERVAL_S) and, for bandwidth, by the proxies as they carry it."""
    agent = await owned_agent(session, user, agent_id)
    plan = await effective_plan(session, user)
    now = datetime.now(UTC)
    period = month_of(int(now.timestamp()))
    end = next_month(period)
    params = {"user": user.id, "period": period}
    rows = (await session.exec(_TOTALS, params=params)).all()  # type: ignore[call-overload]
    used = [sum(int(r[i]) for r in rows) for i in range(1, 7)]
    mine = [sum(int(r[i]) for r in rows if r[0] == agent.vps_id) for i in range(1, 5)]
    budget = (await session.exec(_BUDGET, params=params)).first()  # type: ignore[call-overload]
    budget_cents = int(budget[0]) if budget else 0
    elapsed = max(1, int(now.timestamp()) - epoch(period))
    total = epoch(end) - epoch(period)
    projected = [u * total // elapsed for u in used]
    limits = [plan.max_bandwidth_bytes, plan.max_cpu_ms, plan.max_memory_mb_seconds, plan.max_storage_bytes]

    def resource(i: int) -> ResourceUsage:
        return ResourceUsage(used=used[i], limit=limits[i], projected=projected[i], over_limit=used[i] > limits[i],
                             agent_used=mine[i])

    def cost(v: list[int]) -> int:
        return overage_cost_cents(UsageSnapshot(plan, budget_cents, frozenset(), v[0], v[1], v[2], v[3]))

    daily = (await session.exec(_DAILY, params={**params, "next": end})).all()  # type: ignore[call-overload]
    marks = (await session.exec(_WATERMARKS, params=params)).first()  # type: ignore[call-overload]
    return UsageOut(
        period_start=period, period_end=end, as_of=now,
        collected_until=marks[0] if marks else None, stale=bool(marks[1]) if marks else False,
        resources=UsageResources(bandwidth_bytes=resource(0).model_copy(update={"used_in": used[4],
                                                                                 "used_out": used[5]}),
                                 cpu_ms=resource(1), memory_mb_seconds=resource(2),
                                 storage_bytes=resource(3)),
        overage_cost_cents=cost(used), projected_overage_cost_cents=cost(projected), budget_cents=budget_cents,
        daily=[UsageDay(day=d[0], bandwidth_bytes=int(d[1]), cpu_ms=int(d[2]), memory_mb_seconds=int(d[3]),
                        storage_bytes=int(d[4]), bandwidth_in_bytes=int(d[5]), bandwidth_out_bytes=int(d[6]))
               for d in daily],
    )
