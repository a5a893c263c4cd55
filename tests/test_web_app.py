"""The web app end to end: real web app + real API + real PostgreSQL + Temporal + a real SMTP server.

The web app runs in-process and reaches the API (also in-process) through WEB_API_URL's transport;
mail goes over SMTP to the sink's aiosmtpd server; the proxy's own session lookup
(`proxy.access.AccessResolver`) checks the cookie the web app set.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import pytest_asyncio
from temporalio.client import Client

from api.app import create_app as create_api
from db.engine import make_engine
from notifications.sink import LoggingHandler, serve
from proxy.access import AccessDenied, AccessResolver
from settings import Settings
from tests.conftest import free_port
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, Stack, running_stack
from web import auth
from web.app import create_app as create_web
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")
WAIT_S = 120.0
PASSWORD = "correct horse battery"


@dataclass
class Web:
    settings: Settings
    mail: LoggingHandler
    stack: Stack

    def browser(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=self.settings.web_url,
                                 timeout=60.0)

    app: Any = None
    api: Any = None


@pytest_asyncio.fixture(loop_scope="session")
async def web(settings: Settings, temporal_client: Client, db: str) -> AsyncIterator[Web]:
    handler = LoggingHandler()
    port = free_port()
    server = await serve("127.0.0.1", port, handler)
    web_settings = settings.model_copy(update={
        "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_starttls": False, "smtp_user": None,
        "web_login_max_failures": 3, "web_public_url": "http://127.0.0.1:3000"})
    api = create_api(settings)
    api.state.lifecycle_timeouts = FAST
    try:
        async with running_stack(settings, temporal_client) as stack, api.router.lifespan_context(api):
            app = create_web(web_settings, api_transport=httpx.ASGITransport(app=api))
            async with app.router.lifespan_context(app):
                yield Web(settings=web_settings, mail=handler, stack=stack, app=app, api=api)
    finally:
        server.close()
        await server.wait_closed()


def verified_user(sql: psycopg.Connection, prefix: str) -> tuple[uuid.UUID, str]:
    """A user with a verified email who signs in with PASSWORD: (id, email)."""
    email = f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"
    row = sql.execute('INSERT INTO users (email, "emailVerified", password_hash) VALUES (%s, now(), %s) RETURNING id',
                      (email, auth.hash_password(PASSWORD))).fetchone()
    assert row is not None
    return row[0], email


def never_ready_gateways(web: Web, monkeypatch: pytest.MonkeyPatch, budget_s: float) -> None:
    """Gateways provisioned from now on never become ready; the API gives them `budget_s` to."""
    monkeypatch.setenv("SLOPBOX_SIM_NEVER_READY", "1")
    monkeypatch.setattr(web.api.state, "lifecycle_timeouts",
                        LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": budget_s}))


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def post_form(b: httpx.AsyncClient, page: str, action: str, data: dict[str, str]) -> httpx.Response:
    """Like a browser: load the page with the form (following redirects), send it with its CSRF token."""
    got = await b.get(page, follow_redirects=True)
    return await b.post(action, data={**data, "csrf_token": csrf_of(got.text)})


async def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def sign_up_and_verify(web: Web, b: httpx.AsyncClient, email: str) -> None:
    resp = await post_form(b, "/signup", "/signup", {"email": email, "password": PASSWORD, "name": "Web"})
    assert resp.status_code == 200, resp.text
    assert "Check your email" in resp.text

    async def mail() -> dict[str, Any] | None:
        return next((m for m in web.mail.received if email in m["rcpt_to"]), None)

    message = await wait_for("the verification mail", mail)
    early = await log_in(b, email)
    assert early.status_code == 403 and "Verify your email first" in early.text
    link = re.search(r"http://\S+/verify\?\S+", message["body"])
    assert link, message
    target = urlsplit(link.group(0)).path + "?" + urlsplit(link.group(0)).query
    for _ in range(2):  # following the link (a mail scanner might) verifies nothing by itself
        landing = await b.get(target)
        assert landing.status_code == 200 and "Verify my email" in landing.text
    assert (await log_in(b, email)).status_code == 403
    fields = dict(re.findall(r'name="(email|token)" value="([^"]*)"', landing.text))
    someone_else = await b.post("/verify", data={**fields, "password": "not the sign-up password",
                                                 "csrf_token": csrf_of(landing.text)})
    assert someone_else.status_code == 401  # and the token is still good:
    fields["password"] = PASSWORD
    verified = await b.post("/verify", data={**fields, "csrf_token": csrf_of(landing.text)})
    assert verified.status_code == 200 and "Email verified" in verified.text
    again = await b.post("/verify", data={**fields, "csrf_token": csrf_of(landing.text)})
    assert again.status_code == 400  # single use


async def log_in(b: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await post_form(b, "/login", "/login", {"email": email, "password": password})


async def new_agent(b: httpx.AsyncClient, name: str, preset: str) -> str:
    """The onboarding wizard's first two steps, as a person takes them: name and personality, then the
    plan already chosen (preselected); its VPS is on its way. The new agent's id."""
    made = await post_form(b, "/onboarding", "/onboarding", {"name": name, "preset": preset})
    assert made.status_code == 303, made.text
    agent_id = made.headers["location"].split("/")[2]
    plans = await b.get(f"/onboarding/{agent_id}/plan")
    current = re.search(r'name="plan_id" value="([^"]+)" checked', plans.text)
    assert plans.status_code == 200 and current, plans.text
    chosen = await post_form(b, f"/onboarding/{agent_id}/plan", f"/onboarding/{agent_id}/plan",
                             {"plan_id": current.group(1)})
    assert chosen.status_code == 303 and chosen.headers["location"] == f"/onboarding/{agent_id}/provision", \
        chosen.text
    return agent_id


