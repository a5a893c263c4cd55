"""A small real OAuth 2 provider over HTTP (aiohttp) speaking Google's and GitHub's dialects (no tests here).

Google: /google/authorize, /google/token, /google/userinfo (OpenID Connect userinfo).
GitHub: /github/authorize, /github/token, /github/api/user, /github/api/user/emails.
It checks what a real provider checks: the client id and secret, the redirect URI, single-use codes
and the PKCE S256 challenge against the verifier, so a client that skips any of them fails here.
Faults are switched on per test: `deny` (the person clicks "Cancel"), `token_status` (the token
endpoint answers with that HTTP status).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import BasicAuth, web

__test__ = False


@dataclass
class Grant:
    provider: str
    client_id: str
    redirect_uri: str
    challenge: str
    profile: dict[str, Any]


@dataclass
class FakeOAuthProvider:
    clients: dict[str, str]  # client id -> secret
    url: str = ""
    google: dict[str, Any] = field(default_factory=dict)  # the userinfo the signed-in person has
    github_user: dict[str, Any] = field(default_factory=dict)
    github_emails: list[dict[str, Any]] = field(default_factory=list)
    deny: bool = False
    token_status: int | None = None
    pkce_seen: list[str] = field(default_factory=list)  # code_challenge_method of each authorize call
    token_calls: int = 0
    _codes: dict[str, Grant] = field(default_factory=dict)
    _tokens: dict[str, Grant] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        for p in ("google", "github"):
            app.router.add_get(f"/{p}/authorize", self.authorize)
            app.router.add_post(f"/{p}/token", self.token)
        app.router.add_get("/google/userinfo", self.userinfo)
        app.router.add_get("/github/api/user", self.gh_user)
        app.router.add_get("/github/api/user/emails", self.gh_emails)
        return app

    async def authorize(self, request: web.Request) -> web.Response:
        q = request.query
        provider = request.path.split("/")[1]
        if q.get("client_id") not in self.clients or q.get("response_type") != "code" or not q.get("redirect_uri"):
            return web.Response(status=400, text="bad authorization request")
        self.pkce_seen.append(q.get("code_challenge_method", ""))
        back = q["redirect_uri"]
        if self.deny:
            raise web.HTTPFound(f"{back}?{urlencode({'error': 'access_denied', 'state': q.get('state', '')})}")
        code = secrets.token_urlsafe(16)
        profile = dict(self.google) if provider == "google" else {"user": dict(self.github_user),
                                                                    "emails": list(self.github_emails)}
        self._codes[code] = Grant(provider, q["client_id"], back, q.get("code_challenge", ""), profile)
        raise web.HTTPFound(f"{back}?{urlencode({'code': code, 'state': q.get('state', '')})}")

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        if self.token_status is not None:
            return web.Response(status=self.token_status, text="provider trouble")
        form = await request.post()
        client_id, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        if "Authorization" in request.headers:
            basic = BasicAuth.decode(request.headers["Authorization"])
            client_id, secret = basic.login, basic.password
        if self.clients.get(client_id) != secret or not secret:
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = self._codes.pop(str(form.get("code", "")), None)
        if grant is None or grant.client_id != client_id or form.get("grant_type") != "authorization_code":
            return web.json_response({"error": "invalid_grant"}, status=400)
        if grant.redirect_uri != form.get("redirect_uri"):
            return web.json_response({"error": "invalid_grant", "error_description": "redirect_uri"}, status=400)
        verifier = str(form.get("code_verifier", ""))
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not grant.challenge or digest != grant.challenge:
            return web.json_response({"error": "invalid_grant", "error_description": "PKCE"}, status=400)
        access = secrets.token_urlsafe(24)
        self._tokens[access] = grant
        return web.json_response({"access_token": access, "token_type": "Bearer", "expires_in": 3599,
                                  "scope": "openid email profile"})

    def _grant(self, request: web.Request, provider: str) -> Grant:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        grant = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if grant is None or grant.provider != provider:
            raise web.HTTPUnauthorized(text="bad token")
        return grant

    async def userinfo(self, request: web.Request) -> web.Response:
        return web.json_response(self._grant(request, "google").profile)

    async def gh_user(self, request: web.Request) -> web.Response:
        return web.json_response(self._grant(request, "github").profile["user"])

    async def gh_emails(self, request: web.Request) -> web.Response:
        return web.json_response(self._grant(request, "github").profile["emails"])

    def settings(self) -> dict[str, Any]:
        """Settings that point the web app at this provider."""
        return {"oauth_google_authorize_url": f"{self.url}/google/authorize",
                "oauth_google_token_url": f"{self.url}/google/token",
                "oauth_google_userinfo_url": f"{self.url}/google/userinfo",
                "oauth_github_authorize_url": f"{self.url}/github/authorize",
                "oauth_github_token_url": f"{self.url}/github/token",
                "oauth_github_api_url": f"{self.url}/github/api"}


@asynccontextmanager
async def running_provider(clients: dict[str, str]) -> AsyncIterator[FakeOAuthProvider]:
    fake = FakeOAuthProvider(clients=clients)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()
