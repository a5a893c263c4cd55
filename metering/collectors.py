"""Usage collectors behind one interface: Hetzner metrics, Fly Prometheus, local gateway processes.

A collector is given *windows* (a VPS, the watermark `since` up to which its usage is already
counted, and the cycle's `until`) and answers, per VPS, the samples it found and the new watermark
it vouches for; it never writes anything. `metering.ledger` then writes samples and watermark in
one transaction, by compare-and-set on `since`, so whatever a collector does twice is counted once.

Which source is the truth (README "Metering"):
- CPU: provider metrics for cloud VMs (tamper-proof: measured outside the VM); the gateway process
  tree's CPU time for local VMs.
- Memory: Hetzner has no RAM metric, so the VPS config's allocation for every minute the server
  reported CPU samples (it was on); Fly's used memory (mem_total - mem_available); local: the
  process tree's resident memory.
- Bandwidth: max(proxy bytes, provider bytes) per direction and month (ledger). The proxies count
  in real time what they carry; the provider counts everything on the VM's public interface,
  proxied traffic included, later. Local VMs have no provider count: proxy bytes only.
- Storage: the VPS config's disk allocation, accrued for the time the VPS exists (ledger).

A sample stamped `t` by Hetzner is taken to cover `[t, t+step)`; a Prometheus point at `T` from
`increase(x[60s])` covers `[T-60, T)`. A sample belongs to the window holding its start, and
windows are contiguous, so each sample is in exactly one window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from metering.periods import Amounts, Sample
from telemetry.metrics import PROVIDER_ERRORS

log = logging.getLogger(__name__)
MIB = 1024 * 1024
_APP = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HETZNER_MAX_SAMPLES = 500
HETZNER_RETENTION_S = 30 * 86_400


@dataclass
class Window:
    vps_id: str
    provider_ref: str | None
    since: int
    """Watermark: usage before it is counted."""
    until: int
    """The cycle's end (or the VPS's destruction, whichever is first)."""
    memory_mb: int
    running_now: bool = True
    destroyed: bool = False
    counter_ref: str | None = None
    counter_cpu_ms: int | None = None



def _counting(provider: str) -> dict[str, list[Callable[[httpx.Response], Awaitable[None]]]]:
    """httpx event hooks: every answer that is not 2xx counts on `slopbox_provider_errors_total`."""

    async def count(resp: httpx.Response) -> None:
        if resp.status_code >= 300:
            PROVIDER_ERRORS.labels(provider=provider, code=str(resp.status_code)).inc()

    return {"response": [count]}


def _transport_error(provider: str, err: httpx.HTTPError) -> None:
    PROVIDER_ERRORS.labels(provider=provider,
                           code="timeout" if isinstance(err, httpx.TimeoutException) else "connection").inc()

@dataclass
class Collected:
    vps_id: str
    until: int
    """The new watermark: every sample starting before it is in `samples` (or never will be)."""
    samples: list[Sample] = field(default_factory=list)
    stale: bool = False
    note: str | None = None
    counter_ref: str | None = None
    counter_cpu_ms: int | None = None


@dataclass
class CollectResult:
    collected: list[Collected] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """VPS id -> why; its watermark stays, the next cycle asks again."""
    deferred: list[str] = field(default_factory=list)
    """Not asked (rate budget or a 429): the next round or cycle covers them, nothing is lost."""
    requests: int = 0
    retry_after_s: float | None = None
    unavailable: str | None = None
    """Set when the provider as a whole could not be reached: an admin alert, never a stop."""


class UsageCollector(Protocol):
    provider: str

    async def collect(self, windows: list[Window], *, max_requests: int | None = None) -> CollectResult: ...

    async def aclose(self) -> None: ...


def _dec(v: Any) -> Decimal | None:
    """Provider values are strings; `null`, `NaN` and junk count as missing."""
    try:
        d = Decimal(str(v))
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() and d >= 0 else None


def retry_after_s(resp: httpx.Response, now: float | None = None) -> float:
    """Seconds to wait from `Retry-After` (seconds or HTTP date) or `RateLimit-Reset` (Unix time); default 5."""
    now = time.time() if now is None else now
    raw = resp.headers.get("Retry-After")
    if raw:
        try:
            return max(1.0, float(raw))
        except ValueError:
            try:
                return max(1.0, parsedate_to_datetime(raw).timestamp() - now)
            except (TypeError, ValueError):
                pass
    reset = resp.headers.get("RateLimit-Reset")
    if reset and reset.isdigit():
        # Reset is when the whole budget is full again; one request is back after a second.
        return max(1.0, min(60.0, float(reset) - now))
    return 5.0


# --- Hetzner --------------------------------------------------------------------------------------


class HetznerCollector:
    """`GET /servers/{id}/metrics?type=cpu,disk,network` per server (Hetzner has no bulk metrics).

    Every request counts against the project's 3,600/hour shared with the lifecycle, so the caller
    passes `max_requests` (its share of the budget for this call) and the collector also stops when
    `RateLimit-Remaining` falls to `reserve` (left for provisioning) or at the first 429, reporting
    the rest as deferred with the provider's `Retry-After`.
    """

    provider = "hetzner"

    def __init__(self, endpoint: str, token: str, *, step_s: int = 60, settle_s: int = 120,
                 stale_after_s: int = 900, max_gap_s: int = 86_400, reserve: int = 300, concurrency: int = 4,
                 timeout_s: float = 20.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=endpoint.rstrip("/") + "/", timeout=timeout_s, transport=transport,
                                       headers={"Authorization": f"Bearer {token}", "User-Agent": "slopbox-metering"},
                                       event_hooks=_counting("hetzner"))
        self.step_s, self.settle_s, self.stale_after_s, self.max_gap_s = step_s, settle_s, stale_after_s, max_gap_s
        self.reserve, self.concurrency = reserve, concurrency

    async def aclose(self) -> None:
        await self._http.aclose()

    def _end(self, w: Window) -> int:
        end = (w.until - self.settle_s) // self.step_s * self.step_s
        return min(end, w.since + HETZNER_RETENTION_S)

    def step_for(self, since: int, end: int) -> int:
        """One-minute samples when they fit in one answer (500 at most), else the smallest whole-minute
        step that does: one request always covers a VPS's whole gap, however long it waited."""
        needed = -(-(end - since) // HETZNER_MAX_SAMPLES)
        return max(self.step_s, -(-needed // self.step_s) * self.step_s)

    async def collect(self, windows: list[Window], *, max_requests: int | None = None) -> CollectResult:
        result = CollectResult()
        stop = asyncio.Event()
        transport_errors: list[str] = []
        queue = list(windows)
        lock = asyncio.Lock()

        async def worker() -> None:
            while True:
                async with lock:
                    if not queue:
                        return
                    w = queue.pop(0)
                    over_budget = max_requests is not None and result.requests >= max_requests
                    if stop.is_set() or over_budget:
                        result.deferred.append(w.vps_id)
                        continue
                    end = self._end(w)
                    if end <= w.since or not w.provider_ref:
                        result.collected.append(Collected(w.vps_id, until=w.since if end <= w.since else w.until,
                                                          note=None if w.provider_ref else "no VM at the provider"))
                        continue
                    result.requests += 1
                await self._one(w, end, result, stop, transport_errors)

        await asyncio.gather(*(worker() for _ in range(max(1, self.concurrency))))
        # The provider (not one server) is down when every request failed: several 5xx, or the API
        # could not be reached at all. One server's 500 alone is that server's failure, no alert.
        asked = result.requests
        unreachable = any(not e.startswith("HTTP") for e in transport_errors)
        if asked and len(transport_errors) == asked and (asked >= 2 or unreachable):
            result.unavailable = f"Hetzner metrics API unavailable: {transport_errors[-1]}"
        return result

    async def _one(self, w: Window, end: int, result: CollectResult, stop: asyncio.Event,
                   transport_errors: list[str]) -> None:
        params = {"type": "cpu,disk,network", "step": str(self.step_for(w.since, end)),
                  "start": datetime.fromtimestamp(w.since, UTC).isoformat(),
                  "end": datetime.fromtimestamp(end, UTC).isoformat()}
        try:
            resp = await self._http.get(f"servers/{w.provider_ref}/metrics", params=params)
        except httpx.HTTPError as err:
            _transport_error("hetzner", err)
            transport_errors.append(type(err).__name__)
            result.failed[w.vps_id] = f"Hetzner metrics request failed: {type(err).__name__}"
            return
        remaining = resp.headers.get("RateLimit-Remaining")
        if remaining is not None and remaining.isdigit() and int(remaining) <= self.reserve:
            stop.set()  # leave the rest of the hour's budget to the lifecycle
        if resp.status_code == 429:
            stop.set()
            result.retry_after_s = max(result.retry_after_s or 0.0, retry_after_s(resp))
            result.deferred.append(w.vps_id)
            return
        if resp.status_code >= 500:
            transport_errors.append(f"HTTP {resp.status_code}")
            result.failed[w.vps_id] = f"Hetzner metrics answered {resp.status_code}"
            return
        if resp.status_code == 404 and w.destroyed:
            # Hetzner serves no metrics for a deleted server: what was not collected before is gone.
            result.collected.append(Collected(w.vps_id, until=w.until, note="server deleted; no metrics after it"))
            return
        if resp.status_code != 200:
            result.failed[w.vps_id] = f"Hetzner metrics answered {resp.status_code}: {_error_code(resp)}"
            return
        try:
            metrics = resp.json()["metrics"]
            step = int(Decimal(str(metrics["step"])))
            series = metrics["time_series"]
        except (ValueError, KeyError, TypeError, InvalidOperation):
            result.failed[w.vps_id] = "Hetzner metrics answer could not be parsed"
            return
        result.collected.append(self.samples(w, end, step, series))

    def samples(self, w: Window, end: int, step: int, series: dict[str, Any]) -> Collected:
        """Turn one metrics answer into samples (cpu_ms = v * step * 10; bytes = v * step; RAM = allocation)."""

        def values(name: str) -> dict[int, Decimal]:
            out: dict[int, Decimal] = {}
            for point in (series.get(name) or {}).get("values") or []:
                try:
                    ts = int(Decimal(str(point[0])))
                except (InvalidOperation, ValueError, TypeError, IndexError):
                    continue
                v = _dec(point[1]) if len(point) > 1 else None
                if v is not None:
                    out[ts] = v
            return out

        cpu, rx, tx = values("cpu"), values("network.0.bandwidth.in"), values("network.0.bandwidth.out")
        samples: list[Sample] = []
        for ts in sorted(set(cpu) | set(rx) | set(tx)):
            if not (w.since <= ts < end):
                continue
            a = Amounts(cpu_ms=int((cpu.get(ts, Decimal(0)) * step * 10).to_integral_value()),
                        memory_mb_seconds=w.memory_mb * step if ts in cpu else 0,
                        net_in_bytes=int((rx.get(ts, Decimal(0)) * step).to_integral_value()),
                        net_out_bytes=int((tx.get(ts, Decimal(0)) * step).to_integral_value()))
            samples.append(Sample(ts, ts + step, a))
        return _watermark(w, end, samples, self.stale_after_s, self.max_gap_s, "Hetzner")


def _watermark(w: Window, end: int, samples: list[Sample], stale_after_s: int, max_gap_s: int,
               source: str) -> Collected:
    """How far the watermark may move: to `end`, unless a running VM's data lags (stale).

    Stale data is used and flagged, and the watermark stops after the last sample, so samples
    that arrive late are still counted by the next cycle. A running VM with no data for longer
    than `max_gap_s` moves on anyway (recorded in the note): the provider keeps metrics for a
    limited time, and waiting forever would stall the VM's metering.
    """
    last_start = max((s.start for s in samples), default=None)
    lag_from = (last_start + 1) if last_start is not None else w.since
    if w.running_now and end - lag_from > stale_after_s:
        if end - w.since > max_gap_s and not samples:
            return Collected(w.vps_id, until=end, samples=samples, stale=True,
                             note=f"no {source} data from {w.since} to {end}; gap not billed")
        return Collected(w.vps_id, until=lag_from, samples=samples, stale=True,
                         note=f"{source} data lags: latest sample at {last_start}, wanted up to {end}")
    return Collected(w.vps_id, until=end, samples=samples)


def _error_code(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error")
        return str(err.get("code") if isinstance(err, dict) else err)
    except ValueError:
        return "non-JSON answer"


# --- Fly ------------------------------------------------------------------------------------------


class FlyCollector:
    """One PromQL range query per batch over the batch's machines (apps `<prefix>-<vps id>`); a Fly
    batch holds up to 1,000 VPSes, so an org of up to 1,000 Slopbox machines is one query per cycle.

    The four billing series come back in one answer, told apart by a `series` label; points are
    per-minute increases (CPU, network) and averages (memory), so each point is one sample.
    """

    provider = "fly"
    STEP = 60
    MAX_WINDOW_S = 6 * 3600

    def __init__(self, base_url: str, org_slug: str, token: str, *, app_prefix: str = "slopbox",
                 settle_s: int = 120, stale_after_s: int = 900, max_gap_s: int = 86_400, timeout_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        scheme = "FlyV1" if token.startswith(("fm1", "fm2")) else "Bearer"
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=timeout_s, transport=transport,
                                       headers={"Authorization": f"{scheme} {token}", "User-Agent": "slopbox"},
                                       event_hooks=_counting("fly"))
        self.org_slug, self.app_prefix = org_slug, app_prefix
        self.settle_s, self.stale_after_s, self.max_gap_s = settle_s, stale_after_s, max_gap_s

    async def aclose(self) -> None:
        await self._http.aclose()

    def query(self, apps: list[str] | None = None) -> str:
        """The four billing series of the given apps (all of the org's Slopbox apps when None)."""
        # App names are [a-z0-9-] (Fly's rule), nothing a regex or a PromQL string would read specially.
        pattern = f"{self.app_prefix}-.*" if apps is None else "|".join(sorted(a for a in apps if _APP.match(a)))
        sel = f'app=~"{pattern}"'
        cpu_modes = 'mode!~"idle|iowait|steal|guest|guest_nice"'
        parts = [
            ("cpu_ms", f"sum by (app) (increase(fly_instance_cpu{{{sel},{cpu_modes}}}[60s])) * 10"),
            ("net_in", f'sum by (app) (increase(fly_instance_net_recv_bytes{{{sel},device="eth0"}}[60s]))'),
            ("net_out", f'sum by (app) (increase(fly_instance_net_sent_bytes{{{sel},device="eth0"}}[60s]))'),
            ("memory_mb_seconds", f"sum by (app) (avg_over_time(fly_instance_memory_mem_total{{{sel}}}[60s]) - "
                                  f"avg_over_time(fly_instance_memory_mem_available{{{sel}}}[60s])) / {MIB} * 60"),
        ]
        return " or ".join(f'label_replace({expr}, "series", "{name}", "", "")' for name, expr in parts)

    async def collect(self, windows: list[Window], *, max_requests: int | None = None) -> CollectResult:
        result = CollectResult()
        ends = {w.vps_id: min((w.until - self.settle_s) // self.STEP * self.STEP, w.since + self.MAX_WINDOW_S)
                for w in windows}
        todo = [w for w in windows if ends[w.vps_id] > w.since and w.provider_ref]
        for w in windows:
            if w not in todo:
                result.collected.append(Collected(w.vps_id, until=w.since if ends[w.vps_id] <= w.since else w.until))
        if not todo:
            return result
        if max_requests is not None and max_requests < 1:
            result.deferred = [w.vps_id for w in todo]
            return result
        start = min(w.since for w in todo) // self.STEP * self.STEP + self.STEP
        end = max(ends[w.vps_id] for w in todo)
        result.requests = 1
        try:
            apps = [(w.provider_ref or "").split("/", 1)[0] for w in todo]
            resp = await self._http.post(f"{self.org_slug}/api/v1/query_range",
                                         data={"query": self.query(apps), "start": str(start), "end": str(end),
                                               "step": str(self.STEP)})
        except httpx.HTTPError as err:
            _transport_error("fly", err)
            return self._all_failed(result, todo, f"Fly Prometheus unavailable: {type(err).__name__}")
        if resp.status_code == 429:
            result.retry_after_s = retry_after_s(resp)
            result.deferred = [w.vps_id for w in todo]
            return result
        if resp.status_code != 200:
            return self._all_failed(result, todo, f"Fly Prometheus answered {resp.status_code}")
        try:
            body = resp.json()
            if body.get("status") != "success":
                raise ValueError(body.get("error"))
            rows = body["data"]["result"]
        except (ValueError, KeyError, TypeError) as err:
            return self._all_failed(result, todo, f"Fly Prometheus answer unusable: {err}")
        points: dict[str, dict[int, Amounts]] = {}
        names = {"cpu_ms": "cpu_ms", "net_in": "net_in_bytes", "net_out": "net_out_bytes",
                 "memory_mb_seconds": "memory_mb_seconds"}
        for row in rows:
            metric = row.get("metric") or {}
            attr = names.get(metric.get("series", ""))
            app = metric.get("app")
            if attr is None or not app:
                continue
            for point in row.get("values") or []:
                v = _dec(point[1]) if len(point) > 1 else None
                if v is None:
                    continue
                ts = int(Decimal(str(point[0])))
                amounts = points.setdefault(app, {}).setdefault(ts - self.STEP, Amounts())
                setattr(amounts, attr, getattr(amounts, attr) + int(v.to_integral_value()))
        for w in todo:
            app = (w.provider_ref or "").split("/", 1)[0]
            end = ends[w.vps_id]
            samples = [Sample(t, t + self.STEP, a) for t, a in sorted(points.get(app, {}).items())
                       if w.since <= t < end]
            result.collected.append(_watermark(w, end, samples, self.stale_after_s, self.max_gap_s, "Fly"))
        return result

    @staticmethod
    def _all_failed(result: CollectResult, todo: list[Window], why: str) -> CollectResult:
        result.failed = {w.vps_id: why for w in todo}
        result.unavailable = why
        return result


# --- local ----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(int(stat.parent.name))
        if fields and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [pid], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def process_tree_usage(pid: int) -> tuple[int, int] | None:
    """(CPU ms used so far, resident bytes now) of `pid` and its descendants (Linux /proc).

    The root's `cutime`/`cstime` keep the CPU of children that already exited, so short-lived
    helpers are counted too.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    cpu_ticks = rss = 0
    for i, p in enumerate(_tree(pid)):
        fields = _stat_fields(p)
        if not fields or fields[0] == "Z":
            if i == 0:
                return None
            continue
        cpu_ticks += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if i == 0 else 0)
        try:
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return cpu_ticks * 1000 // ticks, rss


class LocalCollector:
    """The gateway process tree of each local VM (`<data dir>/vms/<vps id>/gateway.pid`).

    CPU is a counter: the delta from the value stored with the watermark (same process, by pid and
    kernel start time); a new process counts from zero. Memory is the resident size now, held for
    the window. Bandwidth comes from the proxies, which write it themselves.
    """

    provider = "local"

    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir).absolute() / "vms"

    async def aclose(self) -> None:
        return None

    def _process(self, vps_id: str) -> tuple[int, str] | None:
        try:
            info = json.loads((self.root / vps_id / "gateway.pid").read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        fields = _stat_fields(pid)
        if not fields or fields[0] == "Z" or (info.get("start_time") and fields[19] != info["start_time"]):
            return None
        return pid, f"{pid}:{fields[19]}"

    async def collect(self, windows: list[Window], *, max_requests: int | None = None) -> CollectResult:
        result = CollectResult()
        for w in windows:
            if w.until <= w.since:
                result.collected.append(Collected(w.vps_id, until=w.since, counter_ref=w.counter_ref,
                                                  counter_cpu_ms=w.counter_cpu_ms))
                continue
            proc = self._process(w.vps_id) if "/" not in w.vps_id else None
            usage = process_tree_usage(proc[0]) if proc else None
            if proc is None or usage is None:  # not running: nothing used; keep the counter for a resume
                result.collected.append(Collected(w.vps_id, until=w.until, counter_ref=w.counter_ref,
                                                  counter_cpu_ms=w.counter_cpu_ms))
                continue
            cpu_total, rss = usage
            ref = proc[1]
            base = w.counter_cpu_ms if (w.counter_ref == ref and w.counter_cpu_ms is not None) else 0
            amounts = Amounts(cpu_ms=max(0, cpu_total - base),
                              memory_mb_seconds=rss * (w.until - w.since) // MIB)
            result.collected.append(Collected(w.vps_id, until=w.until, samples=[Sample(w.since, w.until, amounts)],
                                              counter_ref=ref, counter_cpu_ms=cpu_total))
        return result
