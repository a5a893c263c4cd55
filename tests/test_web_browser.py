"""The web app in Debian's headless Chromium: sign up -> verify by the mailed link -> log in -> the
onboarding wizard -> running. Screenshots of each page go to artifacts/ (ignored by git, kept by CI)."""

from __future__ import annotations

import re
import uuid

import pytest

from tests.test_web_app import PASSWORD, Web, wait_for, web  # noqa: F401  (the fixture)
from tests.web_browser_harness import ARTIFACTS, MISSING, STEP_MS, chromium_on_web

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
async def test_sign_up_to_running_agent_in_the_browser(web: Web) -> None:  # noqa: F811
    from playwright.async_api import expect

    email = f"browser-{uuid.uuid4().hex[:8]}@example.com"
    async with chromium_on_web(web) as (settings, browser):
        page = await (await browser.new_context()).new_page()
        page.set_default_timeout(STEP_MS)
        await page.goto(settings.web_url + "/")
        await page.screenshot(path=ARTIFACTS / "web-landing.png", full_page=True)
        await page.get_by_role("link", name="Sign up free").click()
        await page.get_by_label("Email").fill(email)
        await page.get_by_label("Password (at least 10 characters)").fill(PASSWORD)
        await page.screenshot(path=ARTIFACTS / "web-signup.png", full_page=True)
        await page.get_by_role("button", name="Create account").click()
        await expect(page.get_by_role("heading", name="Check your email")).to_be_visible()

        async def link() -> str | None:
            for m in web.mail.received:
                if email in m["rcpt_to"]:
                    found = re.search(r"http://\S+/verify\?\S+", m["body"])
                    return found.group(0) if found else None
            return None

        await page.goto(await wait_for("the verification mail", link))
        await page.get_by_label("Password").fill(PASSWORD)
        await page.screenshot(path=ARTIFACTS / "web-verify.png", full_page=True)
        await page.get_by_role("button", name="Verify my email").click()
        await expect(page.get_by_role("heading", name="Email verified")).to_be_visible()
        await page.get_by_role("link", name="Log in").last.click()
        await page.get_by_label("Email").fill(email)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        # No agent yet: the dashboard hands over to the wizard (tests/test_web_onboarding_browser.py).
        await expect(page.get_by_role("heading", name="Set up your agent")).to_be_visible()
        await page.get_by_label("Name your agent").fill("Browsy")
        await page.get_by_label("Friendly companion").check()
        await page.get_by_role("button", name="Next: choose a plan").click()
        await page.get_by_role("button", name="Next: start the agent").click()
        await expect(page.get_by_role("heading", name="Browsy is running")).to_be_visible(timeout=STEP_MS)
        await page.get_by_role("link", name="Skip for now").click()
        await page.get_by_role("link", name="Go to dashboard").click()
        await page.get_by_role("link", name="Browsy").click()
        await expect(page.locator("#state")).to_have_text("running", timeout=STEP_MS)
        await expect(page.get_by_role("link", name="Open chat")).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "web-agent-running.png", full_page=True)
        await page.get_by_role("link", name="Dashboard", exact=True).click()
        await expect(page.get_by_role("link", name="Browsy")).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "web-dashboard.png", full_page=True)
