"""Per-request plan enforcement for the forward proxy (PRD §4.9, §8.3).

The decision itself is `billing.overage.overage_verdict` (the one the API's start route and the
`EnforceUsage` workflow use too, exemption included; its docstring states the rounding rule). Usage
is the sum over the user's VPSes of `vps_usage_periods` (`billing.usage.load_snapshot`) plus the
bytes this process has counted but not flushed yet, so a burst cannot outrun the flush interval.
The database part is cached per user for a few seconds; the in-memory part is always current.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.overage import (
    GB_HOUR_MB_SECONDS,
    GIB,
    HOUR_MS,
    UsageSnapshot,
    Verdict,
    overage_cost_cents,
    overage_verdict,
)
from billing.usage import load_snapshot
from proxy.metering import Meter

__all__ = ["GB_HOUR_MB_SECONDS", "GIB", "HOUR_MS", "UsageEnforcer", "UsageSnapshot", "Verdict", "overage_cost_cents",
           "overage_verdict"]


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
        async with AsyncSession(self._engine, expire_on_commit=False) as session:
            return await load_snapshot(session, user_id)
