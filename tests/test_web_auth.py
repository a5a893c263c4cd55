"""The web app's accounts beyond sign-up: password reset, the account page, log out everywhere, OAuth.

Real parts: the web app in-process over ASGI, real PostgreSQL, a real SMTP sink (aiosmtpd), a fake
OAuth provider that is a real HTTP server (tests/fake_oauth_provider.py) reached by the web app over
HTTP, and for "log out everywhere" the real proxy with the gateway simulator behind it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
import pytest_asyncio
from cryptography.fernet import Fernet
from pydantic import SecretStr

from db.encryption import Keyring
from notifications.sink import LoggingHandler, serve
from settings import Settings
from tests.conftest import free_port
from tests.fake_oauth_provider import FakeOAuthProvider, running_provider
from tests.proxy_harness import Browser, next_close, point_vps_at, running_proxy, seed_gateway_user, simulator_for
from tests.test_web_app import csrf_of, post_form, wait_for
from web import auth
from web.app import create_app as create_web

pytestmark = pytest.mark.asyncio(loop_scope="session")
PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new passphrase"
CLIENTS = {"google-client": "google-secret", "github-client": "github-secret"}
COOKIE = "authjs.session-token"


@dataclass
class AuthWeb:
    settings: Settings
    mail: LoggingHandler
    oauth: FakeOAuthProvider
    app: Any

    def browser(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=self.settings.web_url,
                                 timeout=60.0)

    async def mail_to(self, email: str, subject: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            return next((m for m in self.mail.received if email in m["rcpt_to"] and subject in m["subject"]), None)
        return await wait_for(f"the {subject!r} mail to {email}", probe, timeout=60)  # type: ignore[no-any-return]


@pytest_asyncio.fixture(loop_scope="session")
async def aweb(settings: Settings, db: str) -> AsyncIterator[AuthWeb]:
    """The web app with both OAuth providers configured against the fake provider. Nothing here calls
    the control-plane API, so it is left unreachable."""
    handler = LoggingHandler()
    port = free_port()
    server = await serve("127.0.0.1", port, handler)
    try:
        async with running_provider(CLIENTS) as fake:
            web_settings = settings.model_copy(update={
                "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_starttls": False, "smtp_user": None,
                "web_login_max_failures": 3, "web_public_url": "http://127.0.0.1:3000",
                "web_api_url": f"http://127.0.0.1:{free_port()}",
                "google_client_id": "google-client", "google_client_secret": SecretStr("google-secret"),
                "github_client_id": "github-client", "github_client_secret": SecretStr("github-secret"),
                **fake.settings()})
            app = create_web(web_settings)
            async with app.router.lifespan_context(app):
                yield AuthWeb(settings=web_settings, mail=handler, oauth=fake, app=app)
    finally:
        server.close()
        await server.wait_closed()


def new_email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}@example.com"


def add_user(sql: psycopg.Connection, email: str, *, verified: bool = True,
             password: str | None = PASSWORD) -> uuid.UUID:
    row = sql.execute(
        'INSERT INTO users (email, "emailVerified", password_hash) VALUES (%s, %s, %s) RETURNING id',
        (email, datetime.now(UTC) if verified else None, auth.hash_password(password) if password else None)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def sessions_of(sql: psycopg.Connection, user_id: uuid.UUID) -> int:
    row = sql.execute('SELECT count(*) FROM sessions WHERE "userId" = %s', (user_id,)).fetchone()
    assert row is not None
    return int(row[0])


async def log_in(b: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await post_form(b, "/login", "/login", {"email": email, "password": password})


def link_in(message: dict[str, Any], path: str) -> tuple[str, dict[str, str]]:
    """The mailed link as (path?query, its query fields)."""
    found = re.search(rf"http://\S+{path}\?\S+", message["body"])
    assert found, message
    parts = urlsplit(found.group(0))
    return f"{parts.path}?{parts.query}", {k: v[0] for k, v in parse_qs(parts.query).items()}


async def ask_reset(aweb: AuthWeb, b: httpx.AsyncClient, email: str) -> httpx.Response:
    return await post_form(b, "/forgot", "/forgot", {"email": email})


async def set_new_password(b: httpx.AsyncClient, target: str, password: str = NEW_PASSWORD,
                           confirm: str | None = None) -> httpx.Response:
    page = await b.get(target)
    assert page.status_code == 200 and "Choose a new password" in page.text, page.text
    fields = dict(re.findall(r'name="(email|token)" value="([^"]*)"', page.text))
    return await b.post("/reset", data={**fields, "password": password, "confirm": confirm or password,
                                        "csrf_token": csrf_of(page.text)})


# --- password reset --------------------------------------------------------------------------------

async def test_password_reset_flow(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("reset")
    user_id = add_user(sql, email)
    async with aweb.browser() as one, aweb.browser() as two, aweb.browser() as b:
        assert (await log_in(one, email)).status_code == 303
        assert (await log_in(two, email)).status_code == 303
        assert sessions_of(sql, user_id) == 2

        login = await b.get("/login")
        assert 'href="/forgot"' in login.text and "Forgot password?" in login.text
        asked = await ask_reset(aweb, b, email)
        assert asked.status_code == 200 and "If an account exists" in asked.text
        target, query = link_in(await aweb.mail_to(email, "Reset your password"), "/reset")
        stored = sql.execute("SELECT identifier, token FROM verification_token WHERE identifier LIKE %s",
                             (f"%{email}",)).fetchall()
        assert [r[0] for r in stored] == [f"reset:{email}"]
        assert stored[0][1] != query["token"] and query["token"] not in stored[0][1]  # hashed at rest

        for _ in range(2):  # opening the link (a mail scanner might) changes nothing
            assert (await b.get(target)).status_code == 200
        short = await set_new_password(b, target, "short")
        assert short.status_code == 400 and "at least 10 characters" in short.text
        differ = await set_new_password(b, target, NEW_PASSWORD, "something else entirely")
        assert differ.status_code == 400 and "differ" in differ.text
        done = await set_new_password(b, target)  # the link still works after those mistakes
        assert done.status_code == 200 and "Password changed" in done.text, done.text

        assert sessions_of(sql, user_id) == 0  # every old session ended
        for old in (one, two):
            after = await old.get("/account")
            assert after.status_code == 303 and after.headers["location"] == "/login"
        again = await set_new_password(b, target, "yet another passphrase")
        assert again.status_code == 400 and "Link not valid" in again.text and "Ask for a new one" in again.text
        assert (await log_in(b, email)).status_code == 401  # the old password is gone
        assert (await log_in(b, email, NEW_PASSWORD)).status_code == 303


async def test_reset_page_tells_nothing_about_accounts(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    known, unknown = new_email("known"), new_email("unknown")
    add_user(sql, known)
    async with aweb.browser() as b:
        nobody = await ask_reset(aweb, b, unknown)
        somebody = await ask_reset(aweb, b, known)
    assert nobody.status_code == somebody.status_code == 200
    assert nobody.text.replace(unknown, "X") == somebody.text.replace(known, "X")
    await aweb.mail_to(known, "Reset your password")
    assert not [m for m in aweb.mail.received if unknown in m["rcpt_to"]]
    assert sql.execute("SELECT count(*) FROM verification_token WHERE identifier = %s",
                       (f"reset:{unknown}",)).fetchone() == (0,)


async def test_reset_verifies_an_unverified_email(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("unverified")
    async with aweb.browser() as b:
        signup = await post_form(b, "/signup", "/signup", {"email": email, "password": PASSWORD})
        assert signup.status_code == 200
        verify_target, _ = link_in(await aweb.mail_to(email, "Verify your email"), "/verify")
        assert (await log_in(b, email)).status_code == 403  # not verified yet
        await ask_reset(aweb, b, email)
        reset_target, reset_query = link_in(await aweb.mail_to(email, "Reset your password"), "/reset")

        # The reset token cannot verify the address ...
        landing = await b.get(verify_target)
        fields = dict(re.findall(r'name="(email|token)" value="([^"]*)"', landing.text))
        wrong = await b.post("/verify", data={"email": email, "token": reset_query["token"], "password": PASSWORD,
                                              "csrf_token": csrf_of(landing.text)})
        assert wrong.status_code == 400 and "Link not valid" in wrong.text
        # ... and the verification token cannot reset the password.
        swapped = f"/reset?email={email}&token={fields['token']}"
        refused = await set_new_password(b, swapped)
        assert refused.status_code == 400 and "Link not valid" in refused.text
        assert (await log_in(b, email)).status_code == 403

        done = await set_new_password(b, reset_target)
        assert done.status_code == 200 and "Password changed" in done.text
    row = sql.execute('SELECT "emailVerified" FROM users WHERE email = %s', (email,)).fetchone()
    assert row is not None and row[0] is not None
    async with aweb.browser() as b:
        assert (await log_in(b, email, NEW_PASSWORD)).status_code == 303


async def test_expired_or_wrong_reset_token_reads_well(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("expired")
    user_id = add_user(sql, email)
    async with aweb.browser() as b:
        await ask_reset(aweb, b, email)
        target, query = link_in(await aweb.mail_to(email, "Reset your password"), "/reset")
        wrong = await set_new_password(b, f"/reset?email={email}&token={'x' * 43}")
        assert wrong.status_code == 400 and "Link not valid" in wrong.text and "Traceback" not in wrong.text
        other = await set_new_password(b, f"/reset?email=someone-else%40example.com&token={query['token']}")
        assert other.status_code == 400 and "Link not valid" in other.text
        sql.execute("UPDATE verification_token SET expires = now() - interval '1 minute' WHERE identifier = %s",
                    (f"reset:{email}",))
        expired = await set_new_password(b, target)
        assert expired.status_code == 400 and "expired" in expired.text
    row = sql.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,)).fetchone()
    assert row is not None and auth.check_password(row[0], PASSWORD)  # unchanged


async def test_the_login_limit_holds_across_web_processes(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    """Two web apps on one database, as two processes behind a load balancer: failures on either
    count for both (it was per process: N processes, N times the guesses)."""
    email = new_email("spread")
    add_user(sql, email)
    other = create_web(aweb.settings)
    async with other.router.lifespan_context(other), aweb.browser() as one, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=other), base_url=aweb.settings.web_url, timeout=60.0) as two:
        for b, guess in ((one, "wrong guess one"), (two, "wrong guess two"), (one, "wrong guess three")):
            assert (await log_in(b, email, guess)).status_code == 401
        assert (await log_in(two, email)).status_code == 429  # even the right password waits, on both
        assert (await log_in(one, email)).status_code == 429
    keys = [bytes(r[0]) for r in sql.execute("SELECT key FROM web_login_failures WHERE scope = 'login'").fetchall()]
    assert len(keys) == 6 and all(len(k) == 32 for k in keys)  # email and address, as digests only


async def test_reset_requests_are_rate_limited(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("flood")
    add_user(sql, email)
    async with aweb.browser() as b:
        for _ in range(aweb.settings.web_reset_max_requests):
            assert (await ask_reset(aweb, b, email)).status_code == 200
        limited = await ask_reset(aweb, b, email)
    assert limited.status_code == 429 and "Too many" in limited.text


async def test_forms_need_the_csrf_token(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("csrf")
    user_id = add_user(sql, email)
    async with aweb.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        for action, data in (("/forgot", {"email": email}),
                             ("/reset", {"email": email, "token": "t", "password": NEW_PASSWORD,
                                         "confirm": NEW_PASSWORD}),
                             ("/account/password", {"current": PASSWORD, "password": NEW_PASSWORD,
                                                    "confirm": NEW_PASSWORD}),
                             ("/account/logout-everywhere", {}),
                             ("/api/auth/signin/google", {})):
            resp = await b.post(action, data={**data, "csrf_token": "forged" * 7 + "x"})
            assert resp.status_code == 403 and "Form expired" in resp.text, action
    assert sessions_of(sql, user_id) == 1
    assert aweb.oauth.pkce_seen == []


# --- the account page ------------------------------------------------------------------------------

async def test_account_page_and_change_password(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("acct")
    user_id = add_user(sql, email)
    async with aweb.browser() as b, aweb.browser() as elsewhere:
        assert (await b.get("/account")).headers["location"] == "/login"
        assert (await log_in(b, email)).status_code == 303
        assert (await log_in(elsewhere, email)).status_code == 303
        page = await b.get("/account")
        assert page.status_code == 200 and email in page.text and "Email and password" in page.text
        assert "Log out everywhere" in page.text and 'href="/account"' in page.text

        async def change(current: str, new: str, confirm: str | None = None) -> httpx.Response:
            return await post_form(b, "/account", "/account/password",
                                   {"current": current, "password": new, "confirm": confirm or new})

        wrong = await change("not my password", NEW_PASSWORD)
        assert wrong.status_code == 401 and "not your current password" in wrong.text
        short = await change(PASSWORD, "short")
        assert short.status_code == 400 and "at least 10" in short.text
        assert sessions_of(sql, user_id) == 2
        ok = await change(PASSWORD, NEW_PASSWORD)
        assert ok.status_code == 200 and "Signed out 1 other session" in ok.text
        assert sessions_of(sql, user_id) == 1
        assert (await b.get("/account")).status_code == 200  # this browser stays signed in
        assert (await elsewhere.get("/account")).headers["location"] == "/login"
        for _ in range(3):  # web_login_max_failures
            assert (await change("guessing wrong!!", "whatever123456")).status_code == 401
        limited = await change(NEW_PASSWORD, "whatever123456")  # even the right one waits now
        assert limited.status_code == 429
        # The guesses count against log-in too (the same limiter): the account is held for the window.
        assert (await log_in(b, email, NEW_PASSWORD)).status_code == 429
    row = sql.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,)).fetchone()
    assert row is not None and auth.check_password(row[0], NEW_PASSWORD)


async def test_logout_everywhere_closes_the_control_ui_socket(aweb: AuthWeb, settings: Settings,
                                                             sql: psycopg.Connection, tmp_path: Path) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)  # a user with an agent and one session already
    email = new_email("everywhere")
    sql.execute('UPDATE users SET email = %s, "emailVerified" = now(), password_hash = %s WHERE id = %s',
                (email, auth.hash_password(PASSWORD), seeded.user_id))
    async with simulator_for(settings, tmp_path / "gw", seeded) as sim:
        point_vps_at(sql, seeded.vps_id, sim.port)
        async with running_proxy(settings) as proxy, aweb.browser() as b:
            assert (await log_in(b, email)).status_code == 303
            token = b.cookies.get(COOKIE)
            assert token and sessions_of(sql, seeded.user_id) == 2
            browser = Browser(proxy.url, token)  # the Control UI opened with the web app's cookie
            try:
                ws, hello = await browser.handshake(seeded.agent_id)
                assert hello["ok"] is True
                resp = await post_form(b, "/account", "/account/logout-everywhere", {})
                assert resp.status_code == 303 and resp.headers["location"] == "/login"
                assert sessions_of(sql, seeded.user_id) == 0
                assert not b.cookies.get(COOKIE)
                code, _ = await next_close(ws, timeout=30)
                assert code == 1008
            finally:
                await browser.close()


# --- OAuth -----------------------------------------------------------------------------------------

async def start_oauth(aweb: AuthWeb, b: httpx.AsyncClient, provider: str, page: str = "/login") -> httpx.Response:
    """Click the provider's button, and let the provider send the browser back: the callback's response."""
    shown = await b.get(page)
    assert f'action="/api/auth/signin/{provider}"' in shown.text
    started = await b.post(f"/api/auth/signin/{provider}", data={"csrf_token": csrf_of(shown.text)})
    assert started.status_code == 303, started.text
    location = started.headers["location"]
    assert location.startswith(f"{aweb.oauth.url}/{provider}/authorize?")
    async with httpx.AsyncClient() as outside:  # the browser at the provider's site
        at_provider = await outside.get(location)
    assert at_provider.status_code == 302, at_provider.text
    back = urlsplit(at_provider.headers["location"])
    assert f"{back.scheme}://{back.netloc}" == aweb.settings.web_url
    assert back.path == f"/api/auth/callback/{provider}"
    return await b.get(f"{back.path}?{back.query}")


def google_person(aweb: AuthWeb, email: str, *, verified: bool = True) -> str:
    sub = str(uuid.uuid4().int)[:21]
    aweb.oauth.google = {"sub": sub, "email": email, "email_verified": verified, "name": "Goo Gle",
                         "picture": "https://example.com/p.png"}
    return sub


def accounts_of(sql: psycopg.Connection, email: str) -> list[tuple[Any, ...]]:
    return sql.execute(
        'SELECT a.provider, a."providerAccountId", a.type, a.access_token, a.refresh_token, a.id_token '
        'FROM accounts a JOIN users u ON u.id = a."userId" WHERE u.email = %s ORDER BY a.provider',
        (email,)).fetchall()


async def test_google_first_login_creates_then_reuses(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("goo")
    sub = google_person(aweb, email)
    async with aweb.browser() as b:
        signup = await b.get("/signup")
        assert "Continue with Google" in signup.text and "Continue with GitHub" in signup.text
        done = await start_oauth(aweb, b, "google", "/signup")
        assert done.status_code == 303 and done.headers["location"] == "/dashboard", done.text
        token = b.cookies.get(COOKIE)
        assert token and uuid.UUID(token)
        assert not b.cookies.get("slopbox.oauth")  # the flow cookie is spent
        account = await b.get("/account")
        assert account.status_code == 200 and email in account.text and "Google" in account.text
    assert aweb.oauth.pkce_seen == ["S256"]
    row = sql.execute('SELECT id, "emailVerified", password_hash, name FROM users WHERE email = %s',
                      (email,)).fetchone()
    assert row is not None and row[1] is not None and row[2] is None and row[3] == "Goo Gle"
    assert accounts_of(sql, email) == [("google", sub, "oidc", None, None, None)]  # tokens never stored
    assert sql.execute('SELECT "userId" FROM sessions WHERE "sessionToken" = %s', (token,)).fetchone() == (row[0],)

    async with aweb.browser() as b:  # the second time: the same user and account, a new session
        again = await start_oauth(aweb, b, "google")
        assert again.status_code == 303 and again.headers["location"] == "/dashboard"
    assert sql.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone() == (1,)
    assert len(accounts_of(sql, email)) == 1
    assert sessions_of(sql, row[0]) == 2


async def test_github_uses_the_primary_verified_email(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    primary, secondary = new_email("ghprimary"), new_email("ghother")
    gh_id = int(uuid.uuid4().int % 10**9)
    aweb.oauth.github_user = {"id": gh_id, "login": "octo", "name": None, "avatar_url": None, "email": None}
    aweb.oauth.github_emails = [{"email": secondary, "primary": False, "verified": True, "visibility": None},
                                {"email": primary.upper(), "primary": True, "verified": True, "visibility": "private"}]
    async with aweb.browser() as b:
        done = await start_oauth(aweb, b, "github")
        assert done.status_code == 303 and done.headers["location"] == "/dashboard", done.text
    assert accounts_of(sql, primary) == [("github", str(gh_id), "oauth", None, None, None)]
    assert sql.execute("SELECT name FROM users WHERE email = %s", (primary,)).fetchone() == ("octo",)
    assert sql.execute("SELECT count(*) FROM users WHERE email = %s", (secondary,)).fetchone() == (0,)


async def test_github_unverified_primary_is_refused(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("ghunverified")
    aweb.oauth.github_user = {"id": 4242, "login": "octo2"}
    aweb.oauth.github_emails = [{"email": email, "primary": True, "verified": False},
                                {"email": new_email("ghverified"), "primary": False, "verified": True}]
    async with aweb.browser() as b:
        refused = await start_oauth(aweb, b, "github")
        assert refused.status_code == 403 and "no verified email" in refused.text
        assert not b.cookies.get(COOKIE)
    assert sql.execute("SELECT count(*) FROM accounts").fetchone() == (0,)
    assert sql.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone() == (0,)


async def test_unverified_google_email_is_refused(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    email = new_email("goounverified")
    google_person(aweb, email, verified=False)
    async with aweb.browser() as b:
        refused = await start_oauth(aweb, b, "google")
        assert refused.status_code == 403 and "no verified email" in refused.text
        assert not b.cookies.get(COOKIE)
    assert sql.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone() == (0,)
    assert sql.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


async def test_linking_needs_a_verified_existing_account(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    """Someone signed up with the victim's address (never verified): Google must not join that account."""
    squatted, owned = new_email("squat"), new_email("owned")
    squat_id = add_user(sql, squatted, verified=False)
    owned_id = add_user(sql, owned, verified=True)
    google_person(aweb, squatted)
    async with aweb.browser() as b:
        refused = await start_oauth(aweb, b, "google")
        assert refused.status_code == 403 and "never verified" in refused.text
        assert not b.cookies.get(COOKIE)
    assert accounts_of(sql, squatted) == [] and sessions_of(sql, squat_id) == 0

    sub = google_person(aweb, owned)
    async with aweb.browser() as b:
        done = await start_oauth(aweb, b, "google")
        assert done.status_code == 303, done.text
        page = await b.get("/account")
        assert "Email and password" in page.text and "Google" in page.text
    assert sql.execute('SELECT "userId", "providerAccountId" FROM accounts WHERE provider = %s AND '
                       '"providerAccountId" = %s', ("google", sub)).fetchone() == (owned_id, sub)
    assert sessions_of(sql, owned_id) == 1


