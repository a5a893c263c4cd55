"""Sign-in with Google and GitHub: the OAuth 2 authorization code flow with state and PKCE (Authlib).

The paths are Auth.js's (`/api/auth/signin/<provider>`, `/api/auth/callback/<provider>`), so the
redirect URI registered with a provider keeps working if a Next.js + Auth.js frontend replaces this
app. The flow's state and PKCE verifier travel in one short-lived cookie encrypted with the
project's Fernet keys (Auth.js likewise keeps them in encrypted cookies), so nothing is kept in
server memory and a callback is only accepted by the browser that started the flow.

Identity is read from the provider's own API with the access token (Google's userinfo endpoint,
GitHub's /user and /user/emails), over TLS straight from the token endpoint's answer. Provider
tokens are used for that one call and never stored: the `accounts` row holds only provider and
providerAccountId (its token columns stay NULL).

Linking: a known (provider, providerAccountId) signs its user in. Otherwise the provider must say
the email is verified; an existing user with that email is linked only if their email is verified
too (else someone could pre-register a victim's address with a password and later share the
account), and a new email creates a user with `emailVerified` set.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from db.encryption import Keyring, SecretDecryptionError
from db.models import Account, User
from settings import Settings
from web import auth
from web.pages import PageError, ctx, db_session, form, render

router = APIRouter()
log = logging.getLogger("web.oauth")
FLOW_COOKIE = "slopbox.oauth"
FLOW_MAX_AGE_S = 15 * 60  # Auth.js's state/PKCE cookies live 15 minutes too
HTTP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Provider:
    name: str  # Auth.js provider id, stored in accounts.provider
    label: str
    type: str  # accounts.type as Auth.js writes it
    client_id: str
    client_secret: str
    authorize_url: str
    token_url: str
    scope: str
    token_auth: str  # how the client authenticates at the token endpoint


def providers(settings: Settings) -> list[Provider]:
    """The configured providers, in button order; one without both id and secret is not offered."""
    found: list[Provider] = []
    if settings.google_client_id and settings.google_client_secret:
        found.append(Provider("google", "Google", "oidc", settings.google_client_id,
                              settings.google_client_secret.get_secret_value(), settings.oauth_google_authorize_url,
                              settings.oauth_google_token_url, "openid email profile", "client_secret_basic"))
    if settings.github_client_id and settings.github_client_secret:
        found.append(Provider("github", "GitHub", "oauth", settings.github_client_id,
                              settings.github_client_secret.get_secret_value(), settings.oauth_github_authorize_url,
                              settings.oauth_github_token_url, "read:user user:email", "client_secret_post"))
    return found


def provider_or_404(settings: Settings, name: str) -> Provider:
    for p in providers(settings):
        if p.name == name:
            return p
    raise PageError(404, "Page not found", "")


@dataclass(frozen=True)
class Identity:
    account_id: str
    email: str | None
    email_verified: bool
    name: str | None
    image: str | None


class SignInRefused(Exception):
    """Shown to the person as is: why this sign-in did not happen."""


def _client(settings: Settings, p: Provider) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(client_id=p.client_id, client_secret=p.client_secret, scope=p.scope,
                             redirect_uri=callback_url(settings, p), code_challenge_method="S256",
                             token_endpoint_auth_method=p.token_auth, timeout=HTTP_TIMEOUT_S)


def callback_url(settings: Settings, p: Provider) -> str:
    return f"{settings.web_url}/api/auth/callback/{p.name}"


def _keyring(settings: Settings) -> Keyring:
    return Keyring(settings.secret_keys())


@router.post("/api/auth/signin/{provider}")
async def sign_in(request: Request, provider: str) -> Response:
    """A form button (CSRF-checked), so another site cannot start a sign-in in this browser."""
    settings = ctx(request).settings
    p = provider_or_404(settings, provider)
    await form(request)
    verifier = generate_token(64)
    async with _client(settings, p) as client:
        url, state = client.create_authorization_url(p.authorize_url, state=generate_token(32),
                                                     code_verifier=verifier)
    flow = json.dumps({"p": p.name, "s": state, "v": verifier, "t": int(time.time())})
    response = RedirectResponse(url, status_code=303)
    # SameSite=Lax: the provider's redirect back is a top-level GET, which carries it.
    response.set_cookie(FLOW_COOKIE, _keyring(settings).encrypt(flow), max_age=FLOW_MAX_AGE_S, httponly=True,
                        samesite="lax", secure=ctx(request).secure, path="/api/auth/")
    return response


def _refused(request: Request, detail: str, status: int = 400) -> Response:
    response = render(request, "error.html", status, title="Sign-in did not work", detail=detail)
    response.delete_cookie(FLOW_COOKIE, path="/api/auth/", secure=ctx(request).secure, httponly=True,
                           samesite="lax")
    return response


def _flow(request: Request, p: Provider) -> dict[str, Any] | None:
    raw = request.cookies.get(FLOW_COOKIE)
    if not raw or len(raw) > 4096:
        return None
    try:
        flow = json.loads(_keyring(ctx(request).settings).decrypt(raw))
    except (SecretDecryptionError, ValueError):
        return None
    if not isinstance(flow, dict) or flow.get("p") != p.name or time.time() - int(flow.get("t", 0)) > FLOW_MAX_AGE_S:
        return None
    return flow


@router.get("/api/auth/callback/{provider}")
async def callback(request: Request, provider: str) -> Response:
    settings = ctx(request).settings
    p = provider_or_404(settings, provider)
    q = request.query_params
    flow = _flow(request, p)
    if flow is None or not auth.same(q.get("state", ""), str(flow.get("s", ""))):
        return _refused(request, "This sign-in link is not from a sign-in started in this browser, or it has "
                                 "expired. Start again from the log-in page.")
    if q.get("error"):
        if q.get("error") == "access_denied":
            return _refused(request, f"You did not allow Slopbox to use your {p.label} account. Nothing was "
                                     "changed; you can log in another way or try again.")
        return _refused(request, f"{p.label} could not sign you in ({q.get('error', '')[:64]}). Try again.")
    code = q.get("code", "")
    if not code or len(code) > 2048:
        return _refused(request, f"{p.label} sent no sign-in code. Try again.")
    try:
        identity = await _identity(settings, p, code, str(flow.get("v", "")))
    except Exception as err:  # noqa: BLE001 - whatever the provider did (HTTP error, OAuth error, odd JSON,
        # a timeout), the person gets a page; Authlib's HTTP module may be httpx or httpx2, hence no narrower list.
        # The class and status only are logged: the exception text may carry the code or a token.
        status = getattr(getattr(err, "response", None), "status_code", None)
        log.warning("%s sign-in failed: %s%s", p.name, type(err).__name__, f" (HTTP {status})" if status else "")
        return _refused(request, f"{p.label} did not answer as expected, so you are not signed in. "
                                 "Try again in a moment.", 502)
    try:
        user_id = await _user_for(request, p, identity)
    except SignInRefused as refused:
        return _refused(request, str(refused), 403)
    async with db_session(request) as db:
        token, expires = await auth.create_session(db, user_id)
        await db.commit()
    response = RedirectResponse("/dashboard", status_code=303)
    auth.set_session_cookie(response, ctx(request).session_cookie, token, expires, secure=ctx(request).secure)
    response.delete_cookie(FLOW_COOKIE, path="/api/auth/", secure=ctx(request).secure, httponly=True,
                           samesite="lax")
    return response


async def _identity(settings: Settings, p: Provider, code: str, verifier: str) -> Identity:
    async with _client(settings, p) as client:
        await client.fetch_token(p.token_url, code=code, code_verifier=verifier,
                                 headers={"Accept": "application/json"})
        if p.name == "google":
            return _google(await _json(client, settings.oauth_google_userinfo_url))
        api = settings.oauth_github_api_url.rstrip("/")
        return _github(await _json(client, f"{api}/user"), await _json(client, f"{api}/user/emails"))


async def _json(client: AsyncOAuth2Client, url: str) -> Any:
    resp = await client.get(url, headers={"Accept": "application/json"})
    resp.raise_for_status()
    return resp.json()


def _google(info: dict[str, Any]) -> Identity:
    """OpenID Connect userinfo: `sub` is the stable id; `email_verified` is Google's word."""
    return Identity(account_id=str(info["sub"]), email=info.get("email"),
                    email_verified=info.get("email_verified") is True, name=info.get("name"),
                    image=info.get("picture"))


