"""Per-request plan enforcement for the forward proxy (PRD §4.9, §8.3).

A user is refused when some usage this month is over the plan's limit AND the overage that
produces costs more than the user's overage budget for the month. A dimension whose overage
rate is 0 (the free plan) has no overage to buy: over its limit means refused. Usage is the sum
over the user's VPSes of `vps_usage_periods` plus the bytes this process has counted but not
flushed yet, so a burst cannot outrun the flush interval. The database part is cached per user
for a few seconds; the in-memory part is always current.

The decision is integer arithmetic, no floats, implemented once in `billing/overage.py` (shared
with metering and enforcement; its rounding rule is documented there) and re-exported here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.overage import (
    _UNITS_LCM,
    GB_HOUR_MB_SECONDS,
    GIB,
    HOUR_MS,
    UsageSnapshot,
    Verdict,
    overage_cost_cents,
    overage_verdict,
)
from billing.plans import effective_plan, month_start
from db.models import OverageBudget, User, Vps, VpsUsagePeriod
from proxy.metering import Meter

__all__ = ["GB_HOUR_MB_SECONDS", "GIB", "HOUR_MS", "UsageEnforcer", "UsageSnapshot", "Verdict", "_UNITS_LCM",
           "overage_cost_cents", "overage_verdict"]


class UsageEnforcer:
    def __init__(self, engine: AsyncEngine, meter: Meter, *, ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._meter = meter
        self._ttl = ttl_s
        self._clock = clock
        self._cache: dict[uuid.UUID, tuple[float, UsageSnapshot]] = {}

    async def check(self, user_id: uuid.UUID) -> Verdict:
        now = self._clock()
        hit = self._cache.get(user_id)
        if hit is None or hit[0] <= now:
            snapshot = await self._load(user_id)
            self._cache[user_id] = (now + self._ttl, snapshot)
            if len(self._cache) > 50_000:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        else:
            snapshot = hit[1]
        return overage_verdict(snapshot, self._meter.pending(set(snapshot.vps_ids)))

    async def _load(self, user_id: uuid.UUID) -> UsageSnapshot:
        period = month_start()
        async with AsyncSession(self._engine, expire_on_commit=False) as session:
            user = await session.get(User, user_id)
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
                select(OverageBudget.budget_cents).where(
                    OverageBudget.user_id == user_id, OverageBudget.period_start == period)
            )).first()
        return UsageSnapshot(
            plan=plan, budget_cents=int(budget or 0), vps_ids=frozenset(r[0] for r in rows),
            bandwidth_bytes=sum((r[1] or 0) + (r[2] or 0) for r in rows), cpu_ms=sum(r[3] or 0 for r in rows),
            memory_mb_seconds=sum(r[4] or 0 for r in rows), storage_bytes=sum(r[5] or 0 for r in rows),
        )
