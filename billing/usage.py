"""Loading one user's usage this period (summed over their VPSes) for the overage decision.

The proxy, the API's start route and the enforcement activity all read the same numbers here and
judge them with `billing.overage.overage_verdict`, so they can never disagree.
"""

from __future__ import annotations

import uuid
from datetime import date

from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.overage import UsageSnapshot, Verdict, overage_verdict
from billing.plans import effective_plan, month_start
from db.models import OverageBudget, User, Vps, VpsUsagePeriod


async def load_snapshot(session: AsyncSession, user_id: uuid.UUID, period: date | None = None,
                        *, user: User | None = None) -> UsageSnapshot:
    """`LookupError` when there is no such user."""
    period = period or month_start()
    user = user or await session.get(User, user_id)
    if user is None:
        raise LookupError("no such user")
    plan = await effective_plan(session, user)
    rows = (await session.exec(
        select(Vps.id, VpsUsagePeriod.bandwidth_in_bytes, VpsUsagePeriod.bandwidth_out_bytes,
               VpsUsagePeriod.cpu_ms, VpsUsagePeriod.memory_mb_seconds, VpsUsagePeriod.storage_bytes)
        .select_from(Vps)
        .outerjoin(VpsUsagePeriod, (VpsUsagePeriod.vps_id == Vps.id) & (VpsUsagePeriod.period_start == period))
        .where(Vps.user_id == user_id)
    )).all()
    budget = (await session.exec(
        select(OverageBudget.budget_cents, OverageBudget.revision).where(
            OverageBudget.user_id == user_id, OverageBudget.period_start == period)
    )).first()
    return UsageSnapshot(
        plan=plan, budget_cents=int(budget[0]) if budget else 0, vps_ids=frozenset(r[0] for r in rows),
        bandwidth_bytes=sum((r[1] or 0) + (r[2] or 0) for r in rows), cpu_ms=sum(r[3] or 0 for r in rows),
        memory_mb_seconds=sum(r[4] or 0 for r in rows), storage_bytes=sum(r[5] or 0 for r in rows),
        exempt=bool(user.usage_exempt), budget_revision=int(budget[1]) if budget else 0,
    )


async def current_verdict(session: AsyncSession, user: User) -> Verdict:
    """The decision for this month, as it stands in the database now."""
    return overage_verdict(await load_snapshot(session, user.id, user=user))  # type: ignore[arg-type]
