"""The admin panel end to end: real web app -> real admin API -> PostgreSQL, Temporal and the worker.

Sign-in is a real Auth.js session row and its cookie (the login form is covered by test_web_app);
every form is sent as a browser would, with the CSRF token of the page that shows it.
"""

# ruff: noqa: F811  (the `web` and `cleanup_plans` fixtures are imported, then named as parameters)
from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import psycopg
import pytest

from tests.helpers import headers, make_user
from tests.test_admin_api import add_usage, cleanup_plans, make_admin  # noqa: F401  (the fixture)
from tests.test_web_app import Web, csrf_of, post_form, wait_for, web  # noqa: F401  (the fixture)
from tests.web_browser_harness import ARTIFACTS, MISSING, STEP_MS, chromium_on_web
from web import auth

pytestmark = pytest.mark.asyncio(loop_scope="session")

PLAN_FORM = {
    "name": "team", "display_name": "Team", "price_cents_per_month": "4900", "max_agents": "5", "max_vpses": "3",
    "max_bandwidth_bytes": "107374182400", "max_storage_bytes": "21474836480", "max_cpu_ms": "360000000",
    "max_memory_mb_seconds": "7200000000", "overage_bandwidth_cost_per_gb_cents": "9",
    "overage_storage_cost_per_gb_cents": "10", "overage_cpu_cost_per_hour_cents": "2",
    "overage_memory_cost_per_gb_hour_cents": "1",
}


def sign_in(web: Web, sql: psycopg.Connection, user_id: uuid.UUID) -> httpx.AsyncClient:
    """A browser holding a fresh Auth.js database session for `user_id`."""
    token = str(uuid.uuid4())
    sql.execute('INSERT INTO sessions ("sessionToken", "userId", expires) VALUES (%s, %s, now() + interval \'1 day\')',
                (token, user_id))
    b = web.browser()
    b.cookies.set(auth.PLAIN_COOKIE, token)
    return b


@asynccontextmanager
async def as_admin(web: Web, sql: psycopg.Connection) -> AsyncIterator[tuple[httpx.AsyncClient, uuid.UUID]]:
    admin = make_admin(sql)
    async with sign_in(web, sql, admin) as b:
        yield b, admin


def plan_row(sql: psycopg.Connection, name: str) -> tuple[object, ...] | None:
    return sql.execute("SELECT display_name, price_cents_per_month, max_agents, deactivated_at IS NULL FROM plans "
                       "WHERE name = %s", (name,)).fetchone()


async def test_admin_sees_users_vms_and_plans(web: Web, sql: psycopg.Connection) -> None:
    owner = make_user(sql, plan="starter", email=f"owner-{uuid.uuid4().hex[:6]}@example.com")
    agent = await web.stack.new_agent(owner, "fleet-one")
    config = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
    vps = sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, 'local', 'stopped') "
                      "RETURNING id", (owner, config)).fetchone()[0]  # type: ignore[index]
    sql.execute("UPDATE agents SET vps_id = %s WHERE id = %s", (vps, agent))
    email = sql.execute("SELECT email FROM users WHERE id = %s", (owner,)).fetchone()[0]  # type: ignore[index]
    async with as_admin(web, sql) as (b, _admin):
        dash = await b.get("/dashboard", follow_redirects=True)  # no agent yet: the onboarding wizard
        assert dash.status_code == 200 and '<a href="/admin">Admin</a>' in dash.text
        home = await b.get("/admin")
        assert home.status_code == 303 and home.headers["location"] == "/admin/users"

        users = await b.get("/admin/users")
        assert users.status_code == 200 and email in users.text and "Starter" in users.text
        row = re.search(rf"{re.escape(email)}</a>.*?</tr>", users.text, re.S)
        assert row and "<td>1</td><td>1</td>" in row.group(0)  # one agent, one live VPS
        found = await b.get("/admin/users", params={"email": email.split("@")[0].upper()})
        assert email in found.text and "Showing 1–1 of 1" in found.text
        none = await b.get("/admin/users", params={"email": "no-such-address-zzz"})
        assert none.status_code == 200 and "No user's email contains" in none.text

        detail = await b.get(f"/admin/users/{owner}")
        assert detail.status_code == 200 and 'id="plan">Starter<' in detail.text and str(vps) in detail.text
        missing = await b.get(f"/admin/users/{uuid.uuid4()}")
        assert missing.status_code == 404 and "User not found" in missing.text

        vms = await b.get("/admin/vms")
        assert vms.status_code == 200
        vm_row = re.search(rf'id="vps-{vps}">.*?</tr>', vms.text, re.S)
        assert vm_row and email in vm_row.group(0) and "stopped" in vm_row.group(0) and "local" in vm_row.group(0)
        assert f"/admin/vms/{vps}/destroy?owner={owner}" in vm_row.group(0)
        assert f"/admin/vms/{vps}/stop" not in vm_row.group(0)  # a stopped VPS has nothing to stop
        filtered = await b.get("/admin/vms", params={"state": "running"})
        assert f'id="vps-{vps}"' not in filtered.text
        junk = await b.get("/admin/vms", params={"state": "<script>", "offset": "-5"})
        assert junk.status_code == 200 and "<script>" not in junk.text

        plans = await b.get("/admin/plans")
        assert plans.status_code == 200
        for name in ("free", "starter", "pro", "local-small"):
            assert f'id="plan-{name}"' in plans.text or f'id="config-{name}"' in plans.text, name

        usage = await b.get("/admin/usage")
        assert usage.status_code == 200 and 'id="usage-users"' in usage.text
        bad_month = await b.get("/admin/usage", params={"month": "2026-13"})
        assert bad_month.status_code == 400 and "YYYY-MM" in bad_month.text and "Traceback" not in bad_month.text
        audit = await b.get("/admin/audit")
        assert audit.status_code == 200