async def test_signup_to_destroy(web: Web, sql: psycopg.Connection) -> None:
    email = f"web-{uuid.uuid4().hex[:8]}@example.com"
    async with web.browser() as b:
        await sign_up_and_verify(web, b, email)
        row = sql.execute('SELECT id, "emailVerified", password_hash FROM users WHERE email = %s', (email,)).fetchone()
        assert row is not None and row[1] is not None and row[2].startswith("$argon2")
        user_id = row[0]
        # Signing up again with a verified address changes nothing and tells the page nothing.
        again = await post_form(b, "/signup", "/signup", {"email": email, "password": "another password 123"})
        assert again.status_code == 200 and "Check your email" in again.text
        await wait_for("the 'already have an account' mail", lambda: asyncio.sleep(0, any(
            email in m["rcpt_to"] and "already have an account" in m["subject"] for m in web.mail.received)))
        assert sql.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,)).fetchone() == (row[2],)

        resp = await log_in(b, email)
        assert resp.status_code == 303 and resp.headers["location"] == "/dashboard"
        token = b.cookies.get("authjs.session-token")
        assert token and uuid.UUID(token)
        assert sql.execute('SELECT "userId" FROM sessions WHERE "sessionToken" = %s', (token,)).fetchone() == (user_id,)

        agent_id = await new_agent(b, "Webby", "friendly")

        async def state(expected: str) -> str | None:
            page = await b.get(f"/agents/{agent_id}")
            assert page.status_code == 200, page.text
            got = re.search(r'id="state">([^<]+)<', page.text)
            return page.text if got and got.group(1) == expected else None

        page = await wait_for("running", lambda: state("running"))
        assert f"{web.settings.proxy_url}/agents/{agent_id}/gateway/" in page  # Open chat
        usage = await b.get(f"/agents/{agent_id}/usage")
        assert usage.status_code == 200 and "Usage this month" in usage.text
        dash = await b.get("/dashboard")
        assert "Webby" in dash.text and "running" in dash.text
        personality = sql.execute("SELECT personality FROM agents WHERE id = %s", (agent_id,)).fetchone()
        assert personality is not None and "warm and upbeat" in personality[0]["SOUL.md"]  # the preset

        # The proxy's own session check accepts the web app's cookie for this user's agent.
        engine = make_engine(web.settings)
        try:
            resolver = AccessResolver(engine, web.settings, ttl_s=0)
            target = await resolver.resolve(token, uuid.UUID(agent_id))
            assert target.user_id == user_id

            # A second VPS for the same agent is a conflict: shown as a notice, not an error page.
            conflict = await post_form(b, f"/agents/{agent_id}", f"/agents/{agent_id}/provision", {})
            assert conflict.status_code == 409
            assert "already has a VPS" in conflict.text and "Traceback" not in conflict.text

            resp = await post_form(b, f"/agents/{agent_id}", f"/agents/{agent_id}/stop", {})
            assert resp.status_code == 303, resp.text
            await wait_for("stopped", lambda: state("stopped"))
            resp = await post_form(b, f"/agents/{agent_id}", f"/agents/{agent_id}/start", {})
            assert resp.status_code == 303, resp.text
            await wait_for("running again", lambda: state("running"))

            confirm = await b.get(f"/agents/{agent_id}/destroy")
            assert "cannot be undone" in confirm.text
            resp = await b.post(f"/agents/{agent_id}/destroy", data={"csrf_token": csrf_of(confirm.text)})
            assert resp.status_code == 303, resp.text
            await wait_for("destroyed", lambda: state("destroyed"))

            resp = await post_form(b, "/dashboard", "/logout", {})
            assert resp.status_code == 303
            assert sql.execute('SELECT count(*) FROM sessions WHERE "sessionToken" = %s', (token,)).fetchone() == (0,)
            assert not b.cookies.get("authjs.session-token")
            with pytest.raises(AccessDenied) as denied:
                await resolver.resolve(token, uuid.UUID(agent_id))
            assert denied.value.status == 401
            after = await b.get("/dashboard")
            assert after.status_code == 303 and after.headers["location"] == "/login"
        finally:
            await engine.dispose()


