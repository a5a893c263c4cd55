"""Tracing and `/metrics` on the stack `make run` starts, read the way an operator would.

`slopbox dev` runs with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a collector (a real OTLP/HTTP
receiver in this test, decoding the protobuf the SDK's exporter sends, as Jaeger or an OpenTelemetry
Collector would); the test provisions an agent through the printed API with the printed key, then
checks that the provision arrived as one trace across the API and worker processes, that the web app
and the proxy export their spans too, that no secret is in any span, and that every metrics URL the
banner prints answers with the series the README lists, counting what was just done.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import free_port
from tests.web_journey_harness import DevStack


@dataclass
class Span:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent: bytes
    attributes: dict[str, Any]


class Collector:
    """OTLP/HTTP trace receiver: `POST /v1/traces` with an ExportTraceServiceRequest (protobuf)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.raw = bytearray()

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.raw += body
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(Span(attrs.get("service.name", ""), s.name, s.trace_id, s.span_id,
                                           s.parent_span_id, {a.key: a.value.string_value for a in s.attributes}))
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")

    def services(self) -> set[str]:
        return {s.service for s in self.spans}


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    sink = Collector()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", sink.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield sink, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def metrics_urls(out: str) -> dict[str, str]:
    """The banner's Metrics line: `API /metrics, worker http://h:p/metrics (Temporal SDK :p2), proxy http://...`."""
    line = next(line for line in out.split("Slopbox is up.", 1)[1].splitlines() if line.strip().startswith("Metrics"))
    found = re.search(r"worker (http://([\d.]+):\d+/metrics) \(Temporal SDK :(\d+)\), proxy (http://\S+/metrics)", line)
    assert found is not None, line
    worker, host, sdk_port, proxy = found.groups()
    return {"worker": worker, "temporal_sdk": f"http://{host}:{sdk_port}/metrics", "proxy": proxy}


def sample(text: str, series: str) -> float:
    """The value of one exact series line (`name{labels}`) in Prometheus text; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.5)


async def test_make_run_exports_one_trace_per_provision_and_serves_every_metrics_url(
        collector: tuple[Collector, str]) -> None:
    sink, endpoint = collector
    stack = await DevStack.start({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"})
    try:
        urls = metrics_urls(stack.output())
        async with stack.api() as api, httpx.AsyncClient(timeout=30) as http:
            created = await api.post("/agents", json={"name": "observed"})
            assert created.status_code == 201, created.text
            agent = created.json()["id"]
            plans = (await api.get("/plans")).json()
            me = (await api.get("/users/me")).json()
            plan = next(p for p in plans if p["name"] == me["plan"]["name"])
            local = next(c["id"] for c in plan["vps_configs"] if c["provider"] == "local")
            started = await api.post(f"/agents/{agent}/vps", json={"vps_config_id": local})
            assert started.status_code == 202, started.text

            async def running() -> dict[str, Any] | None:
                vps = (await api.get(f"/agents/{agent}")).json()["vps"]
                assert vps["state"] != "error", vps
                return vps if vps["state"] == "running" and vps["operation_id"] is None else None

            await until(running, 240, "the agent to run")
            landing = await http.get(stack.web_url + "/")
            assert landing.status_code == 200
            refused = await http.get(f"{stack.proxy_url}/agents/{agent}/gateway/")
            assert refused.status_code == 401  # no session: the proxy answers (and traces) the refusal

            # -- tracing: the provision is one trace across the API's and the worker's processes ----------
            async def traced() -> list[Span] | None:
                roots = [s for s in sink.spans
                         if s.service == "slopbox-api" and s.name == "POST /agents/{agent_id}/vps"]
                if not roots:
                    return None
                mine = [s for s in sink.spans if s.trace_id == roots[0].trace_id]
                names = {s.name for s in mine}
                return mine if {"RunWorkflow:ProvisionVps", "RunActivity:vps.finish_operation"} <= names else None

            trace = await until(traced, 60, "the provision's spans to reach the collector")
            by_service = {s.service for s in trace}
            assert by_service == {"slopbox-api", "slopbox-worker"}, by_service
            names = {s.name for s in trace}
            for act in ("create_vm", "wait_vm_running", "wait_gateway_ready", "pair_gateway", "push_config"):
                assert f"RunActivity:vps.{act}" in names, sorted(names)
            assert {"gateway connect", "gateway config.get"} <= names, sorted(names)
            ids = {s.span_id for s in trace}
            orphans = [s.name for s in trace if s.parent and s.parent not in ids]
            assert orphans == [], orphans  # every span hangs off another span of the same trace

            async def others() -> bool:
                return {"slopbox-web", "slopbox-proxy"} <= sink.services()

            await until(others, 30, "the web app's and the proxy's spans")
            assert stack.api_key.encode() not in bytes(sink.raw)

            # -- metrics: every URL the banner printed, with what was just done counted --------------------
            api_metrics = (await http.get(stack.api_url + "/metrics")).text
            assert sample(api_metrics, 'slopbox_operations_submitted_total{kind="provision"}') == 1.0
            assert sample(api_metrics, 'slopbox_api_http_requests_total{method="POST",route="/agents/{agent_id}/vps",'
                                       'status="202"}') == 1.0
            worker_metrics = (await http.get(urls["worker"])).text
            assert sample(worker_metrics,
                          'slopbox_operations_finished_total{kind="provision",status="succeeded"}') == 1.0
            sdk_metrics = (await http.get(urls["temporal_sdk"])).text
            assert re.search(r'^temporal_activity_execution_latency\w*\{[^}]*activity_type="vps\.create_vm"',
                             sdk_metrics, re.M), sdk_metrics[:2000]
            proxy_metrics = (await http.get(urls["proxy"])).text
            assert 'slopbox_proxy_connections_open{kind="gateway_ws"} 0.0' in proxy_metrics, proxy_metrics[:2000]
            assert "process_cpu_seconds_total" in proxy_metrics
    finally:
        await stack.stop()
