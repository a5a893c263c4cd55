"""The metering ledger: what is due, and writing collected usage exactly once.

Each batch is written in one transaction whose statements do not depend on the batch's size
(arrays through `unnest`): compare-and-set of every watermark (`collected_until` must still be
what the collector was given; `RETURNING` says which VPSes won), then the counters of the winners
only. A collection that crashed after fetching, a retried activity and two racing cycles thus
count each sample once; a loser's samples are simply dropped and the winner's watermark makes the
next cycle start where the winner stopped, so nothing is skipped either.

Closed months (CloseMonth) take an exclusive advisory lock; batch writes take it shared, so a
batch lands either before a month's statement is computed (and is in it) or after (and its
samples for the closed month are carried into the next open month, day 1: billed once, late).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing.overage import GIB, UsageSnapshot, overage_cost_cents
from metering.collectors import Collected, CollectResult, Window
from metering.periods import Amounts, epoch, month_of, next_month, split_by_day, storage_by_day

CLOSE_LOCK = 0x51_0B_B0_C5  # advisory lock key: month closing (exclusive) vs batch writes (shared)
RAN = "(v.state IN ('running', 'provisioning', 'error') OR v.state_changed_at > s.collected_until)"
"""The VPS may have run after its watermark: provider/process metrics are needed (else storage only)."""


def ts(t: int) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def secs(d: datetime) -> int:
    return int(d.timestamp())


@dataclass
class BatchSpec:
    """A slice of the due VPSes: one provider ("storage" = not running: storage accrual only)."""

    kind: str
    after_id: str | None
    last_id: str
    count: int
    max_collected_until: int | None = None
    """Hetzner: only VPSes collected up to here (the oldest first, within the rate budget)."""


@dataclass
class Plan:
    batches: list[BatchSpec] = field(default_factory=list)
    due: int = 0
    deferred: dict[str, int] = field(default_factory=dict)


# A VPS metering first meets starts at its creation, or 31 days back for one older than that (a
# deploy onto a running fleet): Hetzner keeps 30 days of metrics, older usage cannot be fetched.
_ENSURE_STATE = text("""
    INSERT INTO vps_meter_state (vps_id, collected_until)
    SELECT v.id, GREATEST(to_timestamp(floor(extract(epoch FROM v.created_at) / 60) * 60),
                          CAST(:until AS timestamptz) - interval '31 days')
    FROM vpses v
    WHERE NOT EXISTS (SELECT 1 FROM vps_meter_state s WHERE s.vps_id = v.id)
      AND (v.destroyed_at IS NULL OR v.destroyed_at > :until - interval '2 days')
    ON CONFLICT DO NOTHING
""")

_DUE = text(f"""
    SELECT v.id::text, v.provider, {RAN} AS ran, s.collected_until
    FROM vps_meter_state s JOIN vpses v ON v.id = s.vps_id
    WHERE s.collected_until < LEAST(:until, COALESCE(v.destroyed_at, :until))
    ORDER BY v.id