async def test_plan_create_edit_delete_and_bad_input(web: Web, sql: psycopg.Connection,
                                                     cleanup_plans: None) -> None:
    local = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
    async with as_admin(web, sql) as (b, _admin):
        # Bad input: the form comes back with what was typed and the reasons; nothing is created.
        bad = await post_form(b, "/admin/plans/new", "/admin/plans",
                              {**PLAN_FORM, "name": "Team Plan!", "max_agents": "lots", f"config_{local}": "on"})
        assert bad.status_code == 400, bad.text
        assert "Name: 1 to 64 lower-case letters" in bad.text and "Max agents: a whole number" in bad.text
        assert 'value="Team Plan!"' in bad.text and 'value="lots"' in bad.text and 'value="4900"' in bad.text
        assert re.search(rf'name="config_{local}" checked', bad.text)
        assert plan_row(sql, "team") is None and plan_row(sql, "Team Plan!") is None

        created = await post_form(b, "/admin/plans/new", "/admin/plans", {**PLAN_FORM, f"config_{local}": "on"})
        assert created.status_code == 303, created.text
        assert plan_row(sql, "team") == ("Team", 4900, 5, True)
        listed = await b.get(created.headers["location"])
        row = re.search(r'id="plan-team">.*?</tr>', listed.text, re.S)
        assert row and "$49.00/mo" in row.group(0) and "local-small" in row.group(0)
        assert "Plan &#39;team&#39; created." in listed.text

        # The same name again: the API's 409, readable, with the form kept.
        again = await post_form(b, "/admin/plans/new", "/admin/plans", PLAN_FORM)
        assert again.status_code == 409 and "already exists" in again.text and 'value="Team"' in again.text

        plan_id = sql.execute("SELECT id FROM plans WHERE name = 'team'").fetchone()[0]  # type: ignore[index]
        edit = await b.get(f"/admin/plans/{plan_id}/edit")
        assert edit.status_code == 200 and 'value="4900"' in edit.text
        changed = {**{k: v for k, v in PLAN_FORM.items() if k != "name"}, "display_name": "Team Plus",
                   "price_cents_per_month": "5900", "max_agents": "8", "active": "on", f"config_{local}": "on"}
        saved = await b.post(f"/admin/plans/{plan_id}", data={**changed, "csrf_token": csrf_of(edit.text)})
        assert saved.status_code == 303, saved.text
        assert plan_row(sql, "team") == ("Team Plus", 5900, 8, True)
        row = re.search(r'id="plan-team">.*?</tr>', (await b.get("/admin/plans")).text, re.S)
        assert row and "Team Plus" in row.group(0) and "$59.00/mo" in row.group(0)
        bad_edit = await b.post(f"/admin/plans/{plan_id}",
                                data={**changed, "price_cents_per_month": "-1", "csrf_token": csrf_of(edit.text)})
        assert bad_edit.status_code == 400 and "Price (cents per month): a whole number" in bad_edit.text
        assert 'value="-1"' in bad_edit.text and plan_row(sql, "team") == ("Team Plus", 5900, 8, True)

        # A plan in use cannot be deleted: the API's 409 sentence, not an error page.
        sql.execute("UPDATE users SET plan_id = %s WHERE id = %s", (plan_id, make_user(sql, plan=None)))
        confirm = await b.get(f"/admin/plans/{plan_id}/delete")
        assert confirm.status_code == 200 and "Delete the plan Team Plus?" in confirm.text
        refused = await b.post(f"/admin/plans/{plan_id}/delete", data={"csrf_token": csrf_of(confirm.text)})
        assert refused.status_code == 409 and "Plan in use" in refused.text and "1 user(s) are on it" in refused.text
        assert "Traceback" not in refused.text and plan_row(sql, "team") is not None
        sql.execute("UPDATE users SET plan_id = NULL WHERE plan_id = %s", (plan_id,))
        deleted = await b.post(f"/admin/plans/{plan_id}/delete", data={"csrf_token": csrf_of(confirm.text)})
        assert deleted.status_code == 303 and plan_row(sql, "team") is None
        actions = [r[0] for r in sql.execute("SELECT action FROM admin_audit_log WHERE target_id = %s ORDER BY id",
                                             (str(plan_id),)).fetchall()]
        assert actions == ["plan.create", "plan.update", "plan.delete"]


