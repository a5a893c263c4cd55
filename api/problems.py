"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import PROBLEM_JSON

log = logging.getLogger(__name__)

TYPE_BASE = "https://slopbox.dev/problems/"
RETRY_AFTER_S = 5  # what a 503 tells clients to wait; a database or Temporal restart takes about this long
MAX_ERRORS = 20  # a 422 lists this many validation errors, and counts the rest
MAX_TEXT = 200  # characters kept of an error's field name or message (they may echo client input)


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem+json body."""

    def __init__(self, status: int, title: str, detail: str, *, type_: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = TYPE_BASE + type_ if type_ else "about:blank"
        self.headers = headers
        self.extra = extra


def problem_response(status: int, title: str, detail: str, *, type_: str = "about:blank",
                     instance: str | None = None, headers: dict[str, str] | None = None,
                     **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return _clip(".".join(parts) or "body")


def retry_later(headers: dict[str, str] | None) -> dict[str, str]:
    """A 503 always says when to come back."""
    merged = dict(headers or {})
    if not any(k.lower() == "retry-after" for k in merged):
        merged["Retry-After"] = str(RETRY_AFTER_S)
    return merged


# Server-reported states that mean "cannot serve you now" rather than "your query failed":
# connection exceptions (class 08), shutting down / starting up, too many connections.
UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "53300"}


def _connection_failure(err: BaseException | None) -> bool:
    if isinstance(err, psycopg.InterfaceError):
        return True
    if isinstance(err, psycopg.OperationalError):  # also deadlocks and timeouts: those keep their 500
        state = err.sqlstate
        return state is None or state.startswith("08") or state in UNAVAILABLE_STATES
    return False


def database_unavailable(exc: BaseException) -> bool:
    """Connection-level failures (server down, restarting, pool exhausted), not a failed query."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or _connection_failure(exc.orig)
    return _connection_failure(exc)


def allowed_methods(request: Request) -> str:
    """Every documented method of this path. Starlette's own 405 names only the first matching route's
    methods, and GET and DELETE /agents/{id} are two routes."""
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(request.app.state, "allowed_methods", None)
    if table is None:
        table = []
        for template, operations in request.app.openapi().get("paths", {}).items():
            regex = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$")
            methods = {m.upper() for m in operations}
            table.append((regex, methods | ({"HEAD"} if "GET" in methods else set())))
        request.app.state.allowed_methods = table
    path = request.scope["path"]
    return ", ".join(sorted(set().union(*(methods for regex, methods in table if regex.match(path)))))


def _internal_error(request: Request, exc: BaseException) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return problem_response(500, "Internal error", "An unexpected error occurred; it has been logged.",
                            instance=request.url.path)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        headers = retry_later(exc.headers) if exc.status == 503 else exc.headers
        return problem_response(exc.status, exc.title, exc.detail, type_=exc.type,
                                instance=request.url.path, headers=headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Bounded: a body of thousands of bad keys must not produce a response (and memory) many times its size.
        # The offending input is never echoed; the field and message say what is wrong.
        all_errors = exc.errors()
        errors = [{"field": _field(tuple(e["loc"])), "message": _clip(str(e["msg"])), "type": e["type"]}
                  for e in all_errors[:MAX_ERRORS]]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        if len(all_errors) > len(errors):
            detail += f"; and {len(all_errors) - len(errors)} more"
        return problem_response(422, "Invalid request", detail, type_=TYPE_BASE + "validation",
                                instance=request.url.path, errors=errors, errors_total=len(all_errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {400: "Bad request", 404: "Not found", 405: "Method not allowed",
                 413: "Content too large"}.get(
            exc.status_code, "HTTP error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return problem_response(exc.status_code, title, str(exc.detail), instance=request.url.path,
                                headers=headers or None)

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            return _internal_error(request, exc)
        log.warning("database unavailable", extra={"path": request.url.path, "error": type(exc).__name__})
        return problem_response(503, "Database unavailable",
                                "The database is unavailable, nothing was changed; try again in a few seconds.",
                                type_=TYPE_BASE + "database-unavailable", instance=request.url.path,
                                headers=retry_later(None))

    for exc_class in (DBAPIError, PoolTimeoutError, psycopg.OperationalError, psycopg.InterfaceError):
        app.add_exception_handler(exc_class, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(request, exc)
