"""Issue 11's browser tests on the real stack of `make run`: a new user's whole journey, and the refusals.

One `slopbox dev` per module (tests/web_journey_harness.py: free ports, the URLs it prints, the real
OpenClaw gateway from OPENCLAW_BIN, the real SMTP sink whose `mail.log` holds the verification mail)
and one headless Debian Chromium. The journey runs in ONE browser context: the session cookie the
web app sets is what the proxy accepts for the real Control UI (no `slopbox session create`).

Each page of the journey is one `step_*` function taking the page and the `Journey` state: besides the
lifecycle, the Usage and Channels tabs (a Telegram token against the real gateway), the notifications
page from the bell, and the admin panel as an admin made with `slopbox user admin` (force stop from VMs,
then the audit log) in a browser of its own.

Screenshots of every main page: artifacts/web-journey-NN-<page>.png (ignored by git, kept by CI).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.test_browser_control_ui import _MISSING, CHROMIUM, CHROMIUM_ARGS, Wire, _chat_status
from tests.web_journey_harness import DevStack, Shots, verification_link
from web.presets import PRESETS

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.real_gateway,
              pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]
# (In CI a missing Chromium, playwright or OPENCLAW_BIN fails the import above / the collection: not a skip.)

PASSWORD = "correct horse battery staple"
LOGIN_MAX_FAILURES = 5  # WEB_LOGIN_MAX_FAILURES given to the stack (its default, stated so the test can count)
# Every browser here is 127.0.0.1, and the limiter also counts failures per address (4 x LOGIN_MAX_FAILURES
# per window): the module makes 7 failed logins; a new refusal test must stay under 20 in all.
STEP_MS = 60_000
LIFECYCLE_MS = 180_000  # provisioning the real gateway on a busy 2-core machine
SESSION_COOKIE = "authjs.session-token"  # Auth.js's name over http (the proxy accepts it)


# -- the stack and the browser, shared by the module -----------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack() -> AsyncIterator[DevStack]:
    dev = await DevStack.start({"WEB_LOGIN_MAX_FAILURES": str(LOGIN_MAX_FAILURES)})
    try:
        assert "gateway: OpenClaw (" in dev.output() and "simulator" not in dev.output(), dev.output()
        yield dev
    finally:
        code = await dev.stop()
    assert code == 0, "`slopbox dev` did not stop cleanly"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=STEP_MS)  # a loaded 2-core CI machine: 5 s is not enough for every page
    try:
        async with async_playwright() as pw:
            chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield chromium
            finally:
                await chromium.close()
    finally:
        expect.set_options(timeout=5_000)  # playwright's default again, for the modules that run after this one


async def new_page(browser: Any, storage_state: Any = None) -> tuple[Any, Any]:
    context = await browser.new_context(storage_state=storage_state)
    context.set_default_timeout(STEP_MS)
    return context, await context.new_page()


@dataclass
class Journey:
    """What the steps hand on to each other."""

    stack: DevStack
    shots: Shots | None
    email: str
    name: str = "Journey"
    agent_id: str = ""
    user_id: str = ""
    wire: Wire = field(default_factory=Wire)
    channel_token: str = ""
    channel_op_url: str = ""  # the Channels tab following the ConnectChannel operation
    admin_email: str = ""
    admin_page: Any = None  # the admin's own browser (a context of its own), closed by the test

    async def shot(self, page: Any, name: str) -> None:
        if self.shots is not None:
            await self.shots.take(page, name)

    @property
    def agent_url(self) -> str:
        return f"{self.stack.web_url}/agents/{self.agent_id}"

    @property
    def chat_url(self) -> str:
        return f"{self.stack.proxy_url}/agents/{self.agent_id}/gateway/"

    async def agent(self) -> dict[str, Any]:
        """GET /agents/{id} as its owner, with the printed API key."""
        return await self.api_get(f"/agents/{self.agent_id}")  # type: ignore[no-any-return]

    async def api_get(self, path: str) -> Any:
        """GET `path` of the control-plane API as this user, with the printed API key."""
        if not self.user_id:
            self.user_id = await self.stack.user_id(self.email)
        async with self.stack.api(self.user_id) as api:
            resp = await api.get(path)
            assert resp.status_code == 200, resp.text
            return resp.json()

    async def gateway_config_has(self, text: str) -> bool:
        """Whether the real gateway's own config file (openclaw.json in the agent's local VM) holds `text`."""
        vm = self.stack.home / "data" / "vms" / str((await self.agent())["vps"]["id"])
        return any(text in path.read_text(errors="replace") for path in vm.rglob("openclaw.json"))

    async def gateway_has_soul(self, text: str) -> bool:
        """Whether the agent's local VM (<data>/vms/<vps id>/, the real gateway's state) holds a SOUL.md
        with `text`: what the gateway itself reads, not what the control plane saved."""
        vm = self.stack.home / "data" / "vms" / str((await self.agent())["vps"]["id"])
        return any(text in path.read_text(errors="replace") for path in vm.rglob("SOUL.md"))


# -- the journey's steps, one per page ---------------------------------------------------------------------------


async def step_landing(page: Any, j: Journey) -> None:
    """The printed "Web app" URL: features, and the pricing drawn from the plans table."""
    from playwright.async_api import expect

    doc = await page.goto(j.stack.web_url + "/")
    assert doc is not None and doc.status == 200
    await expect(page.get_by_role("heading", name="Your own AI agent, running in minutes")).to_be_visible()
    await expect(page.get_by_role("heading", name="Pricing")).to_be_visible()
    async with httpx.AsyncClient(base_url=j.stack.api_url, timeout=30) as api:
        plans = (await api.get("/plans", headers={"Authorization": f"Bearer {j.stack.api_key}"})).json()
    assert plans, "the plans table is empty"
    for plan in plans:
        card = page.locator(".plans .card").filter(has=page.get_by_role("heading", name=plan["display_name"]))
        await expect(card).to_contain_text(f"${plan['price_cents_per_month'] / 100:,.2f}")
    await j.shot(page, "landing")


async def step_sign_up(page: Any, j: Journey) -> None:
    from playwright.async_api import expect

    await page.get_by_role("link", name="Sign up free").click()
    await expect(page.get_by_role("heading", name="Sign up")).to_be_visible()
    await page.get_by_label("Name (optional)").fill(j.name + " Person")
    await page.get_by_label("Email").fill(j.email)
    await page.get_by_label("Password (at least 10 characters)").fill(PASSWORD)
    await j.shot(page, "signup")
    await page.get_by_role("button", name="Create account").click()
    await expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
    await expect(page.get_by_text(f"We sent a link to {j.email}")).to_be_visible()
    await j.shot(page, "check-email")


async def step_verify_by_mail(page: Any, j: Journey) -> None:
    """The link comes from the real SMTP sink's log, the way a developer on `make run` reads it."""
    from playwright.async_api import expect

    link = await verification_link(j.stack.mail_log, j.email, j.stack.web_url)
    await page.goto(link)
    await expect(page.get_by_role("heading", name="Verify your email")).to_be_visible()
    await page.get_by_label("Password").fill(PASSWORD)
    await j.shot(page, "verify")
    await page.get_by_role("button", name="Verify my email").click()
    await expect(page.get_by_role("heading", name="Email verified")).to_be_visible()
    await j.shot(page, "verified")