async def test_vps_config_create_edit_and_conflicts(web: Web, sql: psycopg.Connection,
                                                    cleanup_plans: None) -> None:
    form = {"name": "local-huge", "provider": "local", "cpu_millicores": "4000", "memory_mb": "8192",
            "disk_gb": "40", "image": "openclaw@2026.9.6", "locations": "local"}
    async with as_admin(web, sql) as (b, _admin):
        bad = await post_form(b, "/admin/vps-configs/new", "/admin/vps-configs",
                              {**form, "memory_mb": "0", "locations": " , "})
        assert bad.status_code == 400 and "Memory (MB): a whole number of at least 1." in bad.text
        assert "Locations: at least one" in bad.text and 'value="local-huge"' in bad.text
        created = await post_form(b, "/admin/vps-configs/new", "/admin/vps-configs", form)
        assert created.status_code == 303, created.text
        config_id, memory = sql.execute("SELECT id, memory_mb FROM vps_configs WHERE name = 'local-huge'").fetchone()  # type: ignore[misc]
        assert memory == 8192
        row = re.search(r'id="config-local-huge">.*?</tr>', (await b.get("/admin/plans")).text, re.S)
        assert row and "8192 MB" in row.group(0)

        # In use by a live VPS: its sizes cannot change (409 shown on the form), its image can.
        owner = make_user(sql)
        sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, 'local', 'stopped')",
                    (owner, config_id))
        edit = await b.get(f"/admin/vps-configs/{config_id}/edit")
        resized = await b.post(f"/admin/vps-configs/{config_id}",
                               data={**form, "memory_mb": "16384", "active": "on", "csrf_token": csrf_of(edit.text)})
        assert resized.status_code == 409 and "Config in use" in resized.text and 'value="16384"' in resized.text
        reimaged = await b.post(f"/admin/vps-configs/{config_id}", data={
            **form, "image": "openclaw@2026.9.7", "active": "on", "csrf_token": csrf_of(edit.text)})
        assert reimaged.status_code == 303, reimaged.text
        assert sql.execute("SELECT image, memory_mb FROM vps_configs WHERE id = %s",
                           (config_id,)).fetchone() == ("openclaw@2026.9.7", 8192)
        confirm = await b.get(f"/admin/vps-configs/{config_id}/delete")
        refused = await b.post(f"/admin/vps-configs/{config_id}/delete", data={"csrf_token": csrf_of(confirm.text)})
        assert refused.status_code == 409 and "Config in use" in refused.text and "deactivate it" in refused.text


