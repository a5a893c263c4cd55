"""The FastAPI application factory: routers, problem+json errors, request ids, lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from temporalio.client import Client

from api import problems
from api.body_limit import BodyLimit
from api.routes import (
    admin,
    agent_settings,
    agents,
    bootstrap,
    channels,
    health,
    notifications,
    plans,
    usage,
    users,
    vps,
)
from api.schemas import ADMIN_PROBLEMS, COMMON_PROBLEMS, PROBLEM_JSON
from db.engine import make_engine, session_factory
from orchestration.client import connect
from settings import Settings
from telemetry.logs import request_id
from telemetry.metrics import HTTP_REQUEST_SECONDS, HTTP_REQUESTS, exposition
from telemetry.tracing import instrument_fastapi
from workflows.contracts import LifecycleTimeouts

log = logging.getLogger("api")


class LazyTemporal:
    """Connect on first use and keep the client: the API starts even while Temporal is down."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> Client:
        async with self._lock:
            if self._client is None:
                self._client = await connect(self._settings)
            return self._client


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        app.state.sessions = session_factory(engine)
        yield
        await engine.dispose()

    app = FastAPI(
        title="Slopbox control plane",
        version="0.1.0",
        lifespan=lifespan,
        generate_unique_id_function=lambda r: f"{r.tags[0]}-{r.name}" if r.tags else r.name,
    )
    app.state.settings = settings
    app.state.api_key_bytes = settings.api_key().encode()
    app.state.temporal = LazyTemporal(settings)
    app.state.lifecycle_timeouts = LifecycleTimeouts()
    problems.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_body_bytes)  # inside access_log: 413s are logged

    @app.middleware("http")
    async def access_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get("x-request-id", "")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").isalnum()):
            rid = uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            observe(request, 500, time.perf_counter() - start)  # answered 500 by the outermost handler
            raise
        finally:
            request_id.reset(token)
        elapsed = time.perf_counter() - start
        response.headers["X-Request-Id"] = rid
        log.info("request", extra={"method": request.method, "path": request.url.path,
                                   "status": response.status_code, "request_id": rid,
                                   "ms": round(elapsed * 1000, 1)})
        observe(request, response.status_code, elapsed)
        return response

    app.include_router(health.router)
    for module in (users, notifications, plans, agents, agent_settings, usage, vps, channels, bootstrap):
        app.include_router(module.router, responses=COMMON_PROBLEMS)
    app.include_router(admin.router, responses={**COMMON_PROBLEMS, **ADMIN_PROBLEMS})
    if settings.api_metrics:
        app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            truthful(FastAPI.openapi(app))
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    instrument_fastapi(app)  # request spans when tracing is on (telemetry/tracing.py); nothing otherwise
    return app


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe(request: Request, status: int, elapsed: float) -> None:
    route = route_template(request)
    method = request.method if request.method in KNOWN_METHODS else "other"  # bounded, like `route`
    HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
    HTTP_REQUEST_SECONDS.labels(method=method, route=route).observe(elapsed)


def route_template(request: Request) -> str:
    """The matched route's path template (bounded label values); `unmatched` for any other path."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


async def metrics(request: Request) -> Response:
    """Prometheus text (telemetry/metrics.py): counters and histograms only, no ids, no secrets."""
    body, content_type = exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


def truthful(spec: dict[str, Any]) -> None:
    """Fix up what FastAPI cannot express: problem bodies are application/problem+json, and a route may
    document its JSON body with a hand-written schema (cross-field rules) instead of the model's."""
    problem_refs = ("#/components/schemas/ProblemDetails", "#/components/schemas/ValidationProblem")
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if content.get("application/json", {}).get("schema", {}).get("$ref") in problem_refs:
                    content[PROBLEM_JSON] = content.pop("application/json")
            if "requestBody" not in operation:
                continue
            # A body that is not UTF-8 JSON at all is refused before validation.
            operation["responses"].setdefault("400", {
                "description": "The body cannot be read (not UTF-8 JSON)",
                "content": {PROBLEM_JSON: {"schema": {"$ref": problem_refs[0]}}}})
            body = operation["requestBody"].get("content", {}).get("application/json", {}).get("schema", {})
            if body.pop("x-replaces-model", False):
                body.pop("$ref", None)