async def step_log_in(page: Any, j: Journey) -> None:
    from playwright.async_api import expect

    await page.goto(j.stack.web_url + "/login")
    await page.get_by_label("Email").fill(j.email)
    await page.get_by_label("Password").fill(PASSWORD)
    await j.shot(page, "login")
    await page.get_by_role("button", name="Log in").click()
    # No agent yet: the dashboard hands over to the onboarding wizard.
    await expect(page.get_by_role("heading", name="Set up your agent")).to_be_visible()
    assert page.url == j.stack.web_url + "/onboarding", page.url
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert SESSION_COOKIE in cookies and cookies[SESSION_COOKIE]["httpOnly"], cookies.keys()


async def step_onboarding_name(page: Any, j: Journey) -> None:
    """Wizard step 1: name and personality (a preset)."""
    from playwright.async_api import expect

    await page.get_by_label("Name your agent").fill(j.name)
    await page.get_by_label("Friendly companion").check()
    await j.shot(page, "onboarding-name")
    await page.get_by_role("button", name="Next: choose a plan").click()
    await expect(page.get_by_role("heading", name=f"Choose a plan for {j.name}")).to_be_visible()
    found = re.fullmatch(re.escape(j.stack.web_url) + r"/onboarding/([0-9a-f-]{36})/plan", page.url)
    assert found, page.url
    j.agent_id = found.group(1)


async def step_onboarding_plan(page: Any, j: Journey) -> None:
    """Wizard step 2: the plan (the user's current one is preselected)."""
    from playwright.async_api import expect

    await expect(page.get_by_label(re.compile(r"\(your plan\)"))).to_be_checked()
    await j.shot(page, "onboarding-plan")
    await page.get_by_role("button", name="Next: start the agent").click()


async def step_onboarding_progress(page: Any, j: Journey) -> None:
    """Wizard step 3: live progress from the workflow's steps, until the real gateway runs."""
    from playwright.async_api import expect

    await expect(page.get_by_role("heading", name=f"Starting {j.name}")).to_be_visible()
    await expect(page.locator("#progress")).to_have_attribute("data-phase", "working")
    await expect(page.locator("#steps li[aria-current=step]")).to_have_count(1)  # the step in flight
    await j.shot(page, "onboarding-progress")
    # The page follows the workflow itself and moves on to the channels step once the agent runs.
    await expect(page.get_by_role("heading", name=f"{j.name} is running")).to_be_visible(timeout=LIFECYCLE_MS)
    assert page.url == f"{j.stack.web_url}/onboarding/{j.agent_id}/channels", page.url