async def test_visitors_see_pricing_from_the_plans_table(web: Web) -> None:
    async with web.browser() as b:
        page = await b.get("/")
    assert page.status_code == 200 and "Pricing" in page.text
    for name in ("Free", "Starter", "Pro"):
        assert f"<h3>{name}</h3>" in page.text, page.text


async def test_csrf_refused(web: Web) -> None:
    async with web.browser() as b:
        await b.get("/login")  # the browser now holds a CSRF cookie
        missing = await b.post("/login", data={"email": "a@example.com", "password": "x"})
        assert missing.status_code == 403 and "Form expired" in missing.text
        wrong = await b.post("/login", data={"email": "a@example.com", "password": "x", "csrf_token": "y" * 43})
        assert wrong.status_code == 403
    async with web.browser() as fresh:  # no cookie at all: a cross-site form post
        resp = await fresh.post("/signup", data={"email": "a@example.com", "password": PASSWORD, "csrf_token": "z"})
        assert resp.status_code == 403


async def test_wrong_password_and_rate_limit(web: Web, sql: psycopg.Connection) -> None:
    _, email = verified_user(sql, "rl")
    async with web.browser() as b:
        for _ in range(3):  # web_login_max_failures
            resp = await log_in(b, email, "wrong password!")
            assert resp.status_code == 401 and "Wrong email or password" in resp.text
        limited = await log_in(b, email)  # even the right password waits now
        assert limited.status_code == 429 and "Too many" in limited.text
        assert not b.cookies.get("authjs.session-token")
        unknown = await log_in(b, f"nobody-{uuid.uuid4().hex[:6]}@example.com", "whatever123")
        assert unknown.status_code == 401


