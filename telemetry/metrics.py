"""Prometheus metrics: every series Slopbox exports, in one place, and the `/metrics` listener.

Each process (api, worker, proxy) exports the series it updates from the process-wide default
registry (plus the client library's process_* and python_* series). Names follow the Prometheus
conventions: a `slopbox_` prefix, `_total` on counters, base units (seconds, bytes).

Who increments what:
- api: `HTTP_REQUESTS`, `HTTP_REQUEST_SECONDS`, `OPERATIONS_SUBMITTED`;
- worker (activities): `OPERATIONS_FINISHED`, and the metering series below;
- proxy (proxy/metrics.py): `PROXY_BYTES_RELAYED`, `PROXY_CONNECTIONS_OPEN`, `PROXY_LIMIT_REFUSALS`;
- metering and enforcement (collectors, workflows' activities): `METERING_COLLECTION_LAG`,
  `METERING_SAMPLES_WRITTEN`, `ENFORCEMENT_STOPS`, `PROVIDER_ERRORS`. They are defined here so their
  names are fixed before the code that increments them lands.

Counters count events in *this process since it started*: a restart resets them, which
Prometheus' `rate()`/`increase()` handle. Activity-side counters are at-least-once (an activity
retried after its transaction committed counts again); the database stays the truth.

Multiprocess: the registry lives in one process's memory. Several processes of one service (e.g.
a proxy scaled to N processes on one host) must each listen on their own metrics port and be
scraped as separate targets; Prometheus sums them (`sum by (...)`). prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR) is not wired up.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

__all__ = [
    "ENFORCEMENT_STOPS", "HTTP_REQUESTS", "HTTP_REQUEST_SECONDS", "METERING_COLLECTION_LAG",
    "METERING_SAMPLES_WRITTEN", "OPERATIONS_FINISHED", "OPERATIONS_SUBMITTED", "PROVIDER_ERRORS",
    "PROXY_BYTES_RELAYED", "PROXY_CONNECTIONS_OPEN", "PROXY_LIMIT_REFUSALS", "exposition", "start_metrics_server",
]

log = logging.getLogger(__name__)

# --- api ------------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "slopbox_api_http_requests", "API requests answered, by method, route template and status code. "
    "`route` is the path template (/agents/{agent_id}); paths no route matches are `unmatched`.",
    ["method", "route", "status"])
HTTP_REQUEST_SECONDS = Histogram(
    "slopbox_api_http_request_duration_seconds", "API request handling time, by method and route template.",
    ["method", "route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

# --- operations on VPSes ------------------------------------------------------------------------------

OPERATIONS_SUBMITTED = Counter(
    "slopbox_operations_submitted", "Operations the API handed to a VPS's entity workflow (users and admins), "
    "by kind (provision, start, stop, destroy, settings, restart, channel_connect, channel_disconnect).",
    ["kind"])
OPERATIONS_FINISHED = Counter(
    "slopbox_operations_finished", "Operations whose outcome a worker recorded, by kind and final status "
    "(succeeded, failed, cancelled).", ["kind", "status"])

# --- proxy ----------------------------------------------------------------------------------------

PROXY_BYTES_RELAYED = Counter(
    "slopbox_proxy_bytes_relayed", "Bytes relayed for agents' VMs (what the byte meter counts), by direction "
    "from the VM's point of view: inbound = delivered to the VM, outbound = sent by the VM.", ["direction"])
PROXY_CONNECTIONS_OPEN = Gauge(
    "slopbox_proxy_connections_open", "Connections open that count against a per-user limit: gateway_ws = "
    "Control UI WebSockets, forward = agents' forward-proxy requests and tunnels.", ["kind"])
PROXY_LIMIT_REFUSALS = Counter(
    "slopbox_proxy_limit_refusals", "Requests, frames or connections refused by a per-user limit (429), by limit: "
    "gateway_http_rate, gateway_ws_frame_rate, gateway_ws_connections, forward_rate, forward_connections.",
    ["limit"])

# --- metering and enforcement (incremented by the metering collectors and enforcement) ------------------

METERING_COLLECTION_LAG = Gauge(
    "slopbox_metering_collection_lag_seconds", "Now minus the oldest per-VPS collected-until watermark of the "
    "last metering cycle, by provider: how far behind usage data is.", ["provider"])
METERING_SAMPLES_WRITTEN = Counter(
    "slopbox_metering_samples_written", "Usage samples accumulated into vps_usage_periods, by provider and resource "
    "(bandwidth, cpu, memory, storage).", ["provider", "resource"])
ENFORCEMENT_STOPS = Counter(
    "slopbox_enforcement_stops", "VPSes stopped automatically because their user was over the plan's limits and "
    "the overage budget (one per StopVps submitted by enforcement).")
PROVIDER_ERRORS = Counter(
    "slopbox_provider_errors", "Failed provider API calls (lifecycle and metrics), by provider and code: the HTTP "
    "status, or `timeout` / `connection` when there was none.", ["provider", "code"])


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the scraper asked for (Prometheus text by default); body and content type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def start_metrics_server(host: str, port: int, *, service: str) -> web.AppRunner | None:
    """`GET /metrics` on its own listener (worker, proxy); None when `port` is 0 or cannot be bound.

    A busy port does not stop the service: it logs an error and runs without a metrics endpoint
    (losing the scrape is better than losing the worker or the proxy)."""
    if port == 0:
        return None
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as err:
        await runner.cleanup()
        log.error("metrics listener could not bind; running without /metrics",
                  extra={"service": service, "host": host, "port": port, "error": str(err)})
        return None
    log.info("metrics listening", extra={"service": service, "url": f"http://{host}:{port}/metrics"})
    return runner