async def step_onboarding_channels_and_done(page: Any, j: Journey) -> None:
    """Wizard steps 4 and 5: channels skipped (the Channels tab is walked later); done offers "Open chat"
    and the dashboard."""
    from playwright.async_api import expect

    await j.shot(page, "onboarding-channels")
    await page.get_by_role("link", name="Skip for now").click()
    await expect(page.get_by_role("heading", name=f"{j.name} is ready")).to_be_visible()
    await expect(page.get_by_role("link", name="Open chat")).to_have_attribute("href", j.chat_url)
    await j.shot(page, "onboarding-done")
    await page.get_by_role("link", name="Go to dashboard").click()


async def step_dashboard_to_agent(page: Any, j: Journey) -> None:
    """The dashboard lists the agent as running; its page (Overview tab) offers "Open chat"."""
    from playwright.async_api import expect

    await expect(page.get_by_role("heading", name="Your agents")).to_be_visible()
    await j.shot(page, "dashboard")
    await page.get_by_role("link", name=j.name, exact=True).click()
    assert page.url == j.agent_url, page.url
    await expect(page.locator("#state")).to_have_text("running")
    await expect(page.locator("#last-error")).to_have_count(0)
    await expect(page.get_by_role("link", name="Open chat")).to_have_attribute("href", j.chat_url)
    # The personality picked in the wizard is the running gateway's SOUL.md.
    assert await j.gateway_has_soul(PRESETS["friendly"][1]), "the chosen preset is not the gateway's SOUL.md"
    await j.shot(page, "agent-running")


async def step_open_chat(page: Any, j: Journey) -> None:
    """"Open chat" opens the real Control UI through the proxy in a new tab of the SAME context: the
    web app's session cookie is all that authenticates it. `/status` is answered without an LLM key."""

    context = page.context
    attach = j.wire.attach
    context.on("page", attach)  # before the tab exists, so its first WebSocket is seen
    async with context.expect_page() as opened:
        await page.get_by_role("link", name="Open chat").click()
    chat = await opened.value
    try:
        await chat.wait_for_load_state("domcontentloaded")
        assert chat.url == j.chat_url, chat.url
        # The tab's document came from the gateway through the proxy with this context's cookie (the UI
        # retitles itself once connected, so the served title is read with the same cookie jar).
        status = await chat.evaluate("performance.getEntriesByType('navigation')[0].responseStatus")
        assert status == 200, status
        served = await context.request.get(j.chat_url)
        assert served.status == 200 and "<title>OpenClaw Control</title>" in await served.text(), served.status
        await j.wire.wait_for("hello-ok", j.wire.hello_oks)
        ws_base = "ws://" + j.stack.proxy_url.removeprefix("http://") + f"/agents/{j.agent_id}/gateway"
        assert j.wire.sockets and all(u.startswith(ws_base) for u in j.wire.sockets), j.wire.sockets
        await _chat_status(chat, j.wire)
        await j.shot(chat, "control-ui-chat")
    finally:
        context.remove_listener("page", attach)
        await chat.close()


async def step_usage(page: Any, j: Journey) -> None:
    """The Usage tab of the running agent: this month against the plan's limits (the API's own figures,
    formatted here independently of the web app), a meter and an SVG chart per resource. A minutes-old
    agent's figures may be zero; its limits are the plan's."""
    from playwright.async_api import expect

    await page.get_by_role("navigation", name="Agent").get_by_role("link", name="Usage").click()
    assert page.url == j.agent_url + "/usage", page.url
    await expect(page.get_by_role("heading", name="Usage this month")).to_be_visible()
    usage = await j.api_get(f"/agents/{j.agent_id}/usage")
    await expect(page.get_by_text(f"From {usage['period_start']} to the end of the month.")).to_be_visible()
    await expect(page.locator("#overage")).to_contain_text(
        f"your overage budget: ${usage['budget_cents'] / 100:,.2f}")
    limits = {key: int(figures["limit"]) for key, figures in usage["resources"].items()}
    expected = {  # label -> (limit as shown, the chart's unit)
        "Bandwidth (in + out)": (f"{limits['bandwidth_bytes'] / 2**30:.1f} GB", "MB"),
        "CPU time": (f"{limits['cpu_ms'] / 3_600_000:,.1f} h", "CPU s"),
        "Memory": (f"{limits['memory_mb_seconds'] / 1024 / 3600:,.2f} GB·h", "MB·h"),
        "Storage": (f"{limits['storage_bytes'] / 2**30:.1f} GB", "MB"),
    }
    summary = page.locator("#usage-summary")
    for label, (limit, unit) in expected.items():
        row = summary.get_by_role("row").filter(has=page.get_by_role("rowheader", name=label, exact=True))
        await expect(row.get_by_role("cell").nth(1)).to_have_text(limit)  # Used | Limit | This agent | Projected
        await expect(row.locator("meter")).to_have_attribute("aria-label", re.compile(r"% of the limit$"))
        chart = page.get_by_role("img", name=f"{label} per day this month, in {unit}", exact=True)
        await expect(chart).to_have_count(1)
    await expect(page.locator("svg[role=img]")).to_have_count(len(expected))
    await j.shot(page, "usage")


