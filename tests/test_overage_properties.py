"""The overage arithmetic (billing/overage.py) as properties: integer cents, zero under the limits,
monotone in usage and in rates, the rounding rule, and the decision's relation to the budget."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.overage import (
    GB_HOUR_MB_SECONDS,
    GIB,
    HOUR_MS,
    UsageSnapshot,
    overage_cost_cents,
    overage_verdict,
    threshold_reached,
)
from proxy.enforcement import overage_cost_cents as proxy_cost
from proxy.enforcement import overage_verdict as proxy_verdict


@dataclass(frozen=True)
class Terms:
    max_bandwidth_bytes: int
    max_storage_bytes: int
    max_cpu_ms: int
    max_memory_mb_seconds: int
    overage_bandwidth_cost_per_gb_cents: int
    overage_storage_cost_per_gb_cents: int
    overage_cpu_cost_per_hour_cents: int
    overage_memory_cost_per_gb_hour_cents: int


amounts = st.integers(min_value=0, max_value=10**15)
rates = st.integers(min_value=0, max_value=10_000)
terms = st.builds(Terms, amounts, amounts, amounts, amounts, rates, rates, rates, rates)
usage = st.tuples(amounts, amounts, amounts, amounts)


def snap(t: Terms, u: tuple[int, int, int, int], budget: int = 0, exempt: bool = False) -> UsageSnapshot:
    return UsageSnapshot(plan=t, budget_cents=budget, vps_ids=frozenset(), bandwidth_bytes=u[0], storage_bytes=u[1],
                         cpu_ms=u[2], memory_mb_seconds=u[3], exempt=exempt)


def exact(t: Terms, u: tuple[int, int, int, int]) -> Fraction:
    pairs = [(u[0], t.max_bandwidth_bytes, t.overage_bandwidth_cost_per_gb_cents, GIB),
             (u[1], t.max_storage_bytes, t.overage_storage_cost_per_gb_cents, GIB),
             (u[2], t.max_cpu_ms, t.overage_cpu_cost_per_hour_cents, HOUR_MS),
             (u[3], t.max_memory_mb_seconds, t.overage_memory_cost_per_gb_hour_cents, GB_HOUR_MB_SECONDS)]
    return sum((Fraction((used - limit) * rate, unit) for used, limit, rate, unit in pairs if used > limit),
               Fraction(0))


@settings(max_examples=400)
@given(terms, usage)
def test_cost_is_integer_cents_rounded_up_once(t: Terms, u: tuple[int, int, int, int]) -> None:
    cost = overage_cost_cents(snap(t, u))
    assert type(cost) is int
    e = exact(t, u)
    assert cost - 1 < e <= cost  # the exact sum, rounded up to a whole cent, once


@settings(max_examples=300)
@given(terms, usage)
def test_zero_under_the_limits(t: Terms, u: tuple[int, int, int, int]) -> None:
    under = (min(u[0], t.max_bandwidth_bytes), min(u[1], t.max_storage_bytes), min(u[2], t.max_cpu_ms),
             min(u[3], t.max_memory_mb_seconds))
    assert overage_cost_cents(snap(t, under)) == 0
    verdict = overage_verdict(snap(t, under))
    assert verdict.allowed and verdict.over == () and verdict.overage_cents == 0


@settings(max_examples=400)
@given(terms, usage, st.tuples(amounts, amounts, amounts, amounts))
def test_monotone_in_usage(t: Terms, u: tuple[int, int, int, int], more: tuple[int, int, int, int]) -> None:
    bigger = tuple(a + b for a, b in zip(u, more, strict=True))
    assert overage_cost_cents(snap(t, bigger)) >= overage_cost_cents(snap(t, u))  # type: ignore[arg-type]
    # ...and so is the decision: whoever is refused stays refused with more usage, same budget.
    for budget in (0, 1, 10**6):
        if not overage_verdict(snap(t, u, budget)).allowed:
            assert not overage_verdict(snap(t, bigger, budget)).allowed  # type: ignore[arg-type]


@settings(max_examples=200)
@given(terms, usage, rates)
def test_monotone_in_rates(t: Terms, u: tuple[int, int, int, int], extra: int) -> None:
    dearer = replace(t, overage_cpu_cost_per_hour_cents=t.overage_cpu_cost_per_hour_cents + extra,
                     overage_bandwidth_cost_per_gb_cents=t.overage_bandwidth_cost_per_gb_cents + extra)
    assert overage_cost_cents(snap(dearer, u)) >= overage_cost_cents(snap(t, u))


@settings(max_examples=400)
@given(terms, usage, st.integers(min_value=0, max_value=10**9))
def test_decision_is_cost_against_budget(t: Terms, u: tuple[int, int, int, int], budget: int) -> None:
    verdict = overage_verdict(snap(t, u, budget))
    cost = overage_cost_cents(snap(t, u))
    if verdict.budget_can_fix:
        # A cost of exactly the budget is allowed; one cent more is not.
        assert verdict.allowed == (cost <= budget)
        if not verdict.allowed:
            assert overage_verdict(snap(t, u, verdict.required_budget_cents or 0)).allowed
    else:
        assert not verdict.allowed and verdict.required_budget_cents is None
    # The proxy's names are the same implementation.
    assert proxy_verdict(snap(t, u, budget)) == verdict and proxy_cost(snap(t, u)) == cost


@settings(max_examples=200)
@given(terms, usage, st.integers(min_value=0, max_value=10**9))
def test_exempt_is_always_allowed_and_says_what_would_have_happened(t: Terms, u: tuple[int, int, int, int],
                                                                   budget: int) -> None:
    plain = overage_verdict(snap(t, u, budget))
    exempt = overage_verdict(snap(t, u, budget, exempt=True))
    assert exempt.allowed
    assert exempt.exempt == (not plain.allowed)
    assert exempt.overage_cents == plain.overage_cents


@given(st.integers(min_value=0, max_value=10**15), st.integers(min_value=0, max_value=10**15))
def test_thresholds_integer_and_monotone(used: int, limit: int) -> None:
    t = threshold_reached(used, limit)
    assert t in (None, 50, 80, 100)
    if t is not None:
        assert used * 100 >= limit * t
    t2 = threshold_reached(used + 1, limit)
    assert (t2 or 0) >= (t or 0)


def test_rounding_rule_examples() -> None:
    t = Terms(10 * GIB, 0, 0, 0, 2, 0, 0, 0)
    assert overage_cost_cents(snap(t, (10 * GIB, 0, 0, 0))) == 0
    assert overage_cost_cents(snap(t, (10 * GIB + 1, 0, 0, 0))) == 1  # a byte over costs a (rounded-up) cent
    assert overage_cost_cents(snap(t, (11 * GIB, 0, 0, 0))) == 2
    assert overage_cost_cents(snap(t, (11 * GIB + 1, 0, 0, 0))) == 3
    assert threshold_reached(50, 100) == 50 and threshold_reached(79, 100) == 50 and threshold_reached(49, 100) is None
    assert threshold_reached(1, 0) == 100 and threshold_reached(0, 0) is None
