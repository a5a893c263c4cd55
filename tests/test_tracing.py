"""One provision is one trace: API request -> workflows -> activities -> gateway RPC, with no secret in it.

The spans are the OpenTelemetry SDK's own, captured by its in-memory exporter; everything else is
the real stack (API over ASGI, the Temporal dev server, a worker, a local gateway process).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence

import aiohttp.web
import httpx
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from temporalio.client import Client

from api.app import create_app
from db.engine import make_engine, session_factory
from db.models import Agent, Vps
from orchestration.client import connect
from settings import Settings
from telemetry.tracing import (
    configure_tracing,
    enabled,
    exporter_kind,
    shutdown_tracing,
    temporal_interceptors,
)
from tests.helpers import headers, make_user
from tests.lifecycle_harness import running_stack
from tests.proxy_harness import running_proxy

ORIGINAL_AIOHTTP_APPLICATION = aiohttp.web.Application

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    configure_tracing("slopbox-test", Settings(), exporter=exporter, simple=True)
    try:
        yield exporter
    finally:
        shutdown_tracing()


def named(spans: Sequence[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    """Names from the span's parent up to the root (a parent that was not exported stops the walk)."""
    out: list[str] = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        span = by_id[parent.span_id]
        out.append(span.name)
        parent = span.parent
    return out


async def test_provision_is_one_trace(spans: InMemorySpanExporter, settings: Settings, temporal_client: Client,
                                      sql: psycopg.Connection) -> None:
    # Its own task queue: the worker below is the one with the tracing interceptor.
    settings = settings.model_copy(update={"temporal_task_queue": f"tq-trace-{uuid.uuid4().hex[:8]}"})
    assert temporal_client  # the dev server is up
    client = await connect(settings)  # with tracing on, the client (and its worker) carry the interceptor
    user = make_user(sql, plan="starter")
    async with running_stack(settings, client) as stack:
        agent = await stack.new_agent(user)
        resp = await stack.provision(user, agent)
        assert resp.status_code == 202, resp.text
        vps = await stack.wait_vps(user, agent, "running", "error")
        assert vps["state"] == "running", vps["last_error"]
        env = json.loads((settings.data_dir / "vms" / vps["id"] / "env.json").read_text())
        engine = make_engine(settings)
        async with session_factory(engine)() as session:
            row = await session.get(Vps, uuid.UUID(vps["id"]))
            owner = await session.get(Agent, uuid.UUID(agent))
            assert row is not None and owner is not None
            tokens = [row.bootstrap_token, owner.gateway_token]
        await engine.dispose()
        metrics = await stack.api.get("/metrics")
    assert metrics.status_code == 200 and "slopbox_api_http_requests_total" in metrics.text

    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.kind == SpanKind.SERVER and s.name == "POST /agents/{agent_id}/vps"]
    trace_id = request.context.trace_id
    mine = [s for s in finished if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in mine}
    # The API's request span is the root; Temporal carried the context through the entity workflow
    # (started with the provision in its input) to the operation's child workflow and its activities.
    # (temporalio's workflow spans are instants: activities hang off the span that started the run.)
    assert request.parent is None
    (run_entity,) = named(mine, "RunWorkflow:Vps")
    assert ancestors(run_entity, by_id) == ["StartWorkflow:Vps", request.name]
    (run_provision,) = named(mine, "RunWorkflow:ProvisionVps")
    assert ancestors(run_provision, by_id) == ["StartChildWorkflow:ProvisionVps", "StartWorkflow:Vps", request.name]
    for act in ("create_vm", "wait_vm_running", "wait_gateway_ready", "pair_gateway", "push_config",
                "finish_operation"):
        (run,) = named(mine, f"RunActivity:vps.{act}")
        assert ancestors(run, by_id) == [f"StartActivity:vps.{act}", "StartChildWorkflow:ProvisionVps",
                                         "StartWorkflow:Vps", request.name], act
    # Gateway RPC: one client span per method, inside the activity that made it.
    rpc = [s for s in mine if s.attributes and s.attributes.get("rpc.system") == "openclaw"]
    assert {"connect", "config.get"} <= {str(s.attributes["rpc.method"]) for s in rpc if s.attributes}
    for span in rpc:
        assert span.kind == SpanKind.CLIENT
        assert ancestors(span, by_id)[0].startswith(("RunActivity:vps.pair_gateway", "RunActivity:vps.push_config"))
    # A fresh VM already holds the rendered config: the push reads it, finds nothing to patch, and
    # checks and writes the workspace on that one session (no second handshake).
    push = [s.name for s in rpc if ancestors(s, by_id)[0] == "RunActivity:vps.push_config"]
    assert push.count("gateway connect") == 1 and "gateway config.patch" not in push, push
    # The readiness probe's HTTP call (httpx instrumentation), inside its activity.
    (probe,) = [s for s in mine if s.kind == SpanKind.CLIENT and str((s.attributes or {}).get("http.url", ""))
                .endswith("/readyz")][-1:]
    assert ancestors(probe, by_id)[0] == "RunActivity:vps.wait_gateway_ready"
    # No secret anywhere in any span (names, attributes, events) of any trace: the gateway token, the
    # VPS's bootstrap token, and every token the gateway process was launched with.
    secrets = [t for t in tokens if t] + [v for k, v in env.items() if k.endswith("TOKEN") and isinstance(v, str)]
    assert len(secrets) >= 2 and all(len(t) >= 16 for t in secrets)
    dump = "\n".join(s.to_json() for s in finished)
    for secret in secrets:
        assert secret not in dump


async def test_off_by_default_installs_nothing(settings: Settings) -> None:
    assert exporter_kind(Settings()) == "none"
    assert exporter_kind(Settings(otel_exporter_otlp_endpoint="http://127.0.0.1:4318")) == "otlp"
    assert exporter_kind(Settings(otel_exporter_otlp_endpoint="http://127.0.0.1:4318",
                                  otel_traces_exporter="none")) == "none"
    assert configure_tracing("slopbox-test", settings) is None and not enabled()
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        resp = await api.get("/plans", headers=headers(uuid.uuid4()))
        assert resp.status_code == 200
        assert "traceparent" not in resp.headers
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert temporal_interceptors() == [] and aiohttp.web.Application is ORIGINAL_AIOHTTP_APPLICATION


async def test_proxy_request_joins_the_callers_trace(spans: InMemorySpanExporter, settings: Settings,
                                                     db: str) -> None:
    """The proxy's requests are server spans that continue the caller's trace (`traceparent`, put
    there by the instrumented httpx client); /healthz makes none."""
    agent = uuid.uuid4()
    async with running_proxy(settings) as proxy, httpx.AsyncClient(base_url=proxy.url) as http:
        assert (await http.get("/healthz")).status_code == 200
        resp = await http.get(f"/agents/{agent}/gateway/")
        assert resp.status_code in (401, 403, 404), resp.status_code  # no session cookie: refused
    finished = spans.get_finished_spans()
    server = [s for s in finished if s.kind == SpanKind.SERVER]
    (span,) = [s for s in server if s.name == "GET /agents/{agent_id}/gateway/{tail}"]
    (client,) = [s for s in finished if s.kind == SpanKind.CLIENT
                 and str((s.attributes or {}).get("http.url", "")).endswith("/gateway/")]
    assert span.context.trace_id == client.context.trace_id
    assert span.parent is not None and span.parent.span_id == client.context.span_id
    assert (span.attributes or {}).get("http.status_code") == resp.status_code
    assert len(server) == 1, [s.name for s in server]  # nothing for /healthz