def telegram_token() -> str:
    """A token of @BotFather's shape (bot id, colon, 35 characters); no network reaches Telegram here."""
    return f"{secrets.randbelow(9 * 10**9) + 10**9}:AA{secrets.token_urlsafe(32)[:33]}"


async def step_channels_connect(page: Any, j: Journey) -> None:
    """The Channels tab against the real gateway: a well-formed Telegram bot token is submitted. The
    operation then waits up to 30 s for the bot to run (it never does: no network to Telegram here), so the
    journey walks other pages meanwhile and `step_channels_outcome` comes back for the result."""
    from playwright.async_api import expect

    await page.get_by_role("navigation", name="Agent").get_by_role("link", name="Channels").click()
    assert page.url == j.agent_url + "/channels", page.url
    await expect(page.locator("#no-channels")).to_be_visible()
    j.channel_token = token = telegram_token()
    await page.locator("#add-telegram summary").click()
    await page.get_by_label("Bot token (from @BotFather)").fill(token)
    await page.get_by_role("button", name="Connect Telegram").click()
    assert re.fullmatch(re.escape(j.agent_url) + r"/channels\?op=\S+", page.url), page.url
    j.channel_op_url = page.url
    await expect(page.locator("#operation")).to_contain_text("In progress: ConnectChannel")
    await expect(page.locator("#telegram-bot_token")).to_have_value("")
    assert token not in await page.content()
    await j.shot(page, "channels-connecting")


async def step_channels_outcome(page: Any, j: Journey) -> None:
    """What the real gateway makes of it: it accepts the token (written into its config) and starts the bot,
    which never connects, so after the operation's wait the page says "configured ... not yet connected",
    with the gateway's state and no reason.
    The token is never written back into a page (only its last 4 characters, masked). Then it is removed."""
    from playwright.async_api import expect

    token = j.channel_token
    await page.goto(j.channel_op_url)
    await expect(page.locator("#operation")).to_have_text("Done: ConnectChannel succeeded.", timeout=LIFECYCLE_MS)
    row = page.locator('#channels tr[data-kind="telegram"]')
    await expect(row.locator("strong")).to_have_text("configured (the gateway accepted it; not yet connected)")
    # What the gateway itself says: the bot is configured and started, it just cannot reach Telegram.
    await expect(row.locator(".gateway-state")).to_have_text(
        "The gateway started it; it has not connected to Telegram yet.")
    await expect(row.locator(".reason")).to_have_count(0)
    await expect(row.get_by_role("cell").nth(2)).to_have_text("…" + token[-4:])
    await page.reload()  # the whole page as served once the operation ended, not only the live fragment
    await expect(row).to_be_visible()
    assert token not in await page.content() and token[:-4] not in await page.content()
    assert await j.gateway_config_has(token), "the token did not reach the gateway's config"
    await j.shot(page, "channels-telegram")
    await row.get_by_role("link", name="Remove…").click()
    await expect(page.get_by_role("heading", name=f"Remove Telegram from {j.name}?")).to_be_visible()
    await page.get_by_role("button", name="Yes, remove Telegram").click()
    await expect(page.locator("#operation")).to_have_text("Done: DisconnectChannel succeeded.",
                                                          timeout=LIFECYCLE_MS)
    await expect(page.locator("#no-channels")).to_be_visible()
    assert not await j.gateway_config_has(token), "the removed token is still in the gateway's config"
    await j.shot(page, "channels-removed")


async def step_change_personality(page: Any, j: Journey) -> None:
    """The Settings tab: a new SOUL.md, saved and pushed to the running gateway (PushConfig), followed live."""
    from playwright.async_api import expect

    await page.get_by_role("navigation", name="Agent").get_by_role("link", name="Settings").click()
    assert page.url == j.agent_url + "/settings", page.url
    soul = PRESETS["concise"][1] + f"\nJourney marker {uuid.uuid4().hex}\n"
    await page.get_by_label("SOUL.md").fill(soul)
    await page.get_by_role("button", name="Save personality and model").click()
    await expect(page.locator("#operation")).to_contain_text("Saved")
    await j.shot(page, "settings-saving")
    await expect(page.locator("#operation")).to_contain_text("the agent now runs with these settings",
                                                             timeout=LIFECYCLE_MS)
    await expect(page.get_by_label("SOUL.md")).to_have_value(soul)
    assert (await j.agent())["settings"]["in_sync"]
    assert await j.gateway_has_soul(soul), "the new SOUL.md did not reach the gateway's workspace"
    await j.shot(page, "settings-saved")
    await page.get_by_role("navigation", name="Agent").get_by_role("link", name="Overview").click()
    await expect(page.locator("#state")).to_have_text("running")