async def test_exemption_and_plan_change(web: Web, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="starter")
    async with as_admin(web, sql) as (b, admin):
        page = await b.get(f"/admin/users/{user}")
        assert 'id="exempt">applies<' in page.text
        resp = await b.post(f"/admin/users/{user}/exempt", data={"exempt": "true", "csrf_token": csrf_of(page.text)})
        assert resp.status_code == 303
        assert sql.execute("SELECT usage_exempt FROM users WHERE id = %s", (user,)).fetchone() == (True,)
        api_view = await web.stack.api.get(f"/admin/users/{user}", headers=headers(admin))
        assert api_view.json()["usage_exempt"] is True
        page = await b.get(resp.headers["location"])
        assert 'id="exempt">exempt<' in page.text and "Exempt from overage enforcement." in page.text
        resp = await b.post(f"/admin/users/{user}/exempt", data={"exempt": "false", "csrf_token": csrf_of(page.text)})
        assert resp.status_code == 303
        assert sql.execute("SELECT usage_exempt FROM users WHERE id = %s", (user,)).fetchone() == (False,)
        junk = await b.post(f"/admin/users/{user}/exempt", data={"exempt": "maybe", "csrf_token": csrf_of(page.text)})
        assert junk.status_code == 400 and "Choose whether" in junk.text

        pro = sql.execute("SELECT id FROM plans WHERE name = 'pro'").fetchone()[0]  # type: ignore[index]
        resp = await b.post(f"/admin/users/{user}/plan", data={"plan_id": str(pro), "csrf_token": csrf_of(page.text)})
        assert resp.status_code == 303
        assert sql.execute("SELECT plan_id FROM users WHERE id = %s", (user,)).fetchone() == (pro,)
        assert 'id="plan">Pro<' in (await b.get(f"/admin/users/{user}")).text
        unknown = await b.post(f"/admin/users/{user}/plan",
                               data={"plan_id": str(uuid.uuid4()), "csrf_token": csrf_of(page.text)})
        assert unknown.status_code == 404 and "Traceback" not in unknown.text
        actions = [r[0] for r in sql.execute("SELECT action FROM admin_audit_log WHERE target_id = %s ORDER BY id",
                                             (str(user),)).fetchall()]
        assert actions == ["user.usage_exempt", "user.usage_exempt", "user.plan"]


async def test_force_stop_runs_the_workflow_and_is_audited(web: Web, sql: psycopg.Connection) -> None:
    owner = make_user(sql, plan="starter")
    agent = await web.stack.new_agent(owner, "stoppable")
    assert (await web.stack.provision(owner, agent)).status_code == 202
    vps = await web.stack.wait_vps(owner, agent, "running", "error", timeout=120)
    assert vps["state"] == "running", vps["last_error"]
    async with as_admin(web, sql) as (b, _admin):
        vms = await b.get("/admin/vms", params={"state": "running"})
        link = f"/admin/vms/{vps['id']}/stop?owner={owner}"
        assert link in vms.text
        confirm = await b.get(link)
        assert confirm.status_code == 200 and "Force stop this VPS?" in confirm.text
        assert "running on local" in confirm.text
        resp = await b.post(f"/admin/vms/{vps['id']}/stop",
                            data={"owner": str(owner), "csrf_token": csrf_of(confirm.text)})
        assert resp.status_code == 303, resp.text
        op_page = resp.headers["location"]
        assert op_page.startswith("/admin/operations/stop-")
        first = await b.get(op_page)
        assert first.status_code == 200 and "StopVps" in first.text

        async def finished() -> str | None:
            page = await b.get(op_page)
            return page.text if 'id="op-status">succeeded<' in page.text else None

        done = await wait_for("the force stop to finish", finished)
        assert 'http-equiv="refresh"' not in done  # a finished operation stops refreshing
        stopped = await web.stack.wait_vps(owner, agent, "stopped", "error")
        assert stopped["state"] == "stopped"
        row = re.search(rf'id="vps-{vps["id"]}">.*?</tr>', (await b.get("/admin/vms")).text, re.S)
        assert row and 'class="state">stopped' in row.group(0)

        # Stopping it again: the API's 409 on the confirmation page, readable.
        again = await b.post(f"/admin/vms/{vps['id']}/stop", data={"owner": str(owner),
                                                                  "csrf_token": csrf_of(confirm.text)})
        assert again.status_code == 409 and "The VPS is stopped" in again.text and "Traceback" not in again.text

        audit = await b.get("/admin/audit", params={"action": "vps.stop"})
        assert audit.status_code == 200
        entry = re.search(rf'class="action">vps.stop</td>\s*<td>vps <code>{vps["id"]}</code>', audit.text)
        assert entry, audit.text
        assert "Showing 1–1 of 1" in audit.text

        # Force destroy, confirmed: the stopped VM goes away through DestroyVps.
        confirm = await b.get(f"/admin/vms/{vps['id']}/destroy?owner={owner}")
        assert "cannot be undone" in confirm.text and "stopped on local" in confirm.text
        resp = await b.post(f"/admin/vms/{vps['id']}/destroy",
                            data={"owner": str(owner), "csrf_token": csrf_of(confirm.text)})
        assert resp.status_code == 303 and resp.headers["location"].startswith("/admin/operations/destroy-")
        op_page = resp.headers["location"]
        done = await wait_for("the force destroy to finish", finished)
        assert "DestroyVps" in done
        assert (await web.stack.wait_vps(owner, agent, "destroyed"))["state"] == "destroyed"
        audit = await b.get("/admin/audit")
        assert re.findall(r'class="action">([^<]+)<', audit.text) == ["vps.destroy", "vps.stop"]


