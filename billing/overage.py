"""The overage decision (PRD §4.9, §8.3): one implementation for the proxy, the API and the workflows.

Pure integer arithmetic, no I/O and no floats: usage in bytes, milliseconds and MB-seconds, rates
in whole cents per unit (GiB, hour, GB-hour).

**Rounding rule.** The overage cost is the exact sum over the dimensions that are over their limit
of `(used - limit) * rate / unit`, computed on a common denominator (`_UNITS_LCM`, every unit divides
it), and rounded *up* to a whole cent once, at the end (`overage_cost_cents`). A user is over budget
when the exact cost exceeds the month's budget, which (the budget being whole cents) is the same as
the rounded-up cost exceeding it: a cost of exactly the budget is allowed.

**The decision.** A user is refused (new tunnels, running tunnels, starts; their running VPSes are
stopped by `EnforceUsage`) when some usage this month is over the plan's limit AND the overage costs
more than the month's overage budget. A dimension whose overage rate is 0 (the free plan) has no
overage to buy: over its limit is refused whatever the budget. A user an admin marked
`usage_exempt` is never refused; the verdict says what would have happened (`exempt=True`).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "GB_HOUR_MB_SECONDS", "GIB", "HOUR_MS", "RESOURCES", "THRESHOLDS", "Dimension", "PlanTerms", "UsageSnapshot",
    "Verdict", "Warning", "amount", "dimensions", "overage_cost_cents", "overage_verdict", "threshold_reached",
    "warnings",
]

GIB = 1024**3
HOUR_MS = 3_600_000
GB_HOUR_MB_SECONDS = 1024 * 3600
_UNITS_LCM = math.lcm(GIB, HOUR_MS, GB_HOUR_MB_SECONDS)
THRESHOLDS = (50, 80, 100)
"""Percent of a limit at which the user is warned, once per period per resource."""
RESOURCES = ("bandwidth", "storage", "cpu", "memory")


class PlanTerms(Protocol):
    """What the decision needs of a plan (`db.models.Plan` has it)."""

    max_bandwidth_bytes: int
    max_storage_bytes: int
    max_cpu_ms: int
    max_memory_mb_seconds: int
    overage_bandwidth_cost_per_gb_cents: int
    overage_storage_cost_per_gb_cents: int
    overage_cpu_cost_per_hour_cents: int
    overage_memory_cost_per_gb_hour_cents: int


@dataclass(frozen=True)
class UsageSnapshot:
    """One user's usage this period, summed over their VPSes, with the terms it is judged by."""

    plan: PlanTerms
    budget_cents: int
    vps_ids: frozenset[uuid.UUID]
    bandwidth_bytes: int
    cpu_ms: int
    memory_mb_seconds: int
    storage_bytes: int
    exempt: bool = False
    budget_revision: int = 0
    """Bumped on every `PUT /users/me/overage-budget`: an enforcement belongs to one revision."""


@dataclass(frozen=True)
class Dimension:
    resource: str
    """Stable key: bandwidth, storage, cpu, memory."""
    label: str
    used: int
    limit: int
    rate_cents: int
    unit: int
    unit_name: str


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None
    overage_cents: int = 0
    """The overage cost so far, rounded up to a whole cent."""
    budget_cents: int = 0
    over: tuple[str, ...] = ()
    """The resources over their limit."""
    budget_can_fix: bool = True
    """False when a resource with no overage rate is over its limit: no budget buys it."""
    exempt: bool = False
    """The user is exempt: `allowed` although the plan alone would refuse (then `reason` says why)."""

    @property
    def required_budget_cents(self) -> int | None:
        """The smallest budget that allows this usage, or None when no budget does."""
        return self.overage_cents if self.budget_can_fix else None


