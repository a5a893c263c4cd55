"""Overage arithmetic in integer cents: the one implementation the proxy, metering and enforcement share.

A dimension is over when this month's usage exceeds the plan's limit; its overage costs
`(used - limit) * rate / unit` cents exactly. Rounding rule: the exact sum over dimensions is
rounded *up* to a whole cent once (`overage_cost_cents`). A user is refused (or stopped) when some
usage is over a limit AND that exact cost exceeds the month's budget; a dimension whose rate is 0
(the free plan) has no overage to buy, so being over it is refused outright. Everything is computed
on a common denominator (`_UNITS_LCM`): integers end to end, no floats, so a cost that is exactly
the budget is allowed.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Protocol

__all__ = ["GB_HOUR_MB_SECONDS", "GIB", "HOUR_MS", "PlanLimits", "UsageSnapshot", "Verdict", "overage_cost_cents",
           "overage_verdict", "scaled_overage"]

GIB = 1024**3
HOUR_MS = 3_600_000
GB_HOUR_MB_SECONDS = 1024 * 3600
_UNITS_LCM = math.lcm(GIB, HOUR_MS, GB_HOUR_MB_SECONDS)


class PlanLimits(Protocol):
    """What the arithmetic reads from a plan (`db.models.Plan` satisfies it)."""

    max_bandwidth_bytes: int
    max_storage_bytes: int
    max_cpu_ms: int
    max_memory_mb_seconds: int
    overage_bandwidth_cost_per_gb_cents: int
    overage_storage_cost_per_gb_cents: int
    overage_cpu_cost_per_hour_cents: int
    overage_memory_cost_per_gb_hour_cents: int


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None


@dataclass(frozen=True)
class UsageSnapshot:
    plan: PlanLimits
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


def scaled_overage(s: UsageSnapshot, extra_bandwidth: int = 0) -> int:
    """The exact overage cost in cents, times `_UNITS_LCM` (an integer: every unit divides it)."""
    return sum((used - limit) * rate * (_UNITS_LCM // unit)
               for _name, used, limit, rate, unit, _unit_name in _dimensions(s, extra_bandwidth) if used > limit)


def overage_cost_cents(s: UsageSnapshot, extra_bandwidth: int = 0) -> int:
    """This month's overage cost in whole cents, rounded up once over the exact sum (the rounding rule)."""
    return -(-scaled_overage(s, extra_bandwidth) // _UNITS_LCM)


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
    if over and scaled_overage(s, extra_bandwidth) > s.budget_cents * _UNITS_LCM:
        cost = overage_cost_cents(s, extra_bandwidth)
        return Verdict(False, f"over the plan's limits ({'; '.join(over)}): overage {cost} cents (rounded up) "
                              f"exceeds this month's overage budget of {s.budget_cents} cents")
    return Verdict(True)
