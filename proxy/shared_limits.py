"""Per-user token buckets shared by all proxy processes, through PostgreSQL (`PROXY_PROCESSES` > 1).

Why: with N processes each enforcing its own in-memory bucket, a user whose connections spread
over them got N times the limit. The bucket now lives in one row of `proxy_rate_buckets`
(UNLOGGED), updated by a single upsert that refills it by the elapsed time and grants tokens.

Cost: a process does not ask for every request. It leases a slice (`lease_s` worth of the rate,
at most a quarter of the burst, at least what the requests waiting for it need: a page load's
burst of asset requests costs one statement, not one per slice) and spends it from memory, so
a steady user costs one statement per slice, not per request: for the HTTP limit (50/s, burst
300) one statement per 10 requests. A refusal is remembered until the bucket could allow the
request again, so a user who is over the limit costs one statement per Retry-After, whatever
they send. Leased tokens that a process does not use within `lease_ttl_s` are dropped, not
returned: the limit is never exceeded across processes; at worst a user spreading requests over
N processes sees a 429 up to (N-1) slices early.

If PostgreSQL cannot be asked, the request is refused with a short Retry-After (fail closed),
as the session lookup before it would have failed too. Statements go over one dedicated
connection per process (`BucketStore`), prepared: about 0.4 ms of CPU each here, where a pooled
SQLAlchemy checkout (ping, statement, commit) cost about three times that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["BucketStore", "SharedRateLimiter"]

log = logging.getLogger(__name__)

# avail = the bucket refilled for the time since its last use; grant = what this process leases.
# (Written out twice: SET expressions cannot refer to each other.)
_AVAIL = "LEAST(%(burst)s, b.tokens + %(rate)s * GREATEST(0, EXTRACT(EPOCH FROM now() - b.stamp)))"
_GRANT = f"CASE WHEN {_AVAIL} >= %(need)s THEN LEAST(%(want)s, {_AVAIL}) ELSE 0 END"
_TAKE = (  # constants only: every value is a bound parameter
    "INSERT INTO proxy_rate_buckets AS b (key, tokens, granted, stamp) "  # noqa: S608 (no input)
    "VALUES (%(key)s, %(burst)s - LEAST(%(want)s, %(burst)s), LEAST(%(want)s, %(burst)s), now()) "
    f"ON CONFLICT (key) DO UPDATE SET tokens = {_AVAIL} - {_GRANT}, granted = {_GRANT}, stamp = now() "
    "RETURNING granted, tokens"
)
_SWEEP = ("DELETE FROM proxy_rate_buckets WHERE key LIKE %(prefix)s "
          "AND stamp < now() - make_interval(secs => %(full_s)s)")
_SWEEP_EVERY_S = 60.0
_DB_FAILURE_RETRY_S = 1.0


class BucketStore:
    """One dedicated PostgreSQL connection for the buckets, with the upsert prepared.

    Why not the engine's pool: a checkout there pings first and goes through SQLAlchemy, about
    three times the CPU and round trips of the statement itself; the buckets are hot."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.AsyncConnection[tuple[float, ...]] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def for_engine(cls, engine: AsyncEngine) -> BucketStore:
        return cls(engine.url.set(drivername="postgresql").render_as_string(hide_password=False))

    async def execute(self, sql: str, params: dict[str, object]) -> tuple[float, ...] | None:
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True, connect_timeout=5)
            try:
                cur = await self._conn.execute(sql, params, prepare=True)  # type: ignore[arg-type]
                return await cur.fetchone() if cur.description is not None else None
            except psycopg.Error:
                await self.close()
                raise

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


@dataclass
class _Lease:
    tokens: float
    until: float


class SharedRateLimiter:
    """The `RateLimiter` interface (`take`), with the bucket in PostgreSQL and slices leased locally."""

    def __init__(self, store: BucketStore | AsyncEngine, kind: str, rate: float, burst: int, *, lease_s: float = 0.2,
                 lease_ttl_s: float = 1.0, lease: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.kind = kind
        self.store = store if isinstance(store, BucketStore) else BucketStore.for_engine(store)
        self._lease = lease if lease is not None else max(1.0, min(burst / 4, rate * lease_s))
        self._lease_ttl = lease_ttl_s
        self._clock = clock
        self._local: dict[Hashable, _Lease] = {}
        self._denied: dict[Hashable, float] = {}
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._waiting: dict[Hashable, int] = {}
        """Takers queued per key: one statement leases for all of them (a page load's burst)."""
        self._last_sweep = clock()
        self.statements = 0
        """Upserts sent (what the leases cost); read by the bench and tests."""

    def acquire_now(self, key: Hashable, cost: float = 1.0) -> float | None:
        """From this process's lease or a remembered refusal; None when PostgreSQL must be asked."""
        now = self._clock()
        lease = self._local.get(key)
        if lease is not None and lease.until > now and lease.tokens >= cost:
            lease.tokens -= cost
            return 0.0
        until = self._denied.get(key)
        if until is not None:
            if until > now:
                return until - now
            del self._denied[key]
        return None

    async def take(self, key: Hashable, cost: float = 1.0) -> float:
        """0.0 when allowed (and charged); otherwise the seconds to wait before asking again."""
        decided = self.acquire_now(key, cost)
        if decided is not None:
            return decided
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            async with lock:  # one statement per key at a time; the others use what it leased
                return await self._take_locked(key, cost)
        finally:
            left = self._waiting.pop(key) - 1
            if left:
                self._waiting[key] = left

    async def _take_locked(self, key: Hashable, cost: float) -> float:
        now = self._clock()
        lease = self._local.get(key)
        if lease is not None and lease.until <= now:
            lease = None
            del self._local[key]
        if lease is not None and lease.tokens >= cost:
            lease.tokens -= cost
            return 0.0
        held = lease.tokens if lease is not None else 0.0
        need = min(cost, float(self.burst)) - held
        try:
            row = await self.store.execute(_TAKE, {"key": f"{self.kind}:{key}", "rate": self.rate,
                                                   "burst": float(self.burst), "need": need,
                                                   "want": max(need, self._lease,
                                                               self._waiting.get(key, 1) * cost)})
            assert row is not None
        except Exception:
            log.warning("shared rate limit unavailable; refusing", exc_info=True)
            return _DB_FAILURE_RETRY_S
        finally:
            self.statements += 1
        granted, left = float(row[0]), float(row[1])
        if now - self._last_sweep > _SWEEP_EVERY_S:
            self._last_sweep = now
            self._sweep_soon()
        if len(self._local) > 10_000 or len(self._locks) > 10_000:  # memory follows active users
            live = self._clock()
            self._local = {k: v for k, v in self._local.items() if v.until > live}
            self._denied = {k: v for k, v in self._denied.items() if v > live}
            self._locks = {k: v for k, v in self._locks.items() if v.locked()}
        if granted <= 0:
            wait = (need - left) / self.rate if self.rate > 0 else math.inf
            if math.isfinite(wait):
                self._denied[key] = self._clock() + wait
            return wait
        self._local[key] = _Lease(held + granted - min(cost, float(self.burst)), self._clock() + self._lease_ttl)
        return 0.0

    def _sweep_soon(self) -> None:
        """Drop rows whose bucket is full again (as the in-memory limiter does), in the background."""
        async def sweep() -> None:
            try:
                await self.store.execute(_SWEEP, {"prefix": f"{self.kind}:%",
                                                  "full_s": self.burst / self.rate if self.rate > 0 else 3600.0})
            except Exception:
                log.warning("shared rate limit sweep failed", exc_info=True)

        task = asyncio.create_task(sweep())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()