async def test_audit_log_and_users_are_paged(web: Web, sql: psycopg.Connection) -> None:
    for i in range(60):
        sql.execute("INSERT INTO admin_audit_log (admin_email, action, target_type, target_id, details) "
                    "VALUES ('old@example.com', 'plan.update', 'plan', %s, '{}')", (f"target-{i:02d}",))
    tag = uuid.uuid4().hex[:6]
    for i in range(55):
        make_user(sql, email=f"paged-{tag}-{i:02d}@example.com")
    async with as_admin(web, sql) as (b, _admin):
        first = await b.get("/admin/audit")
        assert "Showing 1–50 of 60" in first.text and "target-59" in first.text and "target-09" not in first.text
        assert 'rel="prev"' not in first.text
        next_link = re.search(r'href="([^"]+)" rel="next"', first.text)
        assert next_link and "offset=50" in next_link.group(1)
        second = await b.get(next_link.group(1).replace("&amp;", "&"))
        assert "Showing 51–60 of 60" in second.text and "target-00" in second.text and 'rel="next"' not in second.text
        assert 'rel="prev"' in second.text
        users = await b.get("/admin/users", params={"email": f"paged-{tag}"})
        assert "Showing 1–50 of 55" in users.text and f"paged-{tag}-49@" in users.text
        more = await b.get("/admin/users", params={"email": f"paged-{tag}", "offset": "50"})
        assert "Showing 51–55 of 55" in more.text and f"paged-{tag}-54@" in more.text
        assert f"paged-{tag}-49@" not in more.text


