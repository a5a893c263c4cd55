"""`slopbox session create --user ...`: a one-click, dev-only browser sign-in for the local proxy.

In production Auth.js signs people in and writes a `sessions` row; the proxy only reads that row by
the `authjs.session-token` cookie (reference Part B). A local stack has no sign-in page, so this
command stands in for it: it prints a link, and opening it creates an Auth.js-compatible session
row, sets the cookie and redirects to the agent's Control UI on the proxy.

Why it is safe to print:
- dev-only: refused unless the proxy listens on a loopback address (the cookie is plain-HTTP and
  host-only, so it could not work anywhere else anyway);
- loopback-only: the link is served by this command on 127.0.0.1 (an ephemeral port), and a
  request whose Host is not exactly that address is refused (DNS rebinding);
- single-use and short-lived: the link holds a random one-time path, not the session; the session
  row is created only when the link is opened, the server stops after that one use or after
  `--valid-for` seconds, and an unused link leaves nothing behind.

Cookies are scoped by host, not port, so a cookie set by 127.0.0.1:<ephemeral> is sent to the proxy
at 127.0.0.1:<proxy port>.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from sqlalchemy import create_engine, text

from settings import Settings

COOKIE_NAME = "authjs.session-token"
"""Auth.js v5's session cookie over plain HTTP (the `__Secure-` variant needs HTTPS)."""
SESSION_DAYS = 30
"""Auth.js's default database-session lifetime."""


class SessionError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoginTarget:
    user_id: uuid.UUID
    email: str
    agent_id: uuid.UUID
    proxy_url: str
    """Where the browser lands: the proxy, on the host name the cookie is set for."""

    @property
    def control_ui_url(self) -> str:
        return f"{self.proxy_url}/agents/{self.agent_id}/gateway/"


def _loopback_host(proxy_host: str) -> str:
    """The host name the browser should use for the proxy; refuses anything not on this machine."""
    host = proxy_host.strip("[]")
    if host == "localhost":
        return host
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise SessionError(f"PROXY_HOST={proxy_host} is not a loopback address; this command is for a "
                           "local development stack only") from None
    if addr.is_unspecified:  # 0.0.0.0 / :: also listen on loopback
        return "127.0.0.1"
    if not addr.is_loopback:
        raise SessionError(f"PROXY_HOST={proxy_host} is not a loopback address; this command is for a "
                           "local development stack only")
    return f"[{host}]" if addr.version == 6 else host


def resolve_target(sync_url: str, settings: Settings, user: str, agent: str | None) -> LoginTarget:
    """The user (by email or id) and the agent whose Control UI the link opens (default: the newest)."""
    host = _loopback_host(settings.proxy_host)
    engine = create_engine(sync_url)
    try:
        with engine.connect() as conn:
            try:
                row = conn.execute(text("SELECT id, email FROM users WHERE id = :id"),
                                   {"id": uuid.UUID(user)}).first()
            except ValueError:
                row = conn.execute(text("SELECT id, email FROM users WHERE email = :e"),
                                   {"e": user.strip().lower()}).first()
            if row is None:
                raise SessionError(f"no user {user!r} (create one with `slopbox user create --email ...`)")
            user_id, email = row
            if agent is not None:
                try:
                    agent_uuid = uuid.UUID(agent)
                except ValueError:
                    raise SessionError(f"not an agent id: {agent!r}") from None
                agent_id = conn.execute(text("SELECT id FROM agents WHERE id = :a AND user_id = :u"),
                                        {"a": agent_uuid, "u": user_id}).scalar()
                if agent_id is None:
                    raise SessionError(f"{email} has no agent {agent}")
            else:
                agent_id = conn.execute(text("SELECT id FROM agents WHERE user_id = :u ORDER BY created_at DESC "
                                             "LIMIT 1"), {"u": user_id}).scalar()
                if agent_id is None:
                    raise SessionError(f"{email} has no agent yet: create and provision one first "
                                       "(README: 'Chat with your agent')")
    finally:
        engine.dispose()
    return LoginTarget(user_id=user_id, email=email, agent_id=agent_id,
                       proxy_url=f"http://{host}:{settings.proxy_port}")


def create_session(sync_url: str, user_id: uuid.UUID, *, days: int = SESSION_DAYS) -> tuple[str, datetime]:
    """An Auth.js database session: a `sessions` row with a random token; returns (token, expires)."""
    token = secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + timedelta(days=days)
    engine = create_engine(sync_url)
    try:
        with engine.begin() as conn:
            conn.execute(text('INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (:u, :x, :t)'),
                         {"u": user_id, "x": expires, "t": token})
    finally:
        engine.dispose()
    return token, expires


class _LoginServer(HTTPServer):
    def __init__(self, target: LoginTarget, sync_url: str, host: str) -> None:
        if host.startswith("["):
            self.address_family = socket.AF_INET6
        super().__init__(("::1" if host.startswith("[") else "127.0.0.1", 0), _LoginHandler)
        self.target = target
        self.sync_url = sync_url
        self.path_secret = "/login/" + secrets.token_urlsafe(32)
        self.authority = f"{host}:{self.server_address[1]}"
        self.used_until: datetime | None = None

    @property
    def link(self) -> str:
        return f"http://{self.authority}{self.path_secret}"


class _LoginHandler(BaseHTTPRequestHandler):
    server: _LoginServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the path is a one-time secret)
        pass

    def _refuse(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        srv = self.server
        if srv.used_until is not None:
            return self._refuse(410)
        if self.headers.get("Host") != srv.authority:
            return self._refuse(421)
        if not hmac.compare_digest(self.path.encode(), srv.path_secret.encode()):
            return self._refuse(404)
        token, expires = create_session(srv.sync_url, srv.target.user_id)
        srv.used_until = expires
        self.send_response(302)
        self.send_header("Set-Cookie", f"{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Lax; "
                                       f"Max-Age={int((expires - datetime.now(UTC)).total_seconds())}")
        self.send_header("Location", srv.target.control_ui_url)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Length", "0")
        self.end_headers()


def _say(line: str) -> None:
    print(line, flush=True)


def serve_login_link(settings: Settings, sync_url: str, target: LoginTarget, *, valid_for_s: float,
                     say: Callable[[str], None] = _say) -> datetime | None:
    """Print the link and serve it once; returns the session's expiry, or None when it was never opened."""
    server = _LoginServer(target, sync_url, _loopback_host(settings.proxy_host))
    try:
        say(f"Open this link in a browser on this machine to sign in as {target.email} "
            f"(single use, valid {valid_for_s / 60:g} min):")
        say(f"  {server.link}")
        say(f"It opens {target.control_ui_url}")
        deadline = time.monotonic() + valid_for_s
        while server.used_until is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            server.timeout = min(left, 1.0)
            server.handle_request()
        return server.used_until
    finally:
        server.server_close()
