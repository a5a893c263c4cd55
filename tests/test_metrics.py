"""/metrics in Prometheus text on the API, a real `slopbox worker` process and the proxy, with values that move."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from api.app import create_app
from proxy.config import ProxyConfig
from settings import Settings
from tests.conftest import API_KEY, free_port
from tests.fault_harness import start_worker, stop_process
from tests.helpers import headers, make_user
from tests.lifecycle_harness import running_stack, stop_local_vms
from tests.proxy_harness import TEST_CONFIG, RecordingUpstream, running_proxy, seed_gateway_user

pytestmark = pytest.mark.asyncio(loop_scope="session")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def fetch(url: str, timeout: float = 30) -> tuple[str, Mapping[str, str]]:
    """GET a metrics URL, waiting for its listener to come up."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            try:
                resp = await http.get(url)
                assert resp.status_code == 200, resp.text
                return resp.text, resp.headers
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def test_api_metrics(settings: Settings, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        before = parse((await api.get("/metrics")).text)
        assert (await api.get("/users/me", headers=headers(user))).status_code == 200
        assert (await api.get("/users/me", headers=headers(user, key="x" * 40))).status_code == 401
        assert (await api.get(f"/agents/{uuid.uuid4()}", headers=headers(user))).status_code == 404
        assert (await api.get("/no/such/path/" + uuid.uuid4().hex)).status_code == 404
        resp = await api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse(resp.text)
    name = "slopbox_api_http_requests_total"
    for labels, added in (({"method": "GET", "route": "/users/me", "status": "200"}, 1),
                          ({"method": "GET", "route": "/users/me", "status": "401"}, 1),
                          ({"method": "GET", "route": "/agents/{agent_id}", "status": "404"}, 1),
                          ({"method": "GET", "route": "unmatched", "status": "404"}, 1)):
        assert value(after, name, **labels) == value(before, name, **labels) + added, labels
    histogram = "slopbox_api_http_request_duration_seconds_count"
    assert value(after, histogram, method="GET", route="/users/me") >= 2
    # The series every process shares are declared (the metering engineers' among them), and no secret leaks.
    for family in ("slopbox_enforcement_stops_total", "slopbox_operations_submitted", "slopbox_provider_errors",
                   "slopbox_metering_samples_written", "slopbox_metering_collection_lag_seconds"):
        assert f"# HELP {family}" in resp.text, family
    assert API_KEY not in resp.text and str(user) not in resp.text
    assert "/metrics" not in app.openapi()["paths"]


async def test_api_counts_unhandled_errors_as_500(settings: Settings, db: str) -> None:
    app = create_app(settings)

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/test-broken", broken, methods=["GET"])
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://api") as api:
        before = parse((await api.get("/metrics")).text)
        assert (await api.get("/test-broken")).status_code == 500
        after = parse((await api.get("/metrics")).text)
    labels = {"method": "GET", "route": "/test-broken", "status": "500"}
    assert value(after, "slopbox_api_http_requests_total", **labels) == \
        value(before, "slopbox_api_http_requests_total", **labels) + 1


async def test_api_metrics_can_be_turned_off(settings: Settings, db: str) -> None:
    app = create_app(settings.model_copy(update={"api_metrics": False}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        assert (await api.get("/metrics")).status_code == 404


async def test_worker_metrics_from_a_real_worker_process(settings: Settings, temporal_client: Client,
                                                         sql: psycopg.Connection, tmp_path: Path) -> None:
    """`slopbox worker` serves our series and the Temporal SDK's; a provision it runs moves the counters."""
    ours, sdk = free_port(), free_port()
    s = settings.model_copy(update={"temporal_task_queue": f"tq-metrics-{uuid.uuid4().hex[:6]}"})
    async with running_stack(s, temporal_client, worker=False) as stack:
        worker = start_worker(s, tmp_path / "worker.log", env={
            "WORKER_METRICS_PORT": str(ours), "WORKER_TEMPORAL_METRICS_PORT": str(sdk)})
        try:
            text, hdrs = await fetch(f"http://127.0.0.1:{ours}/metrics")
            assert hdrs["content-type"].startswith("text/plain")
            before = parse(text)
            assert "# HELP slopbox_operations_finished_total" in text
            user = make_user(sql, plan="starter")
            agent = await stack.new_agent(user)
            assert (await stack.provision(user, agent)).status_code == 202
            vps = await stack.wait_vps(user, agent, "running", "error", timeout=120)
            assert vps["state"] == "running", vps["last_error"]
            after = parse((await fetch(f"http://127.0.0.1:{ours}/metrics"))[0])
            name = "slopbox_operations_finished_total"
            assert value(after, name, kind="provision", status="succeeded") == \
                value(before, name, kind="provision", status="succeeded") + 1
            temporal = (await fetch(f"http://127.0.0.1:{sdk}/metrics"))[0]
            assert "temporal_" in temporal
            assert any(n.startswith("temporal_activity_execution") or n.startswith("temporal_workflow_completed")
                       for n, _ in parse(temporal)), temporal[:2000]
            assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
            await stack.wait_vps(user, agent, "destroyed", timeout=120)
        finally:
            stop_process(worker)
            await stop_local_vms(s)
    log = (tmp_path / "worker.log").read_text()
    assert "metrics listening" in log and "Temporal SDK metrics listening" in log


async def test_worker_survives_a_busy_metrics_port(settings: Settings, temporal_client: Client, db: str,
                                                   tmp_path: Path) -> None:
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    s = settings.model_copy(update={"temporal_task_queue": f"tq-busy-{uuid.uuid4().hex[:6]}"})
    worker = start_worker(s, tmp_path / "worker.log", env={
        "WORKER_METRICS_PORT": str(port), "WORKER_TEMPORAL_METRICS_PORT": str(port)})
    try:
        deadline = time.monotonic() + 60
        while "worker started" not in (tmp_path / "worker.log").read_text():
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.2)
    finally:
        stop_process(worker)
        busy.close()
    log = (tmp_path / "worker.log").read_text()
    assert "metrics listener could not bind" in log and "Temporal SDK metrics could not bind" in log


async def test_proxy_metrics(settings: Settings, sql: psycopg.Connection) -> None:
    port = free_port()
    s = settings.model_copy(update={"proxy_metrics_port": port})
    cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "http_burst": 2, "http_rate_per_s": 0.01,
                         "forward_connections_per_user": 0})
    async with RecordingUpstream() as upstream:
        seeded = seed_gateway_user(sql, s, port=upstream.port)
        async with running_proxy(s, config=cfg) as proxy, aiohttp.ClientSession() as http:
            assert proxy.metrics_url == f"http://127.0.0.1:{port}/metrics"
            text, hdrs = await fetch(proxy.metrics_url)
            assert hdrs["content-type"].startswith("text/plain")
            before = parse(text)
            url = f"{proxy.url}/agents/{seeded.agent_id}/gateway/assets/x"
            statuses = [(await http.get(url, headers=seeded.cookie)).status for _ in range(3)]
            assert statuses == [200, 200, 429]
            # The forward proxy with no connection allowed per user: refused with 429.
            reader, writer = await asyncio.open_connection(proxy.forward_host, proxy.forward_port)
            cred = base64.b64encode(f"{seeded.agent_id}:{seeded.gateway_token}".encode()).decode()
            writer.write(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n"
                         b"Proxy-Authorization: Basic " + cred.encode() + b"\r\n\r\n")
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 429")
            writer.close()
            # Plain GETs are counted on their connection and reach the counter with the meter's next
            # drain (before every flush of the meter), as WebSocket bytes do.
            await proxy.meter.flush()
            after = parse((await fetch(proxy.metrics_url))[0])
            # Not reachable through the user-facing listener.
            assert (await http.get(f"{proxy.url}/metrics")).status == 404
            through = await http.get(f"{proxy.url}/agents/{seeded.agent_id}/gateway/metrics", headers=seeded.cookie)
            assert "slopbox_proxy" not in await through.text()
    bytes_name = "slopbox_proxy_bytes_relayed_total"
    assert value(after, bytes_name, direction="outbound") > value(before, bytes_name, direction="outbound")
    assert value(after, bytes_name, direction="inbound") >= value(before, bytes_name, direction="inbound")
    refusals = "slopbox_proxy_limit_refusals_total"
    assert value(after, refusals, limit="gateway_http_rate") == value(before, refusals, limit="gateway_http_rate") + 1
    assert value(after, refusals, limit="forward_connections") == \
        value(before, refusals, limit="forward_connections") + 1
    assert ("slopbox_proxy_connections_open", (("kind", "forward"),)) in after
    assert ("slopbox_proxy_connections_open", (("kind", "gateway_ws"),)) in after