def dimensions(s: UsageSnapshot, extra_bandwidth: int = 0) -> list[Dimension]:
    p = s.plan
    return [
        Dimension("bandwidth", "bandwidth", s.bandwidth_bytes + extra_bandwidth, p.max_bandwidth_bytes,
                  p.overage_bandwidth_cost_per_gb_cents, GIB, "GiB"),
        Dimension("storage", "storage", s.storage_bytes, p.max_storage_bytes, p.overage_storage_cost_per_gb_cents,
                  GIB, "GiB"),
        Dimension("cpu", "CPU time", s.cpu_ms, p.max_cpu_ms, p.overage_cpu_cost_per_hour_cents, HOUR_MS, "hours"),
        Dimension("memory", "memory", s.memory_mb_seconds, p.max_memory_mb_seconds,
                  p.overage_memory_cost_per_gb_hour_cents, GB_HOUR_MB_SECONDS, "GB-hours"),
    ]


def _scaled_overage(dims: list[Dimension]) -> int:
    """The exact overage cost in cents, times `_UNITS_LCM` (an integer: every unit divides it)."""
    return sum((d.used - d.limit) * d.rate_cents * (_UNITS_LCM // d.unit) for d in dims if d.used > d.limit)


def overage_cost_cents(s: UsageSnapshot, extra_bandwidth: int = 0) -> int:
    """This month's overage cost in whole cents, rounded up once over the exact sum (the rounding rule)."""
    return -(-_scaled_overage(dimensions(s, extra_bandwidth)) // _UNITS_LCM)


def amount(n: int, unit: int) -> str:
    """`n / unit` with two decimals (truncated), without floats."""
    hundredths = n * 100 // unit
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def _plan_verdict(s: UsageSnapshot, extra_bandwidth: int) -> Verdict:
    dims = dimensions(s, extra_bandwidth)
    over = [d for d in dims if d.used > d.limit]
    scaled = _scaled_overage(dims)
    cost = -(-scaled // _UNITS_LCM)
    common = {"overage_cents": cost, "budget_cents": s.budget_cents, "over": tuple(d.resource for d in over)}
    described = [f"{d.label} {amount(d.used, d.unit)} of {amount(d.limit, d.unit)} {d.unit_name}" for d in over]
    for d, text in zip(over, described, strict=True):
        if d.rate_cents == 0:
            return Verdict(False, f"over the plan's {d.label} limit ({text}) and the plan has no overage for it",
                           budget_can_fix=False, **common)  # type: ignore[arg-type]
    if over and scaled > s.budget_cents * _UNITS_LCM:
        return Verdict(False, f"over the plan's limits ({'; '.join(described)}): overage {cost} cents (rounded up) "
                              f"exceeds this month's overage budget of {s.budget_cents} cents",
                       **common)  # type: ignore[arg-type]
    return Verdict(True, **common)  # type: ignore[arg-type]


def overage_verdict(s: UsageSnapshot, extra_bandwidth: int = 0) -> Verdict:
    """The shared decision, exemption included (see the module docstring)."""
    verdict = _plan_verdict(s, extra_bandwidth)
    if s.exempt and not verdict.allowed:
        return Verdict(True, verdict.reason, verdict.overage_cents, verdict.budget_cents, verdict.over,
                       verdict.budget_can_fix, exempt=True)
    return verdict


def threshold_reached(used: int, limit: int) -> int | None:
    """The highest warning threshold (percent) `used` has reached of `limit`, or None below the first.

    Integer comparison (`used * 100 >= limit * t`). A zero limit is reached by any use at all.
    """
    if used <= 0:
        return None
    reached = [t for t in THRESHOLDS if used * 100 >= limit * t]
    return reached[-1] if reached else None


@dataclass(frozen=True)
class Warning:
    resource: str
    label: str
    threshold: int
    used: str
    limit: str
    unit_name: str


def warnings(s: UsageSnapshot) -> list[Warning]:
    """The highest threshold each resource has reached (one warning each, not one per threshold)."""
    out = []
    for d in dimensions(s):
        t = threshold_reached(d.used, d.limit)
        if t is not None:
            out.append(Warning(d.resource, d.label, t, amount(d.used, d.unit), amount(d.limit, d.unit), d.unit_name))
    return out