async def step_stop(page: Any, j: Journey) -> None:
    from playwright.async_api import expect

    await page.get_by_role("button", name="Stop").click()
    await expect(page.locator("#state")).to_have_text("stopped", timeout=LIFECYCLE_MS)
    await expect(page.locator("#operation")).to_have_count(0)
    await expect(page.get_by_role("link", name="Open chat")).to_have_count(0)
    await expect(page.get_by_role("button", name="Start")).to_be_visible()
    # The proxy says so too, for the same cookie: the gateway is not running (409), not "not yours".
    stopped = await page.context.request.get(j.chat_url)
    assert stopped.status == 409, (stopped.status, await stopped.text())
    await j.shot(page, "agent-stopped")


async def step_start(page: Any, j: Journey) -> None:
    from playwright.async_api import expect

    await page.get_by_role("button", name="Start").click()
    await expect(page.locator("#state")).to_have_text("running", timeout=LIFECYCLE_MS)
    await expect(page.locator("#operation")).to_have_count(0)
    await expect(page.get_by_role("link", name="Open chat")).to_be_visible()
    ui = await page.context.request.get(j.chat_url)  # the gateway is back behind the proxy
    assert ui.status == 200 and "<title>OpenClaw Control</title>" in await ui.text(), ui.status
    await j.shot(page, "agent-started")


async def step_admin_log_in(page: Any, j: Journey) -> None:
    """An operator's admin: signed up through the web like anyone, made admin with `slopbox user admin`
    (the same environment as `slopbox dev`), logged in in a browser of their own; Users lists them as
    admin and finds the journey user with their one agent."""
    from playwright.async_api import expect

    browser = page.context.browser
    j.admin_email = (admin := await signed_up(j.stack, browser, "admin")).email
    said = await j.stack.cli("user", "admin", "--email", admin.email)
    assert f"made admin: {admin.email}" in said, said
    _context, adm = await new_page(browser)  # a fresh browser: the admin logs in with the password
    j.admin_page = adm
    await adm.goto(j.stack.web_url + "/login")
    await adm.get_by_label("Email").fill(admin.email)
    await adm.get_by_label("Password").fill(PASSWORD)
    await adm.get_by_role("button", name="Log in").click()
    await expect(adm.get_by_role("heading", name="Set up your agent")).to_be_visible()  # no agent of their own
    await adm.goto(j.stack.web_url + "/admin")
    await expect(adm.get_by_role("heading", name="Admin: users")).to_be_visible()
    users = adm.locator("#users")
    await expect(users.get_by_role("row").filter(has=adm.get_by_role("link", name=admin.email))).to_contain_text(
        "admin")
    await adm.get_by_role("searchbox", name="Search by email").fill(j.email)
    await adm.get_by_role("button", name="Search").click()
    row = users.get_by_role("row").filter(has=adm.get_by_role("link", name=j.email))
    await expect(row).to_have_count(1)
    await expect(users.get_by_role("row")).to_have_count(2)  # the header and the journey user only
    await expect(row.get_by_role("cell").nth(2)).to_have_text("1")  # Email | Plan | Agents: one agent
    await j.shot(adm, "admin-users")


async def step_admin_force_stop(page: Any, j: Journey) -> None:
    """The admin force-stops the journey user's running VPS from VMs (confirmation -> operation page ->
    stopped) and finds it in the audit log."""
    from playwright.async_api import expect

    adm = j.admin_page
    vps_id = str((await j.agent())["vps"]["id"])
    await adm.get_by_role("navigation", name="Admin sections").get_by_role("link", name="VMs").click()
    await expect(adm.get_by_role("heading", name="Admin: VMs")).to_be_visible()
    vm = adm.locator(f"#vps-{vps_id}")
    await expect(vm).to_contain_text(j.email)
    await expect(vm.locator(".state")).to_have_text("running")
    await j.shot(adm, "admin-vms")
    await vm.get_by_role("link", name="Force stop…").click()
    await expect(adm.get_by_role("heading", name="Force stop this VPS?")).to_be_visible()
    await expect(adm.locator(".card")).to_contain_text(f"VPS {vps_id} of {j.email}: running on local")
    await j.shot(adm, "admin-force-stop-confirm")
    await adm.get_by_role("button", name="Yes, force stop").click()
    assert re.fullmatch(re.escape(j.stack.web_url) + r"/admin/operations/\S+", adm.url), adm.url
    await expect(adm.locator("#op-status")).to_have_text("succeeded", timeout=LIFECYCLE_MS)
    await j.shot(adm, "admin-operation")
    await adm.get_by_role("link", name="Back to VMs").click()
    await expect(adm.locator(f"#vps-{vps_id} .state")).to_have_text("stopped")
    await expect(adm.locator(f"#vps-{vps_id}").get_by_role("link", name="Force stop…")).to_have_count(0)
    await adm.get_by_role("navigation", name="Admin sections").get_by_role("link", name="Audit log").click()
    await expect(adm.get_by_role("heading", name="Admin: audit log")).to_be_visible()
    entry = adm.locator("#audit tbody tr").filter(has_text=vps_id)
    await expect(entry).to_have_count(1)
    await expect(entry.locator(".action")).to_have_text("vps.stop")
    await expect(entry).to_contain_text(j.admin_email)
    await j.shot(adm, "admin-audit")


