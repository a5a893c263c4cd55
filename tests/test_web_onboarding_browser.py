"""The onboarding wizard in Debian's headless Chromium, JavaScript on: log in -> name and personality ->
plan -> live progress (the page's script follows /status and moves on by itself) -> channels, skip ->
done -> the Usage tab -> the notifications bell. Screenshots go to artifacts/ (web-onboarding-*.png,
web-usage.png, web-notifications.png)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import pytest_asyncio

from tests.lifecycle_harness import FAST
from tests.test_web_app import PASSWORD, Web, never_ready_gateways, verified_user
from tests.test_web_app import web as web_stack  # noqa: F401  (the `web` fixture)
from tests.web_browser_harness import ARTIFACTS, MISSING, STEP_MS, chromium_on_web, logged_in_page
from web import auth

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def web(web_stack: Web) -> Web:  # noqa: F811  (the fixture imported above, by its name)
    return web_stack


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
async def test_onboarding_in_the_browser(web: Web, sql: psycopg.Connection) -> None:
    from playwright.async_api import expect

    email = f"wizard-{uuid.uuid4().hex[:8]}@example.com"
    row = sql.execute('INSERT INTO users (email, "emailVerified", password_hash) VALUES (%s, now(), %s) RETURNING id',
                      (email, auth.hash_password(PASSWORD))).fetchone()
    assert row is not None
    user_id = row[0]
    async with chromium_on_web(web) as (settings, browser):
        page = await logged_in_page(browser, settings, email, PASSWORD)
        # No agent yet: the dashboard hands over to the wizard, the name field focused.
        await expect(page.get_by_role("heading", name="Set up your agent")).to_be_visible()
        assert await page.evaluate("document.activeElement.id") == "name"
        await page.keyboard.type("Wizzy")
        await page.get_by_label("My own words").check()
        await page.get_by_label("Your own personality text").fill("You answer in rhymes.")
        await page.screenshot(path=ARTIFACTS / "web-onboarding-1-name.png", full_page=True)
        await page.get_by_role("button", name="Next: choose a plan").click()

        await expect(page.get_by_role("heading", name="Choose a plan for Wizzy")).to_be_visible()
        await expect(page.get_by_label("Free (your plan)")).to_be_checked()
        await page.get_by_label("Starter").check()
        await page.screenshot(path=ARTIFACTS / "web-onboarding-2-plan.png", full_page=True)
        await page.get_by_role("button", name="Next: start the agent").click()

        await expect(page.get_by_role("heading", name="Starting Wizzy")).to_be_visible()
        await expect(page.locator("#steps li")).to_have_count(6)
        await page.screenshot(path=ARTIFACTS / "web-onboarding-3-progress.png", full_page=True)
        # No reload from us: the page's script polls /status and moves on when the agent runs.
        await expect(page.get_by_role("heading", name="Wizzy is running")).to_be_visible(timeout=STEP_MS)
        assert "/channels" in page.url
        await expect(page.get_by_role("link", name="Connect a channel")).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "web-onboarding-4-channels.png", full_page=True)
        await page.get_by_role("link", name="Skip for now").click()

        await expect(page.get_by_role("heading", name="Wizzy is ready")).to_be_visible()
        chat = page.get_by_role("link", name="Open chat")
        agent_id = page.url.split("/onboarding/")[1].split("/")[0]
        assert await chat.get_attribute("href") == f"{settings.proxy_url}/agents/{agent_id}/gateway/"
        await page.screenshot(path=ARTIFACTS / "web-onboarding-5-done.png", full_page=True)
        plan = sql.execute("SELECT p.name FROM users u JOIN plans p ON p.id = u.plan_id WHERE u.id = %s",
                           (user_id,)).fetchone()
        assert plan == ("starter",)

        # Some usage for the charts (as the metering cycle would record it) and two notifications.
        vps = sql.execute("SELECT vps_id FROM agents WHERE id = %s", (agent_id,)).fetchone()
        assert vps is not None
        today = datetime.now(UTC).date()
        for back in range(min(today.day, 5)):
            day = today - timedelta(days=back)
            sql.execute("INSERT INTO vps_usage_daily (vps_id, day, bandwidth_in_bytes, bandwidth_out_bytes,"
                        " cpu_ms, memory_mb_seconds, storage_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT DO NOTHING",
                        (vps[0], day, (back + 1) * 40_000_000, 10_000_000, (back + 2) * 600_000,
                         (back + 1) * 2048 * 3600, 10 * 1024 ** 3))
        sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes,"
                    " bandwidth_out_bytes, cpu_ms, memory_mb_seconds, storage_bytes) SELECT vps_id,"
                    " date_trunc('month', day)::date, SUM(bandwidth_in_bytes), SUM(bandwidth_out_bytes),"
                    " SUM(cpu_ms), SUM(memory_mb_seconds), SUM(storage_bytes) FROM vps_usage_daily"
                    " WHERE vps_id = %s AND day >= date_trunc('month', now())"
                    " GROUP BY vps_id, date_trunc('month', day)"
                    " ON CONFLICT (vps_id, period_start) DO UPDATE SET"
                    " bandwidth_in_bytes = vps_usage_periods.bandwidth_in_bytes + EXCLUDED.bandwidth_in_bytes,"
                    " cpu_ms = vps_usage_periods.cpu_ms + EXCLUDED.cpu_ms,"
                    " memory_mb_seconds = vps_usage_periods.memory_mb_seconds + EXCLUDED.memory_mb_seconds,"
                    " storage_bytes = vps_usage_periods.storage_bytes + EXCLUDED.storage_bytes", (vps[0],))
        for title, severity in (("Usage at 80% of your plan", "warning"), ("Welcome to Slopbox", "info")):
            sql.execute("INSERT INTO notifications (user_id, kind, severity, title, body) VALUES"
                        " (%s, 'info', %s, %s, 'This is a test notification.')", (user_id, severity, title))

        await page.get_by_role("link", name="Go to dashboard").click()
        await page.get_by_role("link", name="Wizzy").click()
        await expect(page.locator("#state")).to_have_text("running")
        await page.get_by_role("link", name="Usage", exact=True).click()
        await expect(page.get_by_role("heading", name="Usage this month")).to_be_visible()
        await expect(page.get_by_role("img", name="CPU time per day this month, in CPU s")).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "web-usage.png", full_page=True)

        await page.get_by_role("link", name="Notifications: 2 unread").click()
        await expect(page.get_by_role("heading", name="Notifications")).to_be_visible()
        await expect(page.get_by_text("Warning: Usage at 80% of your plan")).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "web-notifications.png", full_page=True)
        await page.get_by_role("button", name="Mark “Welcome to Slopbox” as read").click()
        await expect(page.get_by_role("link", name="Notifications: 1 unread")).to_be_visible()
        await page.get_by_role("button", name="Mark all as read").click()
        await expect(page.get_by_role("link", name="Notifications: 0 unread")).to_be_visible()


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
async def test_try_again_in_the_browser_follows_the_destroy_and_provisions_anew(
        web: Web, sql: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    from playwright.async_api import expect

    never_ready_gateways(web, monkeypatch, budget_s=3)
    _, email = verified_user(sql, "again")
    async with chromium_on_web(web) as (settings, browser):
        page = await logged_in_page(browser, settings, email, PASSWORD)
        await page.get_by_label("Name").fill("Phoenix")
        await page.get_by_role("button", name="Next: choose a plan").click()
        await page.get_by_role("button", name="Next: start the agent").click()
        await expect(page.get_by_role("alert")).to_contain_text("gateway did not become ready", timeout=STEP_MS)

        # The cause goes away. One click: the page follows the destroy, then sets up a new VPS by itself.
        monkeypatch.delenv("SLOPBOX_SIM_NEVER_READY")
        web.api.state.lifecycle_timeouts = FAST
        await page.get_by_role("button", name="Try again").click()
        await expect(page.get_by_role("heading", name="Phoenix is running")).to_be_visible(timeout=STEP_MS)
        await page.screenshot(path=ARTIFACTS / "web-onboarding-try-again.png", full_page=True)
    states = sql.execute("SELECT v.state FROM vpses v JOIN users u ON u.id = v.user_id WHERE u.email = %s "
                         "ORDER BY v.created_at", (email,)).fetchall()
    assert [s[0] for s in states] == ["destroyed", "running"]