def _github(user: dict[str, Any], emails: list[dict[str, Any]]) -> Identity:
    """GitHub's numeric id; the email is the primary one, and only if GitHub has verified it."""
    primary = next((e for e in emails if isinstance(e, dict) and e.get("primary")), None)
    return Identity(account_id=str(int(user["id"])), email=primary.get("email") if primary else None,
                    email_verified=bool(primary and primary.get("verified") is True),
                    name=user.get("name") or user.get("login"), image=user.get("avatar_url"))


async def _user_for(request: Request, p: Provider, who: Identity) -> uuid.UUID:
    """The user this identity signs in as (linking or creating per the module's rule)."""
    async with db_session(request) as db:
        linked = (await db.exec(select(Account).where(Account.provider == p.name,
                                                      Account.provider_account_id == who.account_id))).first()
        if linked is not None:
            return linked.user_id
        email = auth.normalize_email(who.email or "")
        if not who.email_verified or not auth.valid_email(email):
            raise SignInRefused(f"Your {p.label} account has no verified email address. Verify one with "
                                f"{p.label} (and make it your primary address), then try again.")
        user = await auth.user_by_email(db, email)
        if user is not None and user.email_verified is None:
            raise SignInRefused(f"An account with {email} exists but its address was never verified, so it "
                                f"cannot be joined to your {p.label} account. Verify it with the link we "
                                "mailed, or use \"Forgot password?\" on the log-in page (which verifies it "
                                f"too), then sign in with {p.label} again.")
        try:
            if user is None:
                user = User(email=email, name=(who.name or "")[:255] or None,
                            image=(who.image or "")[:2048] or None, email_verified=datetime.now(UTC))
                db.add(user)
                await db.flush()
            db.add(Account(user_id=user.id, type=p.type, provider=p.name, provider_account_id=who.account_id))
            await db.commit()
        except IntegrityError as err:  # two sign-ins of the same new person at once: the other one won
            raise SignInRefused("This sign-in happened twice at once. Log in again.") from err
        assert user.id is not None
        return user.id


def buttons(settings: Settings) -> list[dict[str, str]]:
    """For the log-in and sign-up pages: one form button per configured provider."""
    return [{"name": p.name, "label": p.label} for p in providers(settings)]

