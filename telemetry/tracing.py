"""OpenTelemetry traces: one `configure_tracing(service, settings)` per process (api, worker, proxy, web).

A provision is one trace: the API's request span (FastAPI) -> the Temporal client call -> the
entity and operation workflows -> each activity -> the provider's HTTP calls (httpx, requests) and
the gateway RPC calls (openclaw/rpc.py, one span per method). Temporal carries the context in its
headers (temporalio's TracingInterceptor on the client, which every worker built from that client
inherits); HTTP carries it in `traceparent` (W3C).

Off by default, and then nothing is installed: no instrumentation, no interceptor, no exporter (the
gateway client's spans go to the OpenTelemetry API's no-op tracer). The exporter follows the
standard OTEL_* variables: `OTEL_TRACES_EXPORTER=console` prints spans as JSON on stdout;
`otlp` (implied when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) sends OTLP/HTTP to a collector or
Jaeger; OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_HEADERS and the batch
processor's OTEL_BSP_* are honoured by the SDK itself.

No secrets in spans: our own spans carry method names only (never params or results), and the HTTP
instrumentations record methods, routes, URLs without credentials and status codes, not headers or
bodies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from settings import Settings

__all__ = ["configure_tracing", "enabled", "instrument_fastapi", "shutdown_tracing", "temporal_interceptors"]

log = logging.getLogger(__name__)

# Health checks and scrapes would be most of the spans and tell nothing.
EXCLUDED_URLS = "/healthz,/metrics"


@dataclass
class _State:
    provider: TracerProvider | None = None
    uninstrument: list[Any] = field(default_factory=list)


_state = _State()


def exporter_kind(settings: Settings) -> str:
    """`none`, `console` or `otlp`: OTEL_TRACES_EXPORTER if set, else `otlp` when an endpoint is set."""
    if settings.otel_traces_exporter:
        return settings.otel_traces_exporter
    if settings.otel_exporter_otlp_endpoint or settings.otel_exporter_otlp_traces_endpoint:
        return "otlp"
    return "none"


def _exporter(settings: Settings, kind: str) -> SpanExporter:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Passed explicitly so a value from a .env file works too (the exporter itself reads os.environ).
    endpoint = settings.otel_exporter_otlp_traces_endpoint
    if endpoint is None and settings.otel_exporter_otlp_endpoint:
        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


def configure_tracing(service_name: str, settings: Settings, *, exporter: SpanExporter | None = None,
                      simple: bool = False) -> TracerProvider | None:
    """Install the tracer provider and the client instrumentations for this process; None when off.

    `exporter` overrides the one the settings choose (tests pass the SDK's in-memory exporter);
    `simple` exports each span as it ends instead of in batches (tests, so nothing waits on a flush).
    Call once per process: OpenTelemetry's global provider cannot be replaced."""
    kind = "custom" if exporter is not None else exporter_kind(settings)
    if kind == "none":
        return None
    if _state.provider is not None:
        return _state.provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": settings.otel_service_name or service_name}))
    sink = exporter or _exporter(settings, kind)
    provider.add_span_processor(SimpleSpanProcessor(sink) if simple else BatchSpanProcessor(sink))
    trace.set_tracer_provider(provider)
    _state.provider = provider
    _instrument_clients(provider)
    log.info("tracing on", extra={"service": service_name, "exporter": kind})
    return provider


def _instrument_clients(provider: TracerProvider) -> None:
    """Outgoing HTTP: httpx (providers, the web app's API client) and requests (hcloud)."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    for instrumentor in (HTTPXClientInstrumentor(), RequestsInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
            _state.uninstrument.append(instrumentor)


def enabled() -> bool:
    return _state.provider is not None


def instrument_fastapi(app: FastAPI) -> None:
    """Server spans for every request of this app (api, web); nothing when tracing is off."""
    if _state.provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # No span per ASGI send/receive message: one per request is what a trace reader wants.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=_state.provider, excluded_urls=EXCLUDED_URLS,
                                       exclude_spans=["receive", "send"])


def aiohttp_middlewares() -> list[Any]:
    """The aiohttp server middleware for the proxy's gateway listener; empty when tracing is off."""
    if _state.provider is None:
        return []
    from opentelemetry.instrumentation.aiohttp_server import create_aiohttp_middleware

    return [create_aiohttp_middleware(tracer_provider=_state.provider)]


def temporal_interceptors() -> list[Any]:
    """temporalio's TracingInterceptor for a client (and so for every worker built on it)."""
    if _state.provider is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(_state.provider.get_tracer("temporalio"))]


def shutdown_tracing() -> None:
    """Flush and stop exporting, and remove the client instrumentations (a test process goes on
    without tracing; OpenTelemetry keeps the global provider, which then records nothing)."""
    provider, _state.provider = _state.provider, None
    for instrumentor in _state.uninstrument:
        instrumentor.uninstrument()
    _state.uninstrument.clear()
    if provider is not None:
        provider.shutdown()
