"""Per-user rate and connection limits, in memory.

A token bucket per (kind, user) for requests and a counter per (kind, user) for open
connections. Buckets that are full again are dropped, so memory follows active users only.
With several proxy processes the rate buckets are shared through PostgreSQL instead
(`proxy.shared_limits`, same `take` interface); connection counts stay per process.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ConnectionLimiter", "RateLimiter", "TokenBucket", "pace", "retry_after_header", "take"]


class TokenBucket(Protocol):
    """What the proxy charges requests, frames and bytes to: in memory or shared (proxy.shared_limits)."""

    rate: float
    burst: int

    def acquire_now(self, key: Hashable, cost: float = 1.0) -> float | None:
        """Decided from memory: 0.0 (allowed, charged) or the wait; None when only `take` can tell."""
        ...

    async def take(self, key: Hashable, cost: float = 1.0) -> float: ...


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket: `rate` tokens per second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}
        self._last_sweep = clock()

    def acquire(self, key: Hashable, cost: float = 1.0) -> float:
        """0.0 when allowed; otherwise the seconds to wait before this would be allowed."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if now - self._last_sweep > 60.0:
            self._sweep(now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate if self.rate > 0 else math.inf

    def acquire_now(self, key: Hashable, cost: float = 1.0) -> float | None:
        return self.acquire(key, cost)

    async def take(self, key: Hashable, cost: float = 1.0) -> float:
        """`acquire` behind the shared limiter's interface (no await happens here)."""
        return self.acquire(key, cost)

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]


class ConnectionLimiter:
    """At most `limit` open connections per key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[Hashable, int] = {}

    def try_acquire(self, key: Hashable) -> bool:
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: Hashable) -> None:
        count = self._open.get(key, 0) - 1
        if count <= 0:
            self._open.pop(key, None)
        else:
            self._open[key] = count

    def open_count(self, key: Hashable) -> int:
        return self._open.get(key, 0)


async def take(limiter: TokenBucket, key: Hashable, cost: float = 1.0) -> float:
    """`limiter.take`, without a coroutine per call when memory decides (the per-frame path)."""
    wait = limiter.acquire_now(key, cost)
    return wait if wait is not None else await limiter.take(key, cost)


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds))) if math.isfinite(seconds) else "60"


async def pace(limiter: TokenBucket, key: Hashable, cost: float) -> float:
    """Wait until `limiter` allows `cost` for `key`, then charge it; returns the seconds waited.

    For byte budgets on a stream: the caller stops reading meanwhile, so TCP pushes back on the
    sender instead of anything being refused. `cost` is capped at the burst so it always passes.
    """
    cost = min(cost, float(limiter.burst))
    waited = 0.0
    while (wait := await take(limiter, key, cost)) > 0:
        step = min(wait, 1.0)
        await asyncio.sleep(step)
        waited += step
    return waited
