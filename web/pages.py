"""What every page handler shares: rendering, the CSRF-checked form, the signed-in user, mail.

The web app is a set of routers (`web/routes/`); they reach the app's settings, templates and
clients through `request.app.state.web` (a `WebContext`), so a new page is a new router and
nothing else changes.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from db.models import User
from notifications.email import send as send_email
from settings import Settings
from web import auth
from web.api_client import ApiError, ControlPlane

log = logging.getLogger("web")
CSRF_COOKIE = "slopbox.csrf"
MAX_FORM_BYTES = 1024 * 1024  # the settings form carries three files of up to 64 KiB each, urlencoded
MIN_PASSWORD = 10


class PageError(Exception):
    """Rendered as an error page with this status; `detail` is shown to the user (401 = to /login)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def retrying_text(op: dict[str, Any] | None) -> str | None:
    """A running operation's retried step in words (the API's `retrying`): which attempt failed, why,
    and that nobody has to do anything yet."""
    note = (op or {}).get("retrying")
    if not note:
        return None
    return (f"Attempt {note['attempt']} of step {note['step']} failed: {note['error']}. "
            "It is being tried again automatically.")


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters["bytes"] = human_bytes
    env.filters["money"] = lambda cents: f"${cents / 100:,.2f}"
    env.filters["retrying"] = retrying_text
    return env


@dataclass
class WebContext:
    settings: Settings
    limiter: auth.LoginLimiter
    templates: Environment = field(default_factory=templates)

    @property
    def secure(self) -> bool:
        return self.settings.web_url.startswith("https://")

    @property
    def session_cookie(self) -> str:
        return auth.cookie_name(self.secure)


def ctx(request: Request) -> WebContext:
    return request.app.state.web  # type: ignore[no-any-return]


def page_csp(nonce: str) -> str:
    """Only our own scripts run: the inline ones carry this response's nonce, nothing else may load or
    frame the pages. Styles may be inline (the templates' small <style> blocks and SVG attributes)."""
    return (f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def render(request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = ctx(request).templates.get_template(name).render(
        csrf=request.state.csrf, csp_nonce=getattr(request.state, "csp_nonce", ""),
        user=getattr(request.state, "user", None), **values)
    return HTMLResponse(html, status_code=status)


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


def db_session(request: Request) -> AsyncSession:
    return db_sessions(request)()


def db_sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    return request.app.state.sessions  # type: ignore[no-any-return]


async def signed_in(request: Request) -> User | None:
    async with db_session(request) as db:
        user = await auth.session_user(db, request.cookies.get(ctx(request).session_cookie))
    request.state.user = user
    return user


async def require_user(request: Request) -> tuple[User, ControlPlane]:
    user = await signed_in(request)
    if user is None or user.id is None:
        raise PageError(401, "Please log in", "Log in to see this page.")
    return user, api_for(request, user.id)


def api_for(request: Request, user_id: uuid.UUID | None) -> ControlPlane:
    return ControlPlane(request.app.state.api, user_id)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def mail(settings: Settings, to: str, subject: str, text: str) -> bool:
    """One plain-text mail through the project's mailer; False (logged, never raised) when SMTP fails."""
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


async def unread(api: ControlPlane) -> int | None:
    """The bell's count; None when the API cannot say (the page still renders)."""
    try:
        return int((await api.get("/users/me/notifications?limit=1"))["unread_count"])
    except (ApiError, KeyError, TypeError, ValueError):
        return None


def readable(err: ApiError) -> str:
    """A conflict reads as "wait", not as an error: the API's detail says what is running."""
    if err.status == 409:
        return f"{err.title}: {err.detail} If something is running, wait: this page updates when it ends."
    if err.status == 422:
        return "Check the form: the name must be 1 to 64 characters, without control characters."
    return f"{err.title}: {err.detail}"