async def step_sees_force_stop(page: Any, j: Journey) -> None:
    """The journey user's Overview, reloaded: stopped by the admin, with Start offered again."""
    from playwright.async_api import expect

    await page.reload()
    await expect(page.locator("#state")).to_have_text("stopped")
    await expect(page.get_by_role("link", name="Open chat")).to_have_count(0)
    await expect(page.get_by_role("button", name="Start")).to_be_visible()
    await j.shot(page, "agent-force-stopped")


async def step_destroy(page: Any, j: Journey) -> None:
    """Destroy asks first (its own page), then the VPS goes; the agent stays, ready for a new VPS."""
    from playwright.async_api import expect

    await page.get_by_role("link", name="Destroy…").click()
    await expect(page.get_by_role("heading", name=f"Destroy the VPS of {j.name}?")).to_be_visible()
    await expect(page.get_by_text("This cannot be undone.")).to_be_visible()
    await j.shot(page, "destroy-confirm")
    await page.get_by_role("button", name="Yes, destroy it").click()
    await expect(page.locator("#state")).to_have_text("destroyed", timeout=LIFECYCLE_MS)
    await expect(page.locator("#operation")).to_have_count(0)
    await expect(page.get_by_role("button", name="Create its VPS")).to_be_visible()
    gone = await page.context.request.get(j.chat_url)
    assert gone.status in (404, 409), gone.status
    await j.shot(page, "agent-destroyed")


async def step_dashboard(page: Any, j: Journey) -> None:
    from playwright.async_api import expect

    await page.get_by_role("link", name="Dashboard", exact=True).click()
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=j.name))
    await expect(row).to_contain_text("destroyed")
    await expect(page.locator("#unread")).to_be_visible()
    await j.shot(page, "dashboard-destroyed")


async def step_notifications(page: Any, j: Journey) -> None:
    """The header's bell opens the notifications page. Nothing in this journey writes one (they come from
    the hourly metering cycle: usage warnings, overage stops, delayed figures), so the honest page is the
    empty one: no count, no "Mark all as read"."""
    from playwright.async_api import expect

    bell = page.get_by_role("link", name="Notifications: 0 unread")
    await expect(bell).to_have_text("0")
    await bell.click()
    assert page.url == j.stack.web_url + "/notifications", page.url
    await expect(page.get_by_role("heading", name="Notifications")).to_be_visible()
    await expect(page.locator("#unread-count")).to_contain_text("0 unread of 0.")
    await expect(page.locator("#no-notifications")).to_have_text(
        "No notifications yet. Usage warnings and automatic stops will show up here and by email.")
    await expect(page.get_by_role("button", name="Mark all as read")).to_have_count(0)
    await page.get_by_role("link", name="Show only unread").click()
    await expect(page.locator("#no-notifications")).to_have_text("No unread notifications.")
    await j.shot(page, "notifications")


async def test_new_user_journey_from_landing_to_destroy(stack: DevStack, browser: Any) -> None:
    """Landing -> sign up -> verify by the mailed link -> log in -> onboarding wizard -> running -> chat in the
    real Control UI -> change personality in the Settings tab -> stop -> start -> destroy, in one browser session."""
    journey = Journey(stack=stack, shots=Shots("web-journey"), email=f"journey-{uuid.uuid4().hex[:8]}@example.com")
    context, page = await new_page(browser)
    took: list[str] = []
    try:
        for step in (step_landing, step_sign_up, step_verify_by_mail, step_log_in, step_onboarding_name,
                     step_onboarding_plan, step_onboarding_progress, step_onboarding_channels_and_done,
                     step_dashboard_to_agent, step_open_chat,
                     # the other pages while ConnectChannel waits out the bot that cannot reach Telegram
                     step_channels_connect, step_usage, step_notifications, step_admin_log_in,
                     step_channels_outcome, step_change_personality, step_stop, step_start,
                     step_admin_force_stop, step_sees_force_stop, step_destroy, step_dashboard):
            began = time.monotonic()
            try:
                await step(page, journey)
                took.append(f"{step.__name__} {time.monotonic() - began:.1f}s")
            except BaseException:
                await journey.shot(page, f"FAILED-{step.__name__}")
                raise
    finally:
        print("journey steps:", ", ".join(took))  # noqa: T201  (where the minutes go, in -s / CI logs)
        await context.close()
        if journey.admin_page is not None:
            await journey.admin_page.context.close()
    assert journey.shots is not None and len(journey.shots.taken) >= 20, journey.shots.taken