async def test_connection_gauge_follows_acquire_and_release() -> None:
    """The counting limiter the proxy installs: open connections up and down, refusals counted."""
    from prometheus_client import REGISTRY

    from proxy.limits import ConnectionLimiter
    from proxy.metrics import CountingConnectionLimiter

    def read(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    limiter = CountingConnectionLimiter(ConnectionLimiter(1), "test_connections", "test")
    assert limiter.try_acquire("u") and read("slopbox_proxy_connections_open", kind="test") == 1
    assert not limiter.try_acquire("u")
    assert read("slopbox_proxy_limit_refusals_total", limit="test_connections") == 1
    assert read("slopbox_proxy_connections_open", kind="test") == 1
    limiter.release("u")
    limiter.release("u")  # an extra release never drives the gauge below zero
    assert read("slopbox_proxy_connections_open", kind="test") == 0


async def test_proxy_websocket_gauge(settings: Settings, sql: psycopg.Connection, tmp_path: Path) -> None:
    """A Control UI WebSocket through the proxy to the gateway simulator is an open connection while it lasts."""
    from tests.proxy_harness import Browser, point_vps_at, simulator_for

    s = settings.model_copy(update={"proxy_metrics_port": free_port()})
    seeded = seed_gateway_user(sql, s, port=1)
    gauge = ("slopbox_proxy_connections_open", (("kind", "gateway_ws"),))
    async with simulator_for(s, tmp_path / "gw", seeded) as sim:
        point_vps_at(sql, seeded.vps_id, sim.port)
        async with running_proxy(s) as proxy:
            assert proxy.metrics_url is not None
            browser = Browser(proxy.url, seeded.session)
            try:
                before = parse((await fetch(proxy.metrics_url))[0])[gauge]
                ws, hello = await browser.handshake(seeded.agent_id)
                assert hello["ok"] is True, hello
                assert parse((await fetch(proxy.metrics_url))[0])[gauge] == before + 1
                await ws.close()
                deadline = time.monotonic() + 10
                while parse((await fetch(proxy.metrics_url))[0])[gauge] != before:
                    assert time.monotonic() < deadline, "the gauge never went back down"
                    await asyncio.sleep(0.1)
            finally:
                await browser.close()
