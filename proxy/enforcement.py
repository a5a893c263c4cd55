"""Per-request plan enforcement for the forward proxy (PRD §4.9, §8.3).

A user is refused when some usage this month is over the plan's limit AND the overage that
produces costs more than the user's overage budget for the month. A dimension whose overage
rate is 0 (the free plan) has no overage to buy: over its limit means refused. Usage is the sum
over the user's VPSes of `vps_usage_periods` plus the bytes this process has counted but not
flushed yet, so a burst cannot outrun the flush interval. The database part is cached per user
for a few seconds; the in-memory part is always current.

The decision is integer arithmetic, no floats: usage in bytes, milliseconds and MB-seconds,
rates in whole cents per unit. Rounding rule: the overage cost is the exact sum over dimensions of
`(used - limit) * rate / unit`, rounded up to a whole cent once (`overage_cost_cents`); a user
is refused when that exceeds the budget, which (the budget being whole cents) is the same as the
exact cost exceeding it. Computed on a common denominator (`_UNITS_LCM`), so a cost that is
exactly the budget is allowed (floats made some of those 1e-15 over, and refused).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.plans import effective_plan, month_start
from db.models import OverageBudget, Plan, User, Vps, VpsUsagePeriod
from proxy.metering import Meter

__all__ = ["UsageEnforcer", "UsageSnapshot", "Verdict", "overage_cost_cents", "overage_verdict"]

GIB = 1024**3
HOUR_MS = 3_600_000
GB_HOUR_MB_SECONDS = 1024 * 3600
_UNITS_LCM = math.lcm(GIB, HOUR_MS, GB_HOUR_MB_SECONDS)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None


@dataclass(frozen=True)
class UsageSnapshot:
    plan: Plan
    budget_cents: int
    vps_ids: frozenset[uuid.UUID]
    bandwidth_bytes: int
    cpu_ms: int
    memory_mb_seconds: int
    storage_bytes: int


def _dimensions(s: UsageSnapshot, extra_bandwidth: int) -> list[tuple[str, int, int, int, int, str]]:
    """(name, used, limit, rate in cents per unit, unit, unit name), all integers."""
    p = s.plan
    return [
        ("bandwidth", s.bandwidth_bytes + extra_bandwidth, p.max_bandwidth_bytes,
         p.overage_bandwidth_cost_per_gb_cents, GIB, "GiB"),
        ("storage", s.storage_bytes, p.max_storage_bytes, p.overage_storage_cost_per_gb_cents, GIB, "GiB"),
        ("CPU time", s.cpu_ms, p.max_cpu_ms, p.overage_cpu_cost_per_hour_cents, HOUR_MS, "hours"),
        ("memory", s.memory_mb_seconds, p.max_memory_mb_seconds, p.overage_memory_cost_per_gb_hour_cents,
         GB_HOUR_MB_SECONDS, "GB-hours"),
    ]


def _scaled_overage(s: UsageSnapshot, extra_bandwidth: int) -> int:
    """The exact overage cost in cents, times `_UNITS_LCM` (an integer: every unit divides it)."""
    return sum((used - limit) * rate * (_UNITS_LCM // unit)
               for _name, used, limit, rate, unit, _unit_name in _dimensions(s, extra_bandwidth) if used > limit)


def overage_cost_cents(s: UsageSnapshot, extra_bandwidth: int = 0) -> int:
    """This month's overage cost in whole cents, rounded up once over the exact sum (the rounding rule)."""
    return -(-_scaled_overage(s, extra_bandwidth) // _UNITS_LCM)


def _amount(n: int, unit: int) -> str:
    """`n / unit` with two decimals (truncated), without floats."""
    hundredths = n * 100 // unit
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def overage_verdict(s: UsageSnapshot, extra_bandwidth: int = 0) -> Verdict:
    over: list[str] = []
    for name, used, limit, rate, unit, unit_name in _dimensions(s, extra_bandwidth):
        if used <= limit:
            continue
        over.append(f"{name} {_amount(used, unit)} of {_amount(limit, unit)} {unit_name}")
        if rate == 0:
            return Verdict(False, f"over the plan's {name} limit ({over[-1]}) and the plan has no overage for it")
    if over and _scaled_overage(s, extra_bandwidth) > s.budget_cents * _UNITS_LCM:
        cost = overage_cost_cents(s, extra_bandwidth)
        return Verdict(False, f"over the plan's limits ({'; '.join(over)}): overage {cost} cents (rounded up) "
                              f"exceeds this month's overage budget of {s.budget_cents} cents")
    return Verdict(True)


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