# -- refusals, on the same stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused_shots() -> Shots:
    """Screenshots of the refusal pages: artifacts/web-journey-refused-NN-<page>.png."""
    return Shots("web-journey-refused")


@dataclass
class Account:
    email: str
    storage_state: Any  # the signed-in browser's cookies


async def signed_up(stack: DevStack, browser: Any, label: str) -> Account:
    """A verified account through the same pages as the journey (no screenshots), signed in."""
    journey = Journey(stack=stack, shots=None, email=f"{label}-{uuid.uuid4().hex[:8]}@example.com")
    context, page = await new_page(browser)
    try:
        await page.goto(stack.web_url + "/")
        await step_sign_up(page, journey)
        await step_verify_by_mail(page, journey)
        await step_log_in(page, journey)
        return Account(journey.email, await context.storage_state())
    finally:
        await context.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stranger(stack: DevStack, browser: Any) -> Account:
    return await signed_up(stack, browser, "stranger")


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def demo_agent(stack: DevStack) -> dict[str, Any]:
    """An agent of the demo admin that `slopbox dev` printed, provisioning on the real gateway.

    Autouse, so its gateway boots while the journey runs rather than on the clock of the test that needs it."""
    async with stack.api() as api:
        plans = (await api.get("/plans")).json()
        config = next(c["id"] for p in plans if p["name"] == "starter" for c in p["vps_configs"]
                      if c["provider"] == "local")
        agent = (await api.post("/agents", json={"name": "demo-private"})).json()
        assert (await api.post(f"/agents/{agent['id']}/vps", json={"vps_config_id": config})).status_code == 202
        return agent  # type: ignore[no-any-return]


async def _post_status(page: Any, action: str) -> int:
    """Submit the form whose action is `action` and return the status of the page it lands on."""
    async with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith(action)) as answer:
        await page.locator(f'form[action="{action}"] button[type="submit"]').click()
    return (await answer.value).status  # type: ignore[no-any-return]


async def test_wrong_password_and_unknown_email_get_the_same_401(stack: DevStack, browser: Any,
                                                                 stranger: Account, refused_shots: Shots) -> None:
    from playwright.async_api import expect

    context, page = await new_page(browser)
    try:
        for email in (stranger.email, f"nobody-{uuid.uuid4().hex[:8]}@example.com"):
            await page.goto(stack.web_url + "/login")
            await page.get_by_label("Email").fill(email)
            await page.get_by_label("Password").fill("not the password at all")
            assert await _post_status(page, "/login") == 401
            await expect(page.get_by_role("alert")).to_have_text("Wrong email or password.")
            await expect(page.get_by_label("Email")).to_have_value(email)
            assert SESSION_COOKIE not in {c["name"] for c in await context.cookies()}
        await refused_shots.take(page, "login-wrong-password")
        await page.goto(stack.web_url + "/dashboard")  # still signed out
        await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    finally:
        await context.close()


async def test_login_rate_limit_shows_429_even_for_the_right_password(stack: DevStack, browser: Any,
                                                                      refused_shots: Shots) -> None:
    from playwright.async_api import expect

    victim = await signed_up(stack, browser, "limited")
    context, page = await new_page(browser)
    try:
        for attempt in range(1, LOGIN_MAX_FAILURES + 2):
            await page.goto(stack.web_url + "/login")
            await page.get_by_label("Email").fill(victim.email)
            await page.get_by_label("Password").fill(f"guess number {attempt}")
            status = await _post_status(page, "/login")
            if attempt <= LOGIN_MAX_FAILURES:
                assert status == 401, (attempt, status)
            else:
                assert status == 429, (attempt, status)
        await expect(page.get_by_role("heading", name="Too many attempts")).to_be_visible()
        await expect(page.get_by_role("alert")).to_contain_text("Wait a few minutes")
        # Blocked means blocked: the right password is refused too until the window passes.
        await page.goto(stack.web_url + "/login")
        await page.get_by_label("Email").fill(victim.email)
        await page.get_by_label("Password").fill(PASSWORD)
        assert await _post_status(page, "/login") == 429
        assert SESSION_COOKIE not in {c["name"] for c in await context.cookies()}
        await refused_shots.take(page, "login-rate-limited")
    finally:
        await context.close()


