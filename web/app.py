"""The web app's routes: sign-up, verification, login/logout, dashboard and agent pages.

Every POST form carries a CSRF token that must equal the `slopbox.csrf` cookie (double submit,
compared in constant time); a mismatch is a 403 page. Errors never show a stack trace: the
handlers below turn anything unexpected into a plain 500 page (the trace goes to the log).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.exceptions import HTTPException as StarletteHTTPException

from db.engine import make_engine, session_factory
from db.models import User
from notifications.email import send as send_email
from settings import Settings
from web import auth
from web.api_client import ApiError, ControlPlane
from web.charts import bar_chart
from web.presets import PRESETS

log = logging.getLogger("web")
CSRF_COOKIE = "slopbox.csrf"
MAX_FORM_BYTES = 64 * 1024
MIN_PASSWORD = 10


class PageError(Exception):
    """Rendered as an error page with this status; `detail` is shown to the user."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters["bytes"] = _human_bytes
    env.filters["money"] = lambda cents: f"${cents / 100:,.2f}"
    return env


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def create_app(settings: Settings, *, api_transport: httpx.AsyncBaseTransport | None = None,
               engine: AsyncEngine | None = None) -> FastAPI:
    """`api_transport` lets tests run the API in-process; production calls WEB_API_URL over HTTP."""
    secure = settings.web_url.startswith("https://")
    session_cookie = auth.cookie_name(secure)
    templates = _templates()
    limiter = auth.LoginLimiter(settings.web_login_max_failures, settings.web_login_window_s)

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
    app.state.limiter = limiter

    # -- plumbing ------------------------------------------------------------------------------------

    @app.middleware("http")
    async def csrf_cookie(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        token = request.cookies.get(CSRF_COOKIE)
        fresh = not token or len(token) != 43
        request.state.csrf = secrets.token_urlsafe(32) if fresh else token
        response = await call_next(request)
        if fresh:
            response.set_cookie(CSRF_COOKIE, request.state.csrf, httponly=True, samesite="lax", secure=secure, path="/")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = templates.get_template(name).render(csrf=request.state.csrf, user=getattr(request.state, "user", None),
                                                   **ctx)
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        if exc.status == 401:
            return RedirectResponse("/login", status_code=303)
        return render(request, "error.html", exc.status, title=exc.title, detail=exc.detail)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        """An API refusal no page handled itself: its readable sentence, never a trace."""
        status = exc.status if 400 <= exc.status < 600 else 502
        return render(request, "error.html", status, title=exc.title, detail=_readable(exc))

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

    async def form(request: Request) -> dict[str, str]:
        """The urlencoded form, after the CSRF check (403 when the token is missing or wrong)."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise PageError(413, "Form too large", "That form was larger than this site accepts.")
        fields = {k: v[0] for k, v in parse_qs(body.decode(errors="replace"), keep_blank_values=True).items()}
        cookie = request.cookies.get(CSRF_COOKIE) or ""
        if not cookie or not auth.same(fields.get("csrf_token", ""), cookie):
            raise PageError(403, "Form expired", "This form was not sent from this site or has expired. "
                                                 "Go back, reload the page and send it again.")
        return fields

    async def signed_in(request: Request) -> User | None:
        async with request.app.state.sessions() as db:
            user = await auth.session_user(db, request.cookies.get(session_cookie))
        request.state.user = user
        return user

    async def require_user(request: Request) -> tuple[User, ControlPlane]:
        user = await signed_in(request)
        if user is None or user.id is None:
            raise PageError(401, "Please log in", "Log in to see this page.")
        return user, ControlPlane(request.app.state.api, user.id)

    def db_session(request: Request) -> AsyncSession:
        factory: async_sessionmaker[AsyncSession] = request.app.state.sessions
        return factory()

    async def mail_link(to: str, subject: str, text: str) -> bool:
        msg = EmailMessage()
        msg["From"] = settings.smtp_from
        msg["To"] = to
        msg["Subject"] = f"[Slopbox] {subject}"
        msg.set_content(text)
        try:
            await send_email(settings, msg)
        except Exception:
            log.warning("could not send %r mail (SMTP_HOST %s)", subject, settings.smtp_host, exc_info=True)
            return False
        return True

    # -- public pages --------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def landing(request: Request) -> Response:
        user = await signed_in(request)
        try:  # pricing for everyone, signed in or not
            plans: list[dict[str, Any]] = await ControlPlane(request.app.state.api, user.id if user else None).get(
                "/plans")
        except ApiError:
            plans = []
        return render(request, "landing.html", plans=plans)

    @app.get("/signup", response_class=HTMLResponse)
    async def signup_page(request: Request) -> Response:
        return render(request, "signup.html")

    @app.post("/signup", response_class=HTMLResponse)
    async def signup(request: Request) -> Response:
        fields = await form(request)
        email = auth.normalize_email(fields.get("email", ""))
        password = fields.get("password", "")
        name = fields.get("name", "").strip()[:255] or None
        if "@" not in email or len(email) > 255 or any(c.isspace() for c in email):
            return render(request, "signup.html", 400, error="Enter a valid email address.", email=email, name=name)
        if len(password) < MIN_PASSWORD or len(password) > 1024:
            return render(request, "signup.html", 400, error=f"Use a password of at least {MIN_PASSWORD} characters.",
                          email=email, name=name)
        async with db_session(request) as db:
            existing = await auth.user_by_email(db, email)
            if existing is not None and existing.email_verified is not None:
                # Say the same as for a new address: whether an account exists is not told here.
                await mail_link(email, "You already have an account",
                                f"Someone tried to sign up with this address. Log in at {settings.web_url}/login\n")
                return render(request, "message.html", title="Check your email",
                              detail=f"We sent a link to {email}. Open it to verify your address.")
            if existing is None:
                existing = User(email=email, name=name, password_hash=auth.hash_password(password))
                db.add(existing)
            else:  # signed up before and never verified: the latest password counts
                existing.password_hash = auth.hash_password(password)
            raw = await auth.new_verification_token(db, email)
            await db.commit()
        link = f"{settings.web_url}/verify?{urlencode({'email': email, 'token': raw})}"
        sent = await mail_link(email, "Verify your email",
                               f"Welcome to Slopbox.\n\nOpen this link to verify your address:\n{link}\n\n"
                               f"It works once and expires in 24 hours.\n")
        if not sent:
            return render(request, "message.html", 503, title="Email could not be sent",
                          detail="Your account was created but the verification email could not be sent. "
                                 "Sign up again with the same address in a moment to get a new link.")
        return render(request, "message.html", title="Check your email",
                      detail=f"We sent a link to {email}. Open it to verify your address.")

    @app.get("/verify", response_class=HTMLResponse)
    async def verify_page(request: Request, email: str = "", token: str = "") -> Response:
        """The mailed link only shows a button: mail scanners that fetch links do not use up the token."""
        return render(request, "verify.html", email=email[:255], token=token[:255])

    @app.post("/verify", response_class=HTMLResponse)
    async def verify(request: Request) -> Response:
        fields = await form(request)
        email = auth.normalize_email(fields.get("email", ""))[:255]
        token = fields.get("token", "")
        address = request.client.host if request.client else "unknown"
        if limiter.blocked(email, address):
            return render(request, "error.html", 429, title="Too many attempts",
                          detail="Too many failed attempts. Wait a few minutes and try again.")
        async with db_session(request) as db:
            # The password chosen at sign-up is asked again: someone who signed up with another
            # person's address cannot have that person verify an account whose password they know.
            account = await auth.user_by_email(db, email) if email else None
            if not auth.check_password(account.password_hash if account else None, fields.get("password", "")):
                limiter.failed(email, address)
                return render(request, "verify.html", 401, email=email, token=token[:255],
                              error="That is not the password this account was created with.")
            ok = bool(token) and await auth.use_verification_token(db, email, token)
            user = account if ok else None
            if user is not None:
                user.email_verified = user.email_verified or datetime.now(UTC)
            await db.commit()
        if user is None:
            return render(request, "message.html", 400, title="Link not valid",
                          detail="This verification link was already used, has expired or is wrong. "
                                 "Sign up again with the same address to get a new one.")
        return render(request, "message.html", title="Email verified",
                      detail="Your address is verified. You can log in now.", login_link=True)

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        return render(request, "login.html")

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        fields = await form(request)
        email = auth.normalize_email(fields.get("email", ""))[:255]
        address = request.client.host if request.client else "unknown"
        if limiter.blocked(email, address):
            return render(request, "error.html", 429, title="Too many attempts",
                          detail="Too many failed logins. Wait a few minutes and try again.")
        async with db_session(request) as db:
            user = await auth.user_by_email(db, email) if email else None
            ok = auth.check_password(user.password_hash if user else None, fields.get("password", ""))
            if not ok or user is None or user.id is None:
                limiter.failed(email, address)
                return render(request, "login.html", 401, error="Wrong email or password.", email=email)
            if user.email_verified is None:
                return render(request, "login.html", 403, email=email,
                              error="Verify your email first: open the link we sent you "
                                    "(sign up again to get a new one).")
            limiter.succeeded(email)
            token, expires = await auth.create_session(db, user.id)
            await db.commit()
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(session_cookie, token, expires=expires, httponly=True, samesite="lax",
                            secure=secure, path="/")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await form(request)
        token = request.cookies.get(session_cookie)
        if token:
            async with db_session(request) as db:
                await auth.delete_session(db, token)
                await db.commit()
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(session_cookie, path="/", secure=secure, httponly=True, samesite="lax")
        return response

    # -- signed-in pages -----------------------------------------------------------------------------

    async def unread(api: ControlPlane) -> int | None:
        try:
            return int((await api.get("/users/me/notifications?limit=1"))["unread_count"])
        except (ApiError, KeyError, TypeError, ValueError):
            return None

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard(request: Request) -> Response:
        _user, api = await require_user(request)
        page = await api.get("/agents?limit=100")
        return render(request, "dashboard.html", agents=page["items"], unread=await unread(api), presets=PRESETS)

    @app.post("/agents")
    async def new_agent(request: Request) -> Response:
        _user, api = await require_user(request)
        fields = await form(request)
        preset = fields.get("preset", "helpful")
        if preset not in PRESETS:
            preset = "helpful"
        try:
            agent = await api.post("/agents", {"name": fields.get("name", "")})
        except ApiError as err:
            page = await api.get("/agents?limit=100")
            return render(request, "dashboard.html", 400 if err.status == 422 else err.status, agents=page["items"],
                          unread=await unread(api), presets=PRESETS, error=_readable(err))
        try:
            await api.call("PATCH", f"/agents/{agent['id']}/settings", {"files": {"SOUL.md": PRESETS[preset][1]}})
        except ApiError as err:  # the agent exists: say why its personality is not set, and go on
            log.warning("personality not saved for a new agent: %s", err)
        notice = await provision(api, agent["id"])
        target = f"/agents/{agent['id']}" + (f"?{urlencode({'notice': notice})}" if notice else "")
        return RedirectResponse(target, status_code=303)

    async def provision(api: ControlPlane, agent_id: str) -> str | None:
        """Start ProvisionVps on the plan's first local config (else its first); a reason when refused."""
        me = await api.get("/users/me")
        configs = me["plan"]["vps_configs"]
        local = [c for c in configs if c.get("provider") == "local"] or configs
        if not local:
            return "Your plan offers no VPS configuration to run this agent on."
        try:
            await api.post(f"/agents/{agent_id}/vps", {"vps_config_id": local[0]["id"]})
        except ApiError as err:
            return _readable(err)
        return None

    async def agent_or_404(api: ControlPlane, agent_id: uuid.UUID) -> dict[str, Any]:
        try:
            return await api.get(f"/agents/{agent_id}")  # type: ignore[no-any-return]
        except ApiError as err:
            if err.status == 404:
                raise PageError(404, "Agent not found", "There is no such agent in your account.") from None
            raise

    @app.get("/agents/{agent_id}", response_class=HTMLResponse)
    async def agent_page(request: Request, agent_id: uuid.UUID, notice: str = "") -> Response:
        _user, api = await require_user(request)
        return await show_agent(request, api, agent_id, notice=notice[:500] or None)

    async def show_agent(request: Request, api: ControlPlane, agent_id: uuid.UUID, status: int = 200,
                         notice: str | None = None) -> Response:
        agent = await agent_or_404(api, agent_id)
        vps = agent.get("vps")
        busy = bool(vps and (vps.get("operation_id") or vps.get("state") == "provisioning"))
        usage, chart = None, None
        try:
            usage = await api.get(f"/agents/{agent_id}/usage")
            days = usage.get("daily") or []
            chart = bar_chart([d["day"] for d in days], [int(d["cpu_ms"]) // 1000 for d in days],
                              "CPU seconds per day this month", "CPU s")
        except ApiError:
            usage = None
        chat_url = f"{settings.proxy_url}/agents/{agent_id}/gateway/"
        return render(request, "agent.html", status, agent=agent, vps=vps, busy=busy, notice=notice, usage=usage,
                      chart=chart, chat_url=chat_url, unread=await unread(api))

    async def act(request: Request, agent_id: uuid.UUID, method: str, path: str, body: Any = None) -> Response:
        _user, api = await require_user(request)
        await form(request)
        await agent_or_404(api, agent_id)
        try:
            if path == "provision":
                reason = await provision(api, str(agent_id))
                if reason:
                    return await show_agent(request, api, agent_id, 409, notice=reason)
            else:
                await api.call(method, f"/agents/{agent_id}/vps{path}", body)
        except ApiError as err:
            return await show_agent(request, api, agent_id, err.status if err.status >= 400 else 400,
                                    notice=_readable(err))
        return RedirectResponse(f"/agents/{agent_id}", status_code=303)

    @app.post("/agents/{agent_id}/start")
    async def start(request: Request, agent_id: uuid.UUID) -> Response:
        return await act(request, agent_id, "POST", "/start")

    @app.post("/agents/{agent_id}/stop")
    async def stop(request: Request, agent_id: uuid.UUID) -> Response:
        return await act(request, agent_id, "POST", "/stop")

    @app.post("/agents/{agent_id}/provision")
    async def reprovision(request: Request, agent_id: uuid.UUID) -> Response:
        return await act(request, agent_id, "POST", "provision")

    @app.get("/agents/{agent_id}/destroy", response_class=HTMLResponse)
    async def confirm_destroy(request: Request, agent_id: uuid.UUID) -> Response:
        _user, api = await require_user(request)
        return render(request, "destroy.html", agent=await agent_or_404(api, agent_id))

    @app.post("/agents/{agent_id}/destroy")
    async def destroy(request: Request, agent_id: uuid.UUID) -> Response:
        return await act(request, agent_id, "DELETE", "")

    return app


def _readable(err: ApiError) -> str:
    """A conflict reads as "wait", not as an error: the API's detail says what is running."""
    if err.status == 409:
        return f"{err.title}: {err.detail} If something is running, wait: this page updates when it ends."
    if err.status == 422:
        return "Check the form: the name must be 1 to 64 characters, without control characters."
    return f"{err.title}: {err.detail}"