""")  # noqa: S608 (a constant, no input)


async def plan_cycle(engine: AsyncEngine, until: int, *, batch_size: int, fly_batch_size: int,
                     hetzner_limit: int | None) -> Plan:
    """Cut the due VPSes into batches (two statements, whatever the fleet's size)."""
    async with engine.begin() as conn:
        await conn.execute(_ENSURE_STATE, {"until": ts(until)})
        rows = (await conn.execute(_DUE, {"until": ts(until)})).all()
    plan = Plan(due=len(rows))
    groups: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
    for vps_id, provider, ran, collected_until in rows:
        groups[provider if ran else "storage"].append((vps_id, collected_until))
    for kind in sorted(groups):
        members = groups[kind]
        cutoff: int | None = None
        if kind == "hetzner" and hetzner_limit is not None and len(members) > hetzner_limit:
            oldest = sorted(members, key=lambda m: (m[1], m[0]))[:hetzner_limit]
            cutoff = secs(oldest[-1][1]) if oldest else None
            plan.deferred[kind] = len(members) - len(oldest)
            members = sorted(oldest)
        size = fly_batch_size if kind == "fly" else batch_size
        after: str | None = None
        for i in range(0, len(members), size):
            chunk = members[i:i + size]
            plan.batches.append(BatchSpec(kind, after, chunk[-1][0], len(chunk),
                                          cutoff if kind == "hetzner" else None))
            after = chunk[-1][0]
    return plan


_KIND = text("""
    WITH ensured AS (
        INSERT INTO vps_meter_state (vps_id, collected_until)
        SELECT v.id, GREATEST(to_timestamp(floor(extract(epoch FROM v.created_at) / 60) * 60),
                              now() - interval '31 days')
        FROM vpses v WHERE v.id = CAST(:id AS uuid)
        ON CONFLICT DO NOTHING RETURNING vps_id, collected_until
    )
    SELECT v.provider, v.state IN ('running', 'provisioning', 'error')
                       OR v.state_changed_at > COALESCE(s.collected_until, e.collected_until)
    FROM vpses v LEFT JOIN vps_meter_state s ON s.vps_id = v.id LEFT JOIN ensured e ON e.vps_id = v.id
    WHERE v.id = CAST(:id AS uuid)
""")  # noqa: S608 (no input in the f-string)


async def kind_of(engine: AsyncEngine, vps_id: str) -> str | None:
    """Which batch kind one VPS is collected as (its provider, or "storage" when it did not run)."""
    async with engine.begin() as conn:
        row = (await conn.execute(_KIND, {"id": vps_id})).first()
    return None if row is None else (row[0] if row[1] else "storage")


@dataclass
class Due:
    window: Window
    user_id: str
    created_at: int
    destroyed_at: int | None
    disk_bytes: int


_WINDOWS = text(f"""
    SELECT v.id::text, v.user_id::text, v.provider_ref, v.state, v.created_at, v.destroyed_at,
           s.collected_until, s.counter_ref, s.counter_cpu_ms, c.memory_mb, c.disk_gb, {RAN} AS ran
    FROM vps_meter_state s JOIN vpses v ON v.id = s.vps_id JOIN vps_configs c ON c.id = v.vps_config_id
    WHERE v.id > CAST(:after AS uuid) AND v.id <= CAST(:last AS uuid)
      AND s.collected_until < LEAST(:until, COALESCE(v.destroyed_at, :until))
      AND (CAST(:kind AS text) = 'storage') = NOT {RAN}
      AND (CAST(:kind AS text) = 'storage' OR v.provider = CAST(:kind AS text))
      AND (CAST(:cutoff AS timestamptz) IS NULL OR s.collected_until <= CAST(:cutoff AS timestamptz))
      AND (CAST(:ids AS uuid[]) IS NULL OR v.id = ANY(CAST(:ids AS uuid[])))
    ORDER BY v.id
""")  # noqa: S608 (a constant, no input)


_MIN_ID, _MAX_ID = "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"


async def load_batch(engine: AsyncEngine, spec: BatchSpec, until: int, *, ids: list[str] | None = None) -> list[Due]:
    """The batch's windows (one statement); `ids` (a retry of deferred VPSes) narrows it to them."""
    async with engine.connect() as conn:
        rows = (await conn.execute(_WINDOWS, {
            "after": spec.after_id or _MIN_ID, "last": spec.last_id or _MAX_ID, "ids": ids,
            "until": ts(until), "kind": spec.kind,
            "cutoff": ts(spec.max_collected_until) if spec.max_collected_until is not None else None,
        })).all()
    out = []
    for (vps_id, user_id, ref, state, created, destroyed, collected_until, cref, ccpu, mem_mb, disk_gb, _ran) in rows:
        end = min(until, secs(destroyed)) if destroyed is not None else until
        out.append(Due(Window(vps_id, ref, secs(collected_until), end, mem_mb, running_now=state == "running",
                              destroyed=destroyed is not None, counter_ref=cref, counter_cpu_ms=ccpu),
                       user_id, secs(created), secs(destroyed) if destroyed is not None else None,
                       disk_gb * GIB))
    return out


@dataclass
class Written:
    written: list[str] = field(default_factory=list)
    lost_race: list[str] = field(default_factory=list)
    users_changed: set[str] = field(default_factory=set)
    stale: dict[str, str] = field(default_factory=dict)
    statements: int = 0


_CAS = text("""
    UPDATE vps_meter_state s
    SET collected_until = t.new, counter_ref = t.ref, counter_cpu_ms = t.cpu, stale = t.stale,
        last_error = t.note, last_attempt_at = now(), updated_at = now()
    FROM unnest(CAST(:ids AS uuid[]), CAST(:olds AS timestamptz[]), CAST(:news AS timestamptz[]),
                CAST(:refs AS text[]), CAST(:cpus AS bigint[]), CAST(:stales AS boolean[]), CAST(:notes AS text[]))
         AS t(id, old, new, ref, cpu, stale, note)
    WHERE s.vps_id = t.id AND s.collected_until = t.old
    RETURNING s.vps_id::text
""")

_FAILED = text("""
    UPDATE vps_meter_state s SET last_error = t.note, last_attempt_at = now()
    FROM unnest(CAST(:ids AS uuid[]), CAST(:notes AS text[])) AS t(id, note)
    WHERE s.vps_id = t.id
""")

_USAGE = text("""
    INSERT INTO vps_usage_periods AS u (vps_id, period_start, cpu_ms, memory_mb_seconds, storage_bytes,
        provider_bandwidth_in_bytes, provider_bandwidth_out_bytes, bandwidth_in_bytes, bandwidth_out_bytes,
        provider_topup_in_bytes, provider_topup_out_bytes)
    SELECT t.vps_id, t.period, t.cpu, t.mem, t.sto, t.pin, t.pout, t.pin, t.pout, t.pin, t.pout
    FROM unnest(CAST(:ids AS uuid[]), CAST(:periods AS date[]), CAST(:cpu AS bigint[]), CAST(:mem AS bigint[]),
                CAST(:sto AS bigint[]), CAST(:pin AS bigint[]), CAST(:pout AS bigint[]))
         AS t(vps_id, period, cpu, mem, sto, pin, pout)
    ORDER BY t.vps_id, t.period
    ON CONFLICT ON CONSTRAINT uq_vps_usage_periods_vps_month DO UPDATE SET
        cpu_ms = u.cpu_ms + EXCLUDED.cpu_ms,
        memory_mb_seconds = u.memory_mb_seconds + EXCLUDED.memory_mb_seconds,
        storage_bytes = u.storage_bytes + EXCLUDED.storage_bytes,
        provider_bandwidth_in_bytes = u.provider_bandwidth_in_bytes + EXCLUDED.provider_bandwidth_in_bytes,
        provider_bandwidth_out_bytes = u.provider_bandwidth_out_bytes + EXCLUDED.provider_bandwidth_out_bytes,
        -- billable = max(proxy bytes, provider bytes); proxy bytes = bandwidth - our earlier top-up
        provider_topup_in_bytes = GREATEST(0, u.provider_bandwidth_in_bytes + EXCLUDED.provider_bandwidth_in_bytes
                                              - (u.bandwidth_in_bytes - u.provider_topup_in_bytes)),
        provider_topup_out_bytes = GREATEST(0, u.provider_bandwidth_out_bytes + EXCLUDED.provider_bandwidth_out_bytes
                                               - (u.bandwidth_out_bytes - u.provider_topup_out_bytes)),
        bandwidth_in_bytes = (u.bandwidth_in_bytes - u.provider_topup_in_bytes)
            + GREATEST(0, u.provider_bandwidth_in_bytes + EXCLUDED.provider_bandwidth_in_bytes
                          - (u.bandwidth_in_bytes - u.provider_topup_in_bytes)),
        bandwidth_out_bytes = (u.bandwidth_out_bytes - u.provider_topup_out_bytes)
            + GREATEST(0, u.provider_bandwidth_out_bytes + EXCLUDED.provider_bandwidth_out_bytes
                          - (u.bandwidth_out_bytes - u.provider_topup_out_bytes)),
        updated_at = now()
""")

_DAILY = text("""
    INSERT INTO vps_usage_daily AS d (vps_id, day, cpu_ms, memory_mb_seconds, storage_bytes)
    SELECT t.vps_id, t.day, t.cpu, t.mem, t.sto
    FROM unnest(CAST(:ids AS uuid[]), CAST(:days AS date[]), CAST(:cpu AS bigint[]), CAST(:mem AS bigint[]),
                CAST(:sto AS bigint[])) AS t(vps_id, day, cpu, mem, sto)
    ORDER BY t.vps_id, t.day
    ON CONFLICT (vps_id, day) DO UPDATE SET
        cpu_ms = d.cpu_ms + EXCLUDED.cpu_ms, memory_mb_seconds = d.memory_mb_seconds + EXCLUDED.memory_mb_seconds,
        storage_bytes = d.storage_bytes + EXCLUDED.storage_bytes
""")

# Bandwidth reaches the daily series as the growth of the month's billable count since the last
# look (proxy bytes and provider top-ups alike), attributed to the day it was seen.
_DAILY_BANDWIDTH = text("""
    WITH o AS (
        SELECT p.id, p.daily_seen_in_bytes AS si, p.daily_seen_out_bytes AS so
        FROM vps_usage_periods p
        WHERE p.vps_id = ANY(CAST(:ids AS uuid[])) AND p.period_start = CAST(:period AS date)
        ORDER BY p.vps_id FOR UPDATE
    ), u AS (
        UPDATE vps_usage_periods p SET daily_seen_in_bytes = p.bandwidth_in_bytes,
                                       daily_seen_out_bytes = p.bandwidth_out_bytes
        FROM o WHERE p.id = o.id AND (p.bandwidth_in_bytes <> o.si OR p.bandwidth_out_bytes <> o.so)
        RETURNING p.vps_id, p.bandwidth_in_bytes - o.si AS din, p.bandwidth_out_bytes - o.so AS dout
    )
    INSERT INTO vps_usage_daily AS d (vps_id, day, bandwidth_in_bytes, bandwidth_out_bytes)
    SELECT u.vps_id, CAST(:day AS date), GREATEST(u.din, 0), GREATEST(u.dout, 0) FROM u ORDER BY u.vps_id
    ON CONFLICT (vps_id, day) DO UPDATE SET
        bandwidth_in_bytes = d.bandwidth_in_bytes + EXCLUDED.bandwidth_in_bytes,
        bandwidth_out_bytes = d.bandwidth_out_bytes + EXCLUDED.bandwidth_out_bytes
    RETURNING d.vps_id::text
""")

# Every usage row the batch may touch, locked up front in the order the proxies' flush locks them
# (vps_id, period_start): the statements below then never wait on a row out of order (no deadlock).
_LOCK_ROWS = text("""
    SELECT 1 FROM vps_usage_periods
    WHERE vps_id = ANY(CAST(:ids AS uuid[])) AND period_start = ANY(CAST(:periods AS date[]))
    ORDER BY vps_id, period_start FOR UPDATE
""")

_CLOSED = text("SELECT period_start FROM metering_months WHERE period_start >= CAST(:since AS date)")


def _open(m: date, closed: set[date]) -> date:
    while m in closed:
        m = next_month(m)
    return m


def amounts_of(due: Due, got: Collected) -> dict[date, Amounts]:
    """Per-day usage of one VPS's collection: its samples, plus storage accrued for its existence."""
    days: dict[date, Amounts] = defaultdict(Amounts)
    for s in got.samples:
        for d, a in split_by_day(s).items():
            days[d].add(a)
    lo = max(due.window.since, due.created_at)
    hi = min(got.until, due.destroyed_at) if due.destroyed_at is not None else got.until
    if hi > lo and due.disk_bytes:
        for d, b in storage_by_day(due.disk_bytes, lo, hi).items():
            days[d].storage_bytes += b
    return days


async def write_batch(conn: AsyncConnection, dues: list[Due], result: CollectResult, until: int) -> Written:
    """Write one batch in the caller's transaction (see module doc); returns who was written."""
    out = Written()
    by_id = {d.window.vps_id: d for d in dues}
    got = [c for c in result.collected if c.vps_id in by_id]
    await conn.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": CLOSE_LOCK})
    out.statements += 1
    won: set[str] = set()
    if got:
        won = {r[0] for r in (await conn.execute(_CAS, {
            "ids": [c.vps_id for c in got], "olds": [ts(by_id[c.vps_id].window.since) for c in got],
            "news": [ts(c.until) for c in got], "refs": [c.counter_ref for c in got],
            "cpus": [c.counter_cpu_ms for c in got], "stales": [c.stale for c in got],
            "notes": [c.note for c in got],
        })).all()}
        out.statements += 1
    if result.failed:
        ids = [i for i in result.failed if i in by_id]
        await conn.execute(_FAILED, {"ids": ids, "notes": [result.failed[i] for i in ids]})
        out.statements += 1
    out.written = sorted(won)
    out.lost_race = sorted(c.vps_id for c in got if c.vps_id not in won)
    out.stale = {c.vps_id: c.note or "stale" for c in got if c.stale and c.vps_id in won}
    months: dict[tuple[str, date], Amounts] = defaultdict(Amounts)
    daily: dict[tuple[str, date], Amounts] = defaultdict(Amounts)
    earliest = min((by_id[c].window.since for c in won), default=until)
    closed: set[date] = set()
    if won:
        closed = {r[0] for r in (await conn.execute(_CLOSED, {"since": month_of(earliest)})).all()}
        out.statements += 1
    first = min((d.window.since for d in dues), default=until)
    periods, m = [], month_of(first)
    while m <= month_of(until):
        periods.append(m)
        m = next_month(m)
    await conn.execute(_LOCK_ROWS, {"ids": sorted(by_id), "periods": periods})
    out.statements += 1
    for c in got:
        if c.vps_id not in won:
            continue
        for d, a in amounts_of(by_id[c.vps_id], c).items():
            if a.is_zero():
                continue
            m = month_of(epoch(d))
            if m in closed:  # closed after this was fetched: carried into the next open month
                m = _open(m, closed)
                d = m
            months[(c.vps_id, m)].add(a)
            daily[(c.vps_id, d)].add(a)
            out.users_changed.add(by_id[c.vps_id].user_id)
    if months:
        keys = sorted(months)
        await conn.execute(_USAGE, {
            "ids": [k[0] for k in keys], "periods": [k[1] for k in keys],
            "cpu": [months[k].cpu_ms for k in keys], "mem": [months[k].memory_mb_seconds for k in keys],
            "sto": [months[k].storage_bytes for k in keys], "pin": [months[k].net_in_bytes for k in keys],
            "pout": [months[k].net_out_bytes for k in keys]})
        out.statements += 1
    if daily:
        keys = sorted(daily)
        await conn.execute(_DAILY, {
            "ids": [k[0] for k in keys], "days": [k[1] for k in keys],
            "cpu": [daily[k].cpu_ms for k in keys], "mem": [daily[k].memory_mb_seconds for k in keys],
            "sto": [daily[k].storage_bytes for k in keys]})
        out.statements += 1
    # Bandwidth the proxies (or our top-ups) added since the last look, for every VPS of the batch, into
    # the day it was seen: this month's row, and the previous month's when the window crossed into a new
    # one (its last bytes go to its last day), unless that month is closed.
    for period in sorted({month_of(first), month_of(until)}):
        if period in closed:
            continue
        day = datetime.fromtimestamp(min(until, epoch(next_month(period)) - 1), UTC).date()
        seen = (await conn.execute(_DAILY_BANDWIDTH, {"ids": sorted(by_id), "period": period, "day": day})).all()
        out.statements += 1
        out.users_changed.update(by_id[r[0]].user_id for r in seen if r[0] in by_id)
    return out


# --- closing a month --------------------------------------------------------------------------------

_FREEZE = text("""
    UPDATE vps_usage_periods SET frozen_at = now() WHERE period_start = CAST(:p AS date) AND frozen_at IS NULL
""")

_USER_TOTALS = text("""
    SELECT v.user_id, SUM(u.bandwidth_in_bytes + u.bandwidth_out_bytes), SUM(u.cpu_ms), SUM(u.memory_mb_seconds),
           SUM(u.storage_bytes)
    FROM vps_usage_periods u JOIN vpses v ON v.id = u.vps_id
    WHERE u.period_start = CAST(:p AS date)
      AND NOT EXISTS (SELECT 1 FROM usage_statements s WHERE s.user_id = v.user_id AND s.period_start = u.period_start)
    GROUP BY v.user_id
""")

_PLANS = text("""
    SELECT u.id, p.* FROM users u
    JOIN plans p ON p.id = COALESCE((SELECT id FROM plans WHERE id = u.plan_id), (SELECT id FROM plans WHERE is_default
                                    ORDER BY created_at LIMIT 1))
    WHERE u.id = ANY(CAST(:ids AS uuid[]))
""")

_BUDGETS = text("""
    SELECT user_id, budget_cents FROM overage_budgets
    WHERE period_start = CAST(:p AS date) AND user_id = ANY(CAST(:ids AS uuid[]))
""")

_STATEMENTS = text("""
    INSERT INTO usage_statements (user_id, period_start, plan_id, bandwidth_bytes, cpu_ms, memory_mb_seconds,
                                  storage_bytes, overage_cost_cents, budget_cents)
    SELECT * FROM unnest(CAST(:users AS uuid[]), CAST(:periods AS date[]), CAST(:plans AS uuid[]),
                         CAST(:bw AS bigint[]), CAST(:cpu AS bigint[]), CAST(:mem AS bigint[]), CAST(:sto AS bigint[]),
                         CAST(:cost AS bigint[]), CAST(:budget AS bigint[]))
    ON CONFLICT ON CONSTRAINT uq_usage_statements_user_month DO NOTHING
    RETURNING user_id::text, overage_cost_cents
""")


@dataclass
class PlanRow:
    id: uuid.UUID
    max_bandwidth_bytes: int
    max_storage_bytes: int
    max_cpu_ms: int
    max_memory_mb_seconds: int
    overage_bandwidth_cost_per_gb_cents: int
    overage_storage_cost_per_gb_cents: int
    overage_cpu_cost_per_hour_cents: int
    overage_memory_cost_per_gb_hour_cents: int


def plan_row(m: Any) -> PlanRow:
    return PlanRow(**{f: m[f] for f in PlanRow.__dataclass_fields__})


async def close_month(engine: AsyncEngine, period: date) -> tuple[int, int]:
    """Freeze the month's rows and write one statement per user (once: a rerun adds nothing).

    Returns (statements written now, their total overage in cents).
    """
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CLOSE_LOCK})
        await conn.execute(text("INSERT INTO metering_months (period_start) VALUES (CAST(:p AS date)) "
                                "ON CONFLICT DO NOTHING"), {"p": period})
        await conn.execute(_FREEZE, {"p": period})
        totals = (await conn.execute(_USER_TOTALS, {"p": period})).all()
        if not totals:
            return 0, 0
        ids = [r[0] for r in totals]
        plans = {r[0]: plan_row(r._mapping) for r in (await conn.execute(_PLANS, {"ids": ids})).all()}
        budgets = {r[0]: int(r[1]) for r in (await conn.execute(_BUDGETS, {"p": period, "ids": ids})).all()}
        rows: dict[str, list[Any]] = defaultdict(list)
        for user_id, bw, cpu, mem, sto in totals:
            plan = plans.get(user_id)
            budget = budgets.get(user_id, 0)
            cost = 0
            if plan is not None:
                cost = overage_cost_cents(UsageSnapshot(plan, budget, frozenset(), int(bw), int(cpu), int(mem),
                                                        int(sto)))
            for key, value in (("users", user_id), ("periods", period), ("plans", plan.id if plan else None),
                               ("bw", int(bw)), ("cpu", int(cpu)), ("mem", int(mem)), ("sto", int(sto)),
                               ("cost", cost), ("budget", budget)):
                rows[key].append(value)
        written = (await conn.execute(_STATEMENTS, dict(rows))).all()
    return len(written), sum(int(r[1]) for r in written)