async def test_other_users_agent_is_404(web: Web, sql: psycopg.Connection) -> None:
    other = make_user(sql)
    resp = await web.stack.api.post("/agents", json={"name": "theirs"}, headers=headers(other))
    assert resp.status_code == 201
    theirs = resp.json()["id"]
    _, email = verified_user(sql, "me")
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        page = await b.get(f"/agents/{theirs}")
        assert page.status_code == 404 and "theirs" not in page.text
        stop = await post_form(b, "/dashboard", f"/agents/{theirs}/stop", {})
        assert stop.status_code == 404
        junk = await b.get("/agents/not-a-uuid")
        assert junk.status_code == 404 and "Traceback" not in junk.text
        assert "theirs" not in (await b.get("/dashboard")).text


async def test_api_unreachable_is_a_plain_page(web: Web, sql: psycopg.Connection) -> None:
    """The control plane down: the signed-in pages say so (503), with no trace and no crash."""
    _, email = verified_user(sql, "down")
    down = web.settings.model_copy(update={"web_api_url": f"http://127.0.0.1:{free_port()}"})
    app = create_web(down)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=down.web_url, timeout=60.0) as b:
        assert (await log_in(b, email)).status_code == 303  # sign-in needs only the Auth.js tables
        page = await b.get("/dashboard")
        assert page.status_code == 503 and "Control plane unreachable" in page.text
        assert "Traceback" not in page.text and "httpx" not in page.text


async def test_failed_provision_shows_its_reason(web: Web, sql: psycopg.Connection,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    never_ready_gateways(web, monkeypatch, budget_s=3)
    _, email = verified_user(sql, "fail")
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        agent_page = f"/agents/{await new_agent(b, 'Doomed', 'helpful')}"

        async def failed() -> str | None:
            page = await b.get(agent_page)
            return page.text if 'id="state">error<' in page.text else None

        page = await wait_for("the provision to fail", failed)
        assert "gateway did not become ready within 3s" in page and 'id="last-error"' in page
        dash = await b.get("/dashboard")
        assert "gateway did not become ready within 3s" in dash.text


async def test_a_set_up_that_never_finishes_can_be_cancelled_from_the_progress_page(
        web: Web, sql: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway never gets ready and the budget is ten minutes: the progress page's "Cancel the set-up"
    stops it; the machine is removed and the page says the set-up was cancelled, with "Try again"."""
    never_ready_gateways(web, monkeypatch, budget_s=600)
    user, email = verified_user(sql, "cancel")
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        agent = await new_agent(b, "Stuck", "helpful")
        progress = f"/onboarding/{agent}/provision"

        async def waiting_for_the_gateway() -> str | None:
            page = await b.get(progress)
            return page.text if 'aria-current="step">Starting the OpenClaw gateway' in page.text else None

        page = await wait_for("the gateway step", waiting_for_the_gateway)
        op = re.search(r'name="op" value="([^"]+)"', page)
        assert op and 'id="cancel"' in page, page
        cancelled = await post_form(b, progress, f"/agents/{agent}/cancel", {"op": op.group(1), "back": "onboarding"})
        assert cancelled.status_code == 303 and cancelled.headers["location"] == progress, cancelled.text

        async def ended() -> str | None:
            page = await b.get(progress)
            return page.text if 'id="provision-error"' in page.text else None

        page = await wait_for("the set-up to end", ended)
        assert "provisioning was cancelled" in page and 'id="retry"' in page, page
        vps = (await web.stack.api.get(f"/agents/{agent}", headers=headers(user))).json()["vps"]
        assert vps["state"] == "error" and vps["last_operation"]["status"] == "cancelled", vps
        assert not (web.settings.data_dir / "vms" / vps["id"]).exists()
        again = await post_form(b, f"/agents/{agent}", f"/agents/{agent}/cancel", {"op": op.group(1)})
        assert again.status_code == 409 and "already ended" in again.text