async def test_forms_without_the_right_csrf_token_get_the_403_page(stack: DevStack, browser: Any,
                                                                   stranger: Account, refused_shots: Shots) -> None:
    """A signed-in user's form with its hidden token removed or altered, and a bare cross-site style POST."""
    from playwright.async_api import expect

    context, page = await new_page(browser, stranger.storage_state)
    try:
        for tamper in ("el => el.remove()", "el => { el.value = 'x'.repeat(43) }"):
            await page.goto(stack.web_url + "/onboarding")
            await expect(page.get_by_role("heading", name="Set up your agent")).to_be_visible()
            await page.get_by_label("Name your agent").fill("Forged")
            await page.locator('form[action="/onboarding"] input[name="csrf_token"]').evaluate(tamper)
            assert await _post_status(page, "/onboarding") == 403
            await expect(page.get_by_role("heading", name="Form expired")).to_be_visible()
            await expect(page.get_by_role("alert")).to_contain_text("was not sent from this site")
        await refused_shots.take(page, "csrf-refused")
        for action in ("/onboarding", "/onboarding/plan"):
            bare = await context.request.post(stack.web_url + action, form={"name": "Forged"}, max_redirects=0)
            assert bare.status == 403 and "Form expired" in await bare.text(), (action, bare.status)
        # Nothing was created (the dashboard still sends this user to the wizard), and the session still works.
        await page.goto(stack.web_url + "/dashboard")
        await expect(page.get_by_role("heading", name="Set up your agent")).to_be_visible()
    finally:
        await context.close()


async def test_another_users_agent_is_not_found_in_the_web_app_nor_through_the_proxy(
        stack: DevStack, browser: Any, stranger: Account, demo_agent: dict[str, Any], refused_shots: Shots) -> None:
    from playwright.async_api import expect

    agent_id = demo_agent["id"]
    async with stack.api() as api:  # the owner's view: it exists (and its gateway is up, below)
        for _ in range(LIFECYCLE_MS // 1000):
            vps = (await api.get(f"/agents/{agent_id}")).json()["vps"]
            if vps["state"] in ("running", "error"):
                break
            await asyncio.sleep(1)
        assert vps["state"] == "running", vps
    context, page = await new_page(browser, stranger.storage_state)
    try:
        for path in (f"/agents/{agent_id}", f"/agents/{agent_id}/destroy", f"/agents/{agent_id}/settings"):
            doc = await page.goto(stack.web_url + path)
            assert doc is not None and doc.status == 404, (path, doc and doc.status)
            await expect(page.get_by_role("heading", name="Agent not found")).to_be_visible()
            await expect(page.get_by_text("demo-private")).to_have_count(0)
        await refused_shots.take(page, "other-users-agent")
        csrf = next(c["value"] for c in await context.cookies() if c["name"] == "slopbox.csrf")
        for action in ("stop", "destroy"):  # a valid form of this user, aimed at someone else's agent
            posted = await context.request.post(f"{stack.web_url}/agents/{agent_id}/{action}",
                                                form={"csrf_token": csrf}, max_redirects=0)
            assert posted.status == 404, (action, posted.status)
        gateway = await context.request.get(f"{stack.proxy_url}/agents/{agent_id}/gateway/")
        assert gateway.status == 404, gateway.status
        assert "problem+json" in gateway.headers.get("content-type", "")
        assert "OpenClaw" not in await gateway.text()
    finally:
        await context.close()
    async with stack.api() as api:
        assert (await api.get(f"/agents/{agent_id}")).json()["vps"]["state"] == "running"


async def test_admin_pages_are_refused_to_a_non_admin(stack: DevStack, browser: Any, stranger: Account,
                                                      demo_agent: dict[str, Any], refused_shots: Shots) -> None:
    """The admin panel's pages and forms answer a signed-in non-admin with the 403 page (an admin's own walk
    through them is in the journey: `step_admin_log_in`, `step_admin_force_stop`)."""
    from playwright.async_api import expect

    context, page = await new_page(browser, stranger.storage_state)
    try:
        for path in ("/admin", "/admin/users", f"/admin/users/{stack.demo_user_id}", "/admin/vms", "/admin/plans",
                     "/admin/audit"):
            doc = await page.goto(stack.web_url + path)
            assert doc is not None and doc.status == 403, (path, doc and doc.status)
            await expect(page.get_by_role("heading", name="Admins only")).to_be_visible()
            await expect(page.get_by_text("demo@slopbox.local")).to_have_count(0)
        await refused_shots.take(page, "admin-refused")
        csrf = next(c["value"] for c in await context.cookies() if c["name"] == "slopbox.csrf")
        async with stack.api() as api:
            vps_id = (await api.get(f"/agents/{demo_agent['id']}")).json()["vps"]["id"]
        for action in (f"/admin/vms/{vps_id}/stop", f"/admin/users/{stack.demo_user_id}/exempt"):
            posted = await context.request.post(stack.web_url + action, form={"csrf_token": csrf}, max_redirects=0)
            assert posted.status == 403, (action, posted.status)
    finally:
        await context.close()
    async with stack.api() as api:  # the forced stop did not happen
        assert (await api.get(f"/agents/{demo_agent['id']}")).json()["vps"]["state"] in ("provisioning", "running")
