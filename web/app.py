"""The web app's factory: plumbing (CSRF cookie, security headers, error pages) and its routers.

Every POST form carries a CSRF token that must equal the `slopbox.csrf` cookie (double submit,
compared in constant time; `web.pages.form`); a mismatch is a 403 page. Errors never show a stack
trace: the handlers below turn anything unexpected into a plain 500 page (the trace goes to the log).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException

from db.engine import make_engine, session_factory
from settings import Settings
from web import auth
from web.api_client import ApiError
from web.pages import CSRF_COOKIE, PageError, WebContext, log, page_csp, readable, render
from web.routes import account, admin, agent_settings, agents, channels, notifications, oauth, onboarding, public


def create_app(settings: Settings, *, api_transport: httpx.AsyncBaseTransport | None = None,
               engine: AsyncEngine | None = None) -> FastAPI:
    """`api_transport` lets tests run the API in-process; production calls WEB_API_URL over HTTP."""
    context = WebContext(settings=settings,
                         limiter=auth.LoginLimiter("login", settings.web_login_max_failures,
                                                           settings.web_login_window_s))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_engine = engine is None
        eng = engine or make_engine(settings)
        app.state.sessions = session_factory(eng)
        async with httpx.AsyncClient(base_url=settings.web_api_base, transport=api_transport, timeout=30.0,
                                     headers={"Authorization": f"Bearer {settings.api_key()}"}) as client:
            app.state.api = client
            try:
                yield
            finally:
                if own_engine:
                    await eng.dispose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.web = context
    app.state.limiter = context.limiter

    @app.middleware("http")
    async def csrf_cookie(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        token = request.cookies.get(CSRF_COOKIE)
        fresh = not token or len(token) != 43
        request.state.csrf = secrets.token_urlsafe(32) if fresh else token
        request.state.csp_nonce = secrets.token_urlsafe(16)
        response = await call_next(request)
        if fresh:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="lax",
                                secure=context.secure, path="/")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy", page_csp(request.state.csp_nonce))
        return response

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        if exc.status == 401:
            return RedirectResponse("/login", status_code=303)
        return render(request, "error.html", exc.status, title=exc.title, detail=exc.detail)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        """An API refusal no page handled itself: its readable sentence, never a trace."""
        status = exc.status if 400 <= exc.status < 600 else 502
        return render(request, "error.html", status, title=exc.title, detail=readable(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        title = "Page not found" if exc.status_code == 404 else "Request refused"
        return render(request, "error.html", exc.status_code, title=title, detail="")

    @app.exception_handler(RequestValidationError)
    async def bad_path(request: Request, _exc: RequestValidationError) -> Response:
        return render(request, "error.html", 404, title="Page not found", detail="")

    @app.exception_handler(Exception)
    async def crash(request: Request, _exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render(request, "error.html", 500, title="Something went wrong",
                      detail="The page could not be shown. Try again in a moment.")

    for module in (public, account, oauth, agents, admin, onboarding, notifications, channels, agent_settings):
        app.include_router(module.router)
    return app
