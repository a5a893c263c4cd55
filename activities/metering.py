"""Metering activities: plan a cycle, collect and write one batch, report problems, close a month.

Collectors do the HTTP (or read /proc); `metering.ledger` writes each batch in one transaction by
compare-and-set on the watermarks, which is what makes a retried or racing activity harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity

from activities.vps import heartbeating
from metering import alerts, ledger
from metering.collectors import Collected, CollectResult, FlyCollector, HetznerCollector, LocalCollector, UsageCollector
from metering.periods import Amounts
from settings import Settings
from telemetry.metrics import METERING_COLLECTION_LAG, METERING_SAMPLES_WRITTEN
from workflows.metering import (
    BatchReport,
    BatchSpecIn,
    CollectBatchIn,
    FailedVps,
    MeteringAct,
    MeteringReport,
    PlanIn,
    PlanOut,
)

log = logging.getLogger(__name__)


def build_collectors(settings: Settings) -> dict[str, UsageCollector]:
    out: dict[str, UsageCollector] = {}
    if settings.hcloud_token is not None:
        out["hetzner"] = HetznerCollector(settings.hcloud_api_endpoint, settings.hcloud_token.get_secret_value(),
                                          settle_s=settings.metering_settle_s,
                                          reserve=settings.metering_hetzner_reserve)
    if settings.fly_api_token is not None:
        out["fly"] = FlyCollector(settings.fly_prometheus_url, settings.fly_org_slug,
                                  settings.fly_api_token.get_secret_value(), settle_s=settings.metering_settle_s)
    if settings.local_provider_enabled:
        out["local"] = LocalCollector(settings.data_dir)
    return out


def _observe(kind: str, result: CollectResult, written: set[str]) -> None:
    """`slopbox_metering_samples_written_total` per resource and the provider's collection lag."""
    won = [c for c in result.collected if c.vps_id in written]
    for resource in Amounts.FIELDS:
        n = sum(1 for c in won for sample in c.samples if getattr(sample.amounts, resource))
        if n:
            METERING_SAMPLES_WRITTEN.labels(provider=kind, resource=resource).inc(n)
    if won:
        METERING_COLLECTION_LAG.labels(provider=kind).set(max(0.0, time.time() - min(c.until for c in won)))


class MeteringActivities:
    def __init__(self, settings: Settings, engine: AsyncEngine,
                 collectors: dict[str, UsageCollector] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.collectors = collectors if collectors is not None else build_collectors(settings)
        self.after_fetch: Callable[[CollectBatchIn, CollectResult], Awaitable[None]] | None = None
        """Fault-injection point between fetching and writing (tests: a crash, a race)."""
        self.after_write: Callable[[CollectBatchIn], Awaitable[None]] | None = None
        """Fault-injection point after the batch's transaction committed (a crash before reporting)."""

    def all(self) -> list[Callable[..., Any]]:
        return [self.plan, self.collect_batch, self.report_problems, self.close_month]

    @activity.defn(name=MeteringAct.plan)
    async def plan(self, inp: PlanIn) -> PlanOut:
        p = await ledger.plan_cycle(self.engine, inp.until, batch_size=inp.batch_size,
                                    fly_batch_size=inp.fly_batch_size, hetzner_limit=inp.hetzner_limit)
        return PlanOut(batches=[BatchSpecIn(kind=b.kind, after_id=b.after_id, last_id=b.last_id, count=b.count,
                                            max_collected_until=b.max_collected_until) for b in p.batches],
                       due=p.due, deferred=p.deferred)

    @activity.defn(name=MeteringAct.collect_batch)
    async def collect_batch(self, inp: CollectBatchIn) -> BatchReport:
        async with heartbeating():
            return await self.run_batch(inp)

    async def run_batch(self, inp: CollectBatchIn) -> BatchReport:
        spec = inp.spec
        dues = await ledger.load_batch(self.engine, ledger.BatchSpec(
            spec.kind, spec.after_id, spec.last_id, spec.count, spec.max_collected_until), inp.until, ids=spec.ids)
        report = BatchReport(kind=spec.kind, vpses=len(dues), statements=1)
        if not dues:
            return report
        windows = [d.window for d in dues]
        if spec.kind == "storage":  # stopped the whole window: no provider call, storage accrues
            result = CollectResult(collected=[Collected(w.vps_id, until=w.until, counter_ref=w.counter_ref,
                                                        counter_cpu_ms=w.counter_cpu_ms) for w in windows])
        elif spec.kind not in self.collectors:
            why = f"{spec.kind} metrics are not configured on this worker"
            result = CollectResult(failed={w.vps_id: why for w in windows}, unavailable=why)
        else:
            try:
                result = await self.collectors[spec.kind].collect(windows, max_requests=inp.max_requests)
            except Exception as err:  # a collector bug must not lose the batch's VPSes: they retry next cycle
                log.exception("collector failed", extra={"provider": spec.kind})
                why = f"{spec.kind} collector failed: {type(err).__name__}"
                result = CollectResult(failed={w.vps_id: why for w in windows}, unavailable=why)
        if self.after_fetch is not None:
            await self.after_fetch(inp, result)
        async with self.engine.begin() as conn:
            written = await ledger.write_batch(conn, dues, result, inp.until)
        if self.after_write is not None:
            await self.after_write(inp)
        users = {d.window.vps_id: d.user_id for d in dues}
        _observe(spec.kind, result, set(written.written))
        report.written = len(written.written)
        report.lost_race = len(written.lost_race)
        report.failed = [FailedVps(vps_id=v, user_id=users[v], reason=r)
                         for v, r in result.failed.items() if v in users]
        report.stale = written.stale
        report.deferred_ids = [v for v in result.deferred if v in users]
        report.requests = result.requests
        report.retry_after_s = result.retry_after_s
        report.unavailable = result.unavailable
        report.users_changed = sorted(written.users_changed)
        report.statements += written.statements
        return report

    async def collect_now(self, vps_id: str, until: int) -> BatchReport:
        """A final collection of one VPS up to `until`, e.g. before its VM is deleted (providers serve no
        metrics for deleted VMs). Same ledger, same compare-and-set: harmless next to a running cycle."""
        kind = await ledger.kind_of(self.engine, vps_id)
        if kind is None:
            return BatchReport(kind="none")
        return await self.run_batch(CollectBatchIn(spec=BatchSpecIn(kind=kind, ids=[vps_id], count=1), until=until))

    @activity.defn(name=MeteringAct.report_problems)
    async def report_problems(self, report: MeteringReport) -> None:
        await alerts.notify_collection_problems(self.engine, report.alerts, report.failed, until=report.until)

    @activity.defn(name=MeteringAct.close_month)
    async def close_month(self, period_start: str) -> tuple[int, int]:
        return await ledger.close_month(self.engine, date.fromisoformat(period_start))

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.collectors.values()), return_exceptions=True)
