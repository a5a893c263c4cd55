"""OpenTelemetry traces: one `configure_tracing(service, settings)` per process (api, worker, proxy, web).

A provision is one trace: the API's request span (FastAPI) -> the Temporal client call -> the
entity and operation workflows -> each activity -> the provider's HTTP calls (httpx, requests) and
the gateway RPC calls (openclaw/rpc.py, one span per method). Temporal carries the context in its
headers (temporalio's TracingInterceptor on the client, which every worker built from that client
inherits); HTTP carries it in `traceparent` (W3C), so the web app's API calls and the proxy's
requests (aiohttp server instrumentation) join their callers' traces.

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
import os
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
AIOHTTP_EXCLUDED_PATHS = "^/healthz$,^/metrics$"


@dataclass
class _State:
    provider: TracerProvider | None = None
    """Made once per process: OpenTelemetry's global provider cannot be replaced."""
    processor: Any = None
    """The provider's one span processor, which forwards to the exporter's while tracing is on."""
    on: bool = False
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
    The provider (and its service name) is made by the first call in a process; a call after
    `shutdown_tracing` (tests) sends spans to its own exporter again."""
    kind = "custom" if exporter is not None else exporter_kind(settings)
    if kind == "none":
        return None
    if _state.on:
        return _state.provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    if _state.provider is None:
        _state.processor = _Forward()
        _state.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.otel_service_name or service_name}))
        _state.provider.add_span_processor(_state.processor)
        trace.set_tracer_provider(_state.provider)
    sink = exporter or _exporter(settings, kind)
    _state.processor.to = SimpleSpanProcessor(sink) if simple else BatchSpanProcessor(sink)
    _state.on = True
    _instrument_clients(_state.provider)
    log.info("tracing on", extra={"service": service_name, "exporter": kind})
    return _state.provider


class _Forward:
    """A span processor that hands spans to `to` (the exporter's processor), or drops them when None."""

    def __init__(self) -> None:
        self.to: Any = None

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.to is not None:
            self.to.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Any) -> None:
        return None

    def on_end(self, span: Any) -> None:
        if self.to is not None:
            self.to.on_end(span)

    def shutdown(self) -> None:
        if self.to is not None:
            self.to.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.to.force_flush(timeout_millis)) if self.to is not None else True


def _instrument_clients(provider: TracerProvider) -> None:
    """Outgoing HTTP: httpx (providers, the web app's API client) and requests (hcloud); incoming on
    aiohttp servers (the proxy): the instrumentor swaps `aiohttp.web.Application` for a subclass
    with its middleware, so it applies to the applications created from now on."""
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    # Read by the aiohttp instrumentor when it installs (a regex per path, matched anywhere).
    os.environ.setdefault("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", AIOHTTP_EXCLUDED_PATHS)
    for instrumentor in (HTTPXClientInstrumentor(), RequestsInstrumentor(), AioHttpServerInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
            _state.uninstrument.append(instrumentor)


def enabled() -> bool:
    return _state.on


def instrument_fastapi(app: FastAPI) -> None:
    """Server spans for every request of this app (api, web); nothing when tracing is off."""
    if not _state.on:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # No span per ASGI send/receive message: one per request is what a trace reader wants.
    FastAPIInstrumentor.instrument_app(app, tracer_provider=_state.provider, excluded_urls=EXCLUDED_URLS,
                                       exclude_spans=["receive", "send"])


def temporal_interceptors() -> list[Any]:
    """temporalio's TracingInterceptor for a client (and so for every worker built on it)."""
    if not _state.on or _state.provider is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor(_state.provider.get_tracer("temporalio"))]


def shutdown_tracing() -> None:
    """Flush and stop exporting, and remove the instrumentations (a test process goes on without
    tracing; OpenTelemetry keeps the global provider, whose spans are then dropped)."""
    _state.on = False
    for instrumentor in _state.uninstrument:
        instrumentor.uninstrument()
    _state.uninstrument.clear()
    if _state.processor is not None and _state.processor.to is not None:
        to, _state.processor.to = _state.processor.to, None
        to.shutdown()