async def test_non_admins_get_403_everywhere(web: Web, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    some = uuid.uuid4()
    pages = ["/admin", "/admin/users", f"/admin/users/{some}", "/admin/vms", f"/admin/vms/{some}/stop",
             f"/admin/vms/{some}/destroy", f"/admin/operations/stop-{some}", "/admin/plans", "/admin/plans/new",
             f"/admin/plans/{some}/edit", f"/admin/plans/{some}/delete", "/admin/vps-configs/new",
             f"/admin/vps-configs/{some}/edit", f"/admin/vps-configs/{some}/delete", "/admin/usage", "/admin/audit"]
    posts = [f"/admin/users/{user}/plan", f"/admin/users/{user}/exempt", f"/admin/vms/{some}/stop",
             f"/admin/vms/{some}/destroy", "/admin/plans", f"/admin/plans/{some}", f"/admin/plans/{some}/delete",
             "/admin/vps-configs", f"/admin/vps-configs/{some}", f"/admin/vps-configs/{some}/delete"]
    async with sign_in(web, sql, user) as b:
        dash = await b.get("/dashboard", follow_redirects=True)  # no agent yet: the onboarding wizard
        assert dash.status_code == 200 and 'href="/admin"' not in dash.text
        token = csrf_of(dash.text)
        for path in pages:
            resp = await b.get(path)
            assert resp.status_code == 403 and "Admins only" in resp.text, path
        for path in posts:
            resp = await b.post(path, data={"exempt": "true", "plan_id": str(some), "csrf_token": token})
            assert resp.status_code == 403 and "Admins only" in resp.text, path
    assert sql.execute("SELECT usage_exempt FROM users WHERE id = %s", (user,)).fetchone() == (False,)
    assert sql.execute("SELECT count(*) FROM admin_audit_log").fetchone() == (0,)
    async with web.browser() as anonymous:
        for path in ("/admin", "/admin/users", "/admin/plans"):
            resp = await anonymous.get(path)
            assert resp.status_code == 303 and resp.headers["location"] == "/login", path
        resp = await anonymous.post("/admin/plans", data=PLAN_FORM)
        assert resp.status_code == 303 and resp.headers["location"] == "/login"


async def test_admin_forms_need_the_csrf_token(web: Web, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    async with as_admin(web, sql) as (b, _admin):
        await b.get("/admin/users")  # the browser holds a CSRF cookie now
        for path, data in ((f"/admin/users/{user}/exempt", {"exempt": "true"}), ("/admin/plans", PLAN_FORM),
                           (f"/admin/vms/{uuid.uuid4()}/stop", {})):
            missing = await b.post(path, data=data)
            assert missing.status_code == 403 and "Form expired" in missing.text, path
            wrong = await b.post(path, data={**data, "csrf_token": "x" * 43})
            assert wrong.status_code == 403, path
    assert sql.execute("SELECT usage_exempt FROM users WHERE id = %s", (user,)).fetchone() == (False,)
    assert plan_row(sql, "team") is None


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
async def test_admin_pages_in_the_browser(web: Web, sql: psycopg.Connection, cleanup_plans: None) -> None:
    """An admin in Chromium: users (exempting one), VMs, a plan created through its form, usage, audit log."""
    from playwright.async_api import expect

    owner = make_user(sql, plan="starter", email=f"heavy-{uuid.uuid4().hex[:6]}@example.com")
    add_usage(sql, owner, "local", (3 * 2**30, 2**30, 7_200_000, 3_600_000, 5 * 2**30))
    add_usage(sql, owner, "hetzner", (2**30, 2**29, 1_800_000, 900_000, 2**30))
    admin = make_admin(sql)
    token = str(uuid.uuid4())
    sql.execute('INSERT INTO sessions ("sessionToken", "userId", expires) VALUES (%s, %s, now() + interval \'1 day\')',
                (token, admin))
    async with chromium_on_web(web) as (settings, browser):
        context = await browser.new_context()
        await context.add_cookies([{"name": auth.PLAIN_COOKIE, "value": token, "url": settings.web_url}])
        page = await context.new_page()
        page.set_default_timeout(STEP_MS)
        await page.goto(settings.web_url + "/dashboard")
        await page.get_by_role("link", name="Admin", exact=True).click()
        await expect(page.get_by_role("heading", name="Admin: users")).to_be_visible()
        await page.get_by_label("Search by email").fill("heavy-")
        await page.get_by_role("button", name="Search").click()
        await expect(page.locator("#users tbody tr")).to_have_count(1)
        await page.screenshot(path=ARTIFACTS / "web-admin-users.png", full_page=True)
        await page.locator("#users").get_by_role("link").first.click()
        await page.get_by_role("button", name="Exempt from overage enforcement").click()
        await expect(page.locator("#exempt")).to_have_text("exempt")
        await page.screenshot(path=ARTIFACTS / "web-admin-user.png", full_page=True)

        await page.get_by_role("link", name="VMs").click()
        await expect(page.locator("#vms tbody tr")).to_have_count(2)
        await page.screenshot(path=ARTIFACTS / "web-admin-vms.png", full_page=True)

        await page.get_by_role("link", name="Plans and VPS configs").click()
        await page.get_by_role("link", name="New plan").click()
        for field, value in PLAN_FORM.items():
            await page.locator(f"#{field}").fill(value)
        await page.get_by_label("local-small (local)").check()
        await page.get_by_role("button", name="Create plan").click()
        await expect(page.locator("#plan-team")).to_contain_text("$49.00/mo")
        await page.screenshot(path=ARTIFACTS / "web-admin-plans.png", full_page=True)

        await page.get_by_role("link", name="Usage").click()
        await expect(page.locator("#usage-vpses")).to_have_text("2")
        await page.screenshot(path=ARTIFACTS / "web-admin-usage.png", full_page=True)

        await page.get_by_role("link", name="Audit log").click()
        await expect(page.locator("#audit td.action")).to_have_text(["plan.create", "user.usage_exempt"])
        await page.screenshot(path=ARTIFACTS / "web-admin-audit.png", full_page=True)