async def test_state_mismatch_is_refused(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    google_person(aweb, new_email("state"))
    async with aweb.browser() as b:
        shown = await b.get("/login")
        started = await b.post("/api/auth/signin/google", data={"csrf_token": csrf_of(shown.text)})
        async with httpx.AsyncClient() as outside:
            back = urlsplit((await outside.get(started.headers["location"])).headers["location"])
        query = parse_qs(back.query)
        forged = await b.get(back.path, params={"code": query["code"][0], "state": "not-the-state"})
        assert forged.status_code == 400 and "not from a sign-in started in this browser" in forged.text
        assert not b.cookies.get(COOKIE)
    async with aweb.browser() as stranger:  # the right state, but another browser (no flow cookie)
        replay = await stranger.get(f"{back.path}?{back.query}")
        assert replay.status_code == 400 and not stranger.cookies.get(COOKIE)
    assert aweb.oauth.token_calls == 0  # the code was never exchanged
    assert sql.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


async def test_provider_errors_read_well_and_sign_nobody_in(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    google_person(aweb, new_email("fault"))
    aweb.oauth.deny = True
    async with aweb.browser() as b:
        denied = await start_oauth(aweb, b, "google")
        assert denied.status_code == 400 and "did not allow Slopbox" in denied.text
        assert not b.cookies.get(COOKIE)
    aweb.oauth.deny = False
    aweb.oauth.token_status = 500
    async with aweb.browser() as b:
        broken = await start_oauth(aweb, b, "google")
        assert broken.status_code == 502 and "did not answer as expected" in broken.text
        assert "Traceback" not in broken.text and "google-secret" not in broken.text
        assert not b.cookies.get(COOKIE)
    aweb.oauth.token_status = None
    aweb.oauth.github_user = {"id": 7, "login": "x"}
    aweb.oauth.github_emails = []
    aweb.oauth.clients["github-client"] = "rotated-secret"  # our secret is now wrong: invalid_client
    async with aweb.browser() as b:
        refused = await start_oauth(aweb, b, "github")
        assert refused.status_code == 502 and not b.cookies.get(COOKIE)
    aweb.oauth.clients["github-client"] = "github-secret"
    assert sql.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    assert sql.execute("SELECT count(*) FROM users").fetchone() == (0,)


async def test_unconfigured_providers_are_hidden_and_404(settings: Settings, db: str) -> None:
    plain = settings.model_copy(update={"web_public_url": "http://127.0.0.1:3000",
                                        "google_client_id": "only-an-id", "google_client_secret": None,
                                        "github_client_id": None, "github_client_secret": None})
    app = create_web(plain)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=plain.web_url) as b:
        for page in ("/login", "/signup"):
            shown = await b.get(page)
            assert shown.status_code == 200 and "Continue with" not in shown.text
        for provider in ("google", "github", "nonsense"):
            start = await b.post(f"/api/auth/signin/{provider}", data={"csrf_token": csrf_of(shown.text)})
            assert start.status_code == 404, provider
            assert (await b.get(f"/api/auth/callback/{provider}?code=x&state=y")).status_code == 404


async def test_reset_mail_failure_still_says_the_same(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    """SMTP down: the page is unchanged (it never waits for the mail), and nothing crashes."""
    email = new_email("nosmtp")
    add_user(sql, email)
    app = create_web(aweb.settings.model_copy(update={"smtp_port": free_port()}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=aweb.settings.web_url) as b:
        resp = await ask_reset(aweb, b, email)
        assert resp.status_code == 200 and "If an account exists" in resp.text


async def test_flow_cookie_must_be_ours_fresh_and_for_this_provider(aweb: AuthWeb, sql: psycopg.Connection) -> None:
    """The state travels in an encrypted cookie: a forged, stale or other-provider one is refused
    before any code is exchanged."""
    keys = Keyring(aweb.settings.secret_keys())
    state = "s" * 43

    def flow(provider: str, age_s: int) -> str:
        return keys.encrypt(json.dumps({"p": provider, "s": state, "v": "v" * 64, "t": int(time.time()) - age_s}))

    for cookie in ("not-encrypted", Keyring([Fernet.generate_key().decode()]).encrypt("{}"),
                   flow("google", 16 * 60), flow("github", 0)):
        async with aweb.browser() as b:
            b.cookies.set("slopbox.oauth", cookie, path="/api/auth/")
            resp = await b.get("/api/auth/callback/google", params={"code": "abc", "state": state})
            assert resp.status_code == 400 and "Start again" in resp.text
            assert not b.cookies.get(COOKIE)
    assert aweb.oauth.token_calls == 0
    assert sql.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
