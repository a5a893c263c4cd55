"""Byte metering per VPS: counted in memory, added to `vps_usage_periods` in batches.

Counting is a dict update per frame or chunk; the database sees one statement per flush for all
VPSes (an upsert that *adds* to the month's row, so any number of proxy processes add up). A
failed flush puts its counts back for the next one; `close()` flushes what is left at shutdown.

Direction is the VM's point of view: `inbound` = bytes delivered to the VM (browser requests,
responses the agent fetched), `outbound` = bytes the VM sent (gateway responses, agent uploads).

A busy stream can count in its own two integers instead of calling `add` per frame: it is an
attached source (`attach`), and the meter drains every source before it flushes or answers
`pending`, when the source is detached, and when a month ends (a timer at the boundary, armed by
`start`, so bytes stay in the month they were relayed in). The totals are exactly those `add` per
frame would give. `ConnectionBytes` is such a source for the plain HTTP answers of one browser
connection (the gateway proxy's fast front), whatever VPS each of its requests went to.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import time
import uuid
from datetime import UTC, date, datetime
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.plans import month_start

__all__ = ["ConnectionBytes", "Meter", "MeterSource"]

log = logging.getLogger(__name__)

_UPSERT = text(
    """
    INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes, bandwidth_out_bytes)
    SELECT t.vps_id, t.period_start, t.bytes_in, t.bytes_out
    FROM unnest(CAST(:ids AS uuid[]), CAST(:periods AS date[]), CAST(:ins AS bigint[]), CAST(:outs AS bigint[]))
         AS t(vps_id, period_start, bytes_in, bytes_out)
    WHERE EXISTS (SELECT 1 FROM vpses v WHERE v.id = t.vps_id)
    ORDER BY t.vps_id, t.period_start
    ON CONFLICT ON CONSTRAINT uq_vps_usage_periods_vps_month DO UPDATE
    SET bandwidth_in_bytes = vps_usage_periods.bandwidth_in_bytes + EXCLUDED.bandwidth_in_bytes,
        bandwidth_out_bytes = vps_usage_periods.bandwidth_out_bytes + EXCLUDED.bandwidth_out_bytes,
        updated_at = now()
    """
)


def _next_month_ts(start: date) -> float:
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return calendar.timegm(datetime(year, month, 1, tzinfo=UTC).timetuple())


class MeterSource(Protocol):
    """Something that counts its own bytes (an open WebSocket relay) and hands them over on demand."""

    def drain(self) -> tuple[uuid.UUID, int, int]:
        """(vps_id, inbound, outbound) counted since the last drain; the counts start again at zero."""
        ...


_CLOSED: object = object()
"""`ConnectionBytes.vps_id` once closed: never the VPS of a request, so every count takes the slow path."""


class ConnectionBytes:
    """A `MeterSource` for one connection's requests: bytes counted in two integers, drained by the
    meter like a relay's. Requests on one connection may go to different VPSes: a request for
    another VPS first hands what was counted for the previous one to `Meter.add`. Once closed
    (detached, its counts taken) any further count goes to `Meter.add` directly, so nothing counted
    after the connection ended is lost."""

    __slots__ = ("inbound", "meter", "outbound", "vps_id")

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.vps_id: uuid.UUID | object | None = None
        self.inbound = 0
        self.outbound = 0
        meter.attach(self)

    def count(self, vps_id: uuid.UUID, inbound: int = 0, outbound: int = 0) -> None:
        """Exactly `meter.add(vps_id, inbound=..., outbound=...)`, in the end."""
        if vps_id is not self.vps_id:  # another request's target (the same VPS, looked up again, is equal)
            if self.vps_id is _CLOSED:
                self.meter.add(vps_id, inbound=inbound, outbound=outbound)
                return
            if vps_id != self.vps_id:
                previous, before_in, before_out = self.drain()
                if before_in or before_out:
                    self.meter.add(previous, inbound=before_in, outbound=before_out)  # type: ignore[arg-type]
            self.vps_id = vps_id
        self.inbound += inbound
        self.outbound += outbound

    def drain(self) -> tuple[uuid.UUID, int, int]:
        counts = (self.vps_id, self.inbound, self.outbound)
        self.inbound = self.outbound = 0
        return counts  # type: ignore[return-value]

    def close(self) -> None:
        """The connection ended: what is left goes to the meter now."""
        if self.vps_id is not _CLOSED:
            self.meter.detach(self)
            self.vps_id = _CLOSED


class Meter:
    def __init__(self, engine: AsyncEngine, *, flush_interval_s: float = 5.0) -> None:
        self._engine = engine
        self.flush_interval_s = flush_interval_s
        self._pending: dict[tuple[uuid.UUID, date], list[int]] = {}
        self._month = month_start()
        self._month_ends = _next_month_ts(self._month)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._sources: set[MeterSource] = set()
        self._month_timer: asyncio.TimerHandle | None = None

    def _current_month(self) -> date:
        if time.time() >= self._month_ends:
            self._drain_into(self._month)  # what the sources counted so far is the ending month's
            self._month = month_start()
            self._month_ends = _next_month_ts(self._month)
        return self._month

    # -- sources: streams that count in place -----------------------------------------------------

    def attach(self, source: MeterSource) -> None:
        """From now on `source`'s counts are drained into the meter (see the module docstring)."""
        self._sources.add(source)

    def detach(self, source: MeterSource) -> None:
        """The source is done: what it counted last is added now."""
        if source in self._sources:
            self._sources.discard(source)
            self._take(source, self._current_month())

    def drain_sources(self) -> None:
        """Every attached source's counts into the current month."""
        month = self._current_month()
        for source in self._sources:
            self._take(source, month)

    def _drain_into(self, month: date) -> None:
        for source in self._sources:
            self._take(source, month)

    def _take(self, source: MeterSource, month: date) -> None:
        vps_id, inbound, outbound = source.drain()
        if inbound or outbound:
            self._drained((vps_id, month), inbound, outbound)

    def _drained(self, key: tuple[uuid.UUID, date], inbound: int, outbound: int) -> None:
        """Bytes a source counted, taken in (a subclass may count them elsewhere too, as `add`)."""
        self.add_for(key, inbound, outbound)

    def _month_boundary(self) -> None:
        """At the end of a month: drain the sources into it, then wait for the next one."""
        self._current_month()
        self._arm_month_timer()

    def _arm_month_timer(self) -> None:
        delay = max(0.0, self._month_ends - time.time())
        self._month_timer = asyncio.get_running_loop().call_later(delay, self._month_boundary)

    def add(self, vps_id: uuid.UUID, *, inbound: int = 0, outbound: int = 0) -> None:
        if not inbound and not outbound:
            return
        key = (vps_id, self._current_month())
        counts = self._pending.get(key)
        if counts is None:
            self._pending[key] = [inbound, outbound]
        else:
            counts[0] += inbound
            counts[1] += outbound

    def pending(self, vps_ids: set[uuid.UUID]) -> int:
        """Unflushed bytes (both directions) this month for these VPSes: enforcement adds them."""
        self.drain_sources()
        month = self._current_month()
        return sum(c[0] + c[1] for (vps, m), c in self._pending.items() if m == month and vps in vps_ids)

    async def flush(self) -> None:
        async with self._lock:
            self.drain_sources()
            batch, self._pending = self._pending, {}
            if not batch:
                return
            keys = sorted(batch, key=lambda k: (str(k[0]), k[1]))
            params = {
                "ids": [k[0] for k in keys],
                "periods": [k[1] for k in keys],
                "ins": [batch[k][0] for k in keys],
                "outs": [batch[k][1] for k in keys],
            }
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(_UPSERT, params)
            except Exception:
                for key, (inbound, outbound) in batch.items():
                    self.add_for(key, inbound, outbound)
                raise

    def add_for(self, key: tuple[uuid.UUID, date], inbound: int, outbound: int) -> None:
        counts = self._pending.setdefault(key, [0, 0])
        counts[0] += inbound
        counts[1] += outbound

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except Exception:
                log.warning("usage flush failed; counts kept for the next flush", exc_info=True)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="meter-flush")
        if self._month_timer is None:
            self._arm_month_timer()

    async def close(self) -> None:
        """Stop the periodic flush and write what is left (shutdown must not lose bytes)."""
        if self._month_timer is not None:
            self._month_timer.cancel()
            self._month_timer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for attempt in range(3):
            try:
                await self.flush()
                return
            except Exception:
                log.warning("final usage flush failed (attempt %d)", attempt + 1, exc_info=True)
                await asyncio.sleep(0.5 * (attempt + 1))
        lost = sum(c[0] + c[1] for c in self._pending.values())
        log.error("usage counts could not be written at shutdown", extra={"bytes": lost,
                                                                         "vpses": len(self._pending)})
