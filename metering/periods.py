"""Calendar arithmetic for metering, pure and integer: months and days in UTC, sample splitting.

Times are whole Unix seconds. A sample is an amount of usage over `[start, end)`; a sample that
straddles a day (hence possibly a month) boundary is split in proportion to the seconds on each
side, with floors taken on the running total (`part_k = floor(A*c_k/D) - floor(A*c_{k-1}/D)`), so
the parts always add up to the whole amount exactly: splitting never creates or loses a unit.
Storage accrues the same way from the start of the month, so a VPS that exists for a whole month
has exactly its allocation in `storage_bytes` at the end of it.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

DAY_S = 86_400


def month_of(ts: int) -> date:
    d = datetime.fromtimestamp(ts, UTC)
    return date(d.year, d.month, 1)


def next_month(m: date) -> date:
    return date(m.year + 1, 1, 1) if m.month == 12 else date(m.year, m.month + 1, 1)


def epoch(d: date) -> int:
    return calendar.timegm(d.timetuple())


def month_seconds(m: date) -> int:
    return epoch(next_month(m)) - epoch(m)


def day_of(ts: int) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


@dataclass
class Amounts:
    """Usage in billing units (all integers)."""

    cpu_ms: int = 0
    memory_mb_seconds: int = 0
    net_in_bytes: int = 0
    net_out_bytes: int = 0
    storage_bytes: int = 0

    FIELDS = ("cpu_ms", "memory_mb_seconds", "net_in_bytes", "net_out_bytes", "storage_bytes")

    def add(self, other: Amounts) -> None:
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def is_zero(self) -> bool:
        return not any(getattr(self, f) for f in self.FIELDS)


@dataclass
class Sample:
    """Usage over `[start, end)` (whole seconds, start < end)."""

    start: int
    end: int
    amounts: Amounts = field(default_factory=Amounts)


def day_cuts(start: int, end: int) -> list[tuple[int, int]]:
    """`[start, end)` cut at every UTC midnight."""
    out: list[tuple[int, int]] = []
    t = start
    while t < end:
        cut = min(end, (t // DAY_S + 1) * DAY_S)
        out.append((t, cut))
        t = cut
    return out


def split_by_day(sample: Sample) -> dict[date, Amounts]:
    """The sample's amounts per UTC day, exactly conserving every total."""
    cuts = day_cuts(sample.start, sample.end)
    total = sample.end - sample.start
    out: dict[date, Amounts] = {}
    done = 0
    for a, b in cuts:
        prev, done = done, done + (b - a)
        part = Amounts(**{f: getattr(sample.amounts, f) * done // total - getattr(sample.amounts, f) * prev // total
                          for f in Amounts.FIELDS})
        out.setdefault(day_of(a), Amounts()).add(part)
    return out


def storage_by_day(alloc_bytes: int, start: int, end: int) -> dict[date, int]:
    """Storage accrued over `[start, end)`: `alloc * seconds / seconds in that month`, per day.

    Floors are taken on the offset from the month's start, so consecutive windows telescope: the
    month's total is `floor(alloc * seconds existed / month seconds)`, never off by the rounding
    of each window.
    """
    out: dict[date, int] = {}
    for a, b in day_cuts(start, end):
        m = month_of(a)
        m0, secs = epoch(m), month_seconds(m)
        out[day_of(a)] = out.get(day_of(a), 0) + alloc_bytes * (b - m0) // secs - alloc_bytes * (a - m0) // secs
    return out


def month_start_date(ts: int) -> str:
    """`YYYY-MM-01` of the month holding `ts` (the EnforceUsage / statement period key)."""
    return month_of(ts).isoformat()


def previous_month(m: date) -> date:
    return (m - timedelta(days=1)).replace(day=1)
