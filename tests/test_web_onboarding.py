"""The onboarding wizard, the Usage tab and the notifications page, end to end over HTTP.

Same stack as tests/test_web_app.py (its `web` fixture): the real web app and API in-process, real
PostgreSQL, a real Temporal dev server and worker, local VMs running the gateway simulator.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio

from metering.periods import month_of
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST
from tests.metering_harness import make_vps
from tests.test_web_app import PASSWORD, Web, csrf_of, log_in, new_agent, post_form, wait_for
from tests.test_web_app import web as web_stack  # noqa: F401  (the `web` fixture)
from web import auth
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def web(web_stack: Web) -> Web:  # noqa: F811  (the fixture imported above, by its name)
    """tests/test_web_app.py's stack under the name its helpers use."""
    return web_stack


def verified_user(sql: psycopg.Connection, prefix: str) -> tuple[str, uuid.UUID]:
    """A signed-up, verified user on the default plan (free), as the sign-up flow leaves one."""
    email = f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"
    row = sql.execute('INSERT INTO users (email, "emailVerified", password_hash) VALUES (%s, now(), %s) RETURNING id',
                      (email, auth.hash_password(PASSWORD))).fetchone()
    assert row is not None
    return email, row[0]


def plan_of(sql: psycopg.Connection, user: uuid.UUID) -> str | None:
    row = sql.execute("SELECT p.name FROM users u LEFT JOIN plans p ON p.id = u.plan_id WHERE u.id = %s",
                      (user,)).fetchone()
    return row[0] if row else None


async def status_of(b: httpx.AsyncClient, agent_id: str) -> dict[str, Any]:
    resp = await b.get(f"/onboarding/{agent_id}/status")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json"), resp.text
    return resp.json()  # type: ignore[no-any-return]


async def until_phase(b: httpx.AsyncClient, agent_id: str, phase: str, seen: list[dict[str, Any]]) -> None:
    async def probe() -> bool:
        got = await status_of(b, agent_id)
        seen.append(got)
        assert got["phase"] in ("working", phase), got  # never anything else on the way
        return bool(got["phase"] == phase)

    await wait_for(f"phase {phase}", probe)


async def name_step(b: httpx.AsyncClient, data: dict[str, str]) -> httpx.Response:
    return await post_form(b, "/onboarding", "/onboarding", data)


async def test_wizard_end_to_end(web: Web, sql: psycopg.Connection) -> None:
    email, user = verified_user(sql, "wiz")
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        dash = await b.get("/dashboard")  # no agent yet: straight into the wizard
        assert dash.status_code == 303 and dash.headers["location"] == "/onboarding"
        first = await b.get("/onboarding")
        assert first.status_code == 200 and 'aria-current="step">Name and personality' in first.text
        assert '<label for="name">' in first.text and '<label for="custom">' in first.text

        # Bad input is answered on the same step, with what to fix.
        empty = await name_step(b, {"name": "", "preset": "helpful"})
        assert empty.status_code == 400 and "Check the form" in empty.text
        no_text = await name_step(b, {"name": "Wizzy", "preset": "custom", "custom": "  "})
        assert no_text.status_code == 400 and "Describe the personality" in no_text.text
        assert sql.execute("SELECT count(*) FROM agents WHERE user_id = %s", (user,)).fetchone() == (0,)

        made = await name_step(b, {"name": "Wizzy", "preset": "custom", "custom": "You speak like a pirate."})
        assert made.status_code == 303, made.text
        agent_id = made.headers["location"].split("/")[2]
        assert made.headers["location"] == f"/onboarding/{agent_id}/plan"
        soul = sql.execute("SELECT personality FROM agents WHERE id = %s", (agent_id,)).fetchone()
        assert soul is not None and soul[0]["SOUL.md"] == "# Soul\n\nYou speak like a pirate.\n"

        plans = await b.get(f"/onboarding/{agent_id}/plan")
        assert plans.status_code == 200
        for name in ("Free", "Starter", "Pro"):
            assert f"<strong>{name}</strong>" in plans.text
        checked = re.search(r'id="plan-(\w+)" name="plan_id" value="[^"]+" checked', plans.text)
        assert checked and checked.group(1) == "free"  # the current plan is preselected
        starter = re.search(r'id="plan-starter" name="plan_id" value="([^"]+)"', plans.text)
        assert starter
        bad = await post_form(b, f"/onboarding/{agent_id}/plan", f"/onboarding/{agent_id}/plan", {"plan_id": "x"})
        assert bad.status_code == 400 and "Pick one of the plans" in bad.text
        chosen = await post_form(b, f"/onboarding/{agent_id}/plan", f"/onboarding/{agent_id}/plan",
                                 {"plan_id": starter.group(1)})
        assert chosen.status_code == 303 and chosen.headers["location"] == f"/onboarding/{agent_id}/provision"
        assert plan_of(sql, user) == "starter"
        me = await web.stack.api.get("/users/me", headers=headers(user))
        assert me.json()["plan"]["name"] == "starter"

        # Reloading the plan step now (a VPS exists) lands on the progress page: state is the API's.
        assert (await b.get(f"/onboarding/{agent_id}/plan")).headers["location"] == f"/onboarding/{agent_id}/provision"
        progress = await b.get(f"/onboarding/{agent_id}/provision")
        if progress.status_code == 200:  # still working (not a timing assertion: both outcomes are checked)
            assert 'id="steps"' in progress.text and "Creating the virtual machine" in progress.text
            assert '<noscript><meta http-equiv="refresh"' in progress.text and f"/onboarding/{agent_id}/status" \
                in progress.text
        else:
            assert progress.headers["location"] == f"/onboarding/{agent_id}/channels"
        seen: list[dict[str, Any]] = []
        await until_phase(b, agent_id, "ready", seen)
        final = seen[-1]
        assert final["state"] == "running" and final["next"] == f"/onboarding/{agent_id}/channels"
        assert [s["status"] for s in final["steps"]] == ["done"] * len(final["steps"])
        for s in seen:  # every poll on the way named at most one current step, from the workflow's own list
            assert sum(step["status"] == "current" for step in s["steps"]) <= 1, s

        done_progress = await b.get(f"/onboarding/{agent_id}/provision")
        assert done_progress.headers["location"] == f"/onboarding/{agent_id}/channels"
        assert (await b.get(f"/onboarding/{agent_id}")).headers["location"] == f"/onboarding/{agent_id}/channels"
        channels = await b.get(f"/onboarding/{agent_id}/channels")
        assert channels.status_code == 200
        assert f'href="/agents/{agent_id}/channels"' in channels.text and 'id="skip"' in channels.text
        done = await b.get(f"/onboarding/{agent_id}/done")
        assert done.status_code == 200 and "Wizzy is ready" in done.text
        assert f'href="{web.settings.proxy_url}/agents/{agent_id}/gateway/"' in done.text and "Open chat" in done.text
        assert 'href="/dashboard"' in done.text and "Go to dashboard" in done.text

        dash = await b.get("/dashboard")
        assert dash.status_code == 200 and "Wizzy" in dash.text and 'href="/onboarding"' in dash.text
        overview = await b.get(f"/agents/{agent_id}")
        assert 'id="state">running<' in overview.text
        uptime = re.search(r'id="uptime">([^<]+)<', overview.text)
        assert uptime and uptime.group(1) != "not running", overview.text
        assert "none connected" in overview.text

        # A second agent on a plan its owner no longer fits: the wizard says why, nothing changes.
        second = await name_step(b, {"name": "Second", "preset": "concise"})
        assert second.status_code == 303
        second_id = second.headers["location"].split("/")[2]
        page = await b.get(f"/onboarding/{second_id}/plan")
        free = re.search(r'id="plan-free" name="plan_id" value="([^"]+)"', page.text)
        assert free
        refused = await post_form(b, f"/onboarding/{second_id}/plan", f"/onboarding/{second_id}/plan",
                                  {"plan_id": free.group(1)})
        assert refused.status_code == 409 and "Plan too small" in refused.text
        assert "2 agent(s) but it allows 1" in refused.text and "Traceback" not in refused.text
        assert plan_of(sql, user) == "starter"


async def test_no_room_on_the_plan_offers_a_larger_one(web: Web, sql: psycopg.Connection) -> None:
    email, user = verified_user(sql, "full")  # free: one agent
    assert (await web.stack.api.post("/agents", json={"name": "First"}, headers=headers(user))).status_code == 201
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        full = await name_step(b, {"name": "Second", "preset": "helpful"})
        assert full.status_code == 403 and "allows 1 agent(s)" in full.text
        assert 'href="/onboarding/plan"' in full.text and "Traceback" not in full.text
        plans = await b.get("/onboarding/plan")
        assert plans.status_code == 200 and 'action="/onboarding/plan"' in plans.text
        pro = re.search(r'id="plan-pro" name="plan_id" value="([^"]+)"', plans.text)
        assert pro
        moved = await post_form(b, "/onboarding/plan", "/onboarding/plan", {"plan_id": pro.group(1)})
        assert moved.status_code == 303 and moved.headers["location"] == "/onboarding"
        assert plan_of(sql, user) == "pro"
        second = await name_step(b, {"name": "Second", "preset": "helpful"})
        assert second.status_code == 303 and second.headers["location"].endswith("/plan")
        bad = await post_form(b, "/onboarding/plan", "/onboarding/plan", {"plan_id": "nope"})
        assert bad.status_code == 400 and "Pick one of the plans" in bad.text


async def test_failed_provision_then_try_again(web: Web, sql: psycopg.Connection,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOPBOX_SIM_NEVER_READY", "1")
    monkeypatch.setattr(web.api.state, "lifecycle_timeouts",
                        LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 3}))
    email, _user = verified_user(sql, "retry")
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        made = await name_step(b, {"name": "Phoenix", "preset": "friendly"})
        agent_id = made.headers["location"].split("/")[2]
        plan_page = await b.get(f"/onboarding/{agent_id}/plan")
        free = re.search(r'id="plan-free" name="plan_id" value="([^"]+)" checked', plan_page.text)
        assert free
        chosen = await post_form(b, f"/onboarding/{agent_id}/plan", f"/onboarding/{agent_id}/plan",
                                 {"plan_id": free.group(1)})
        assert chosen.status_code == 303
        await until_phase(b, agent_id, "failed", [])
        failed = await b.get(f"/onboarding/{agent_id}/provision")
        assert failed.status_code == 200
        assert 'id="provision-error"' in failed.text and "gateway did not become ready within 3s" in failed.text
        assert f'action="/onboarding/{agent_id}/retry"' in failed.text and "Try again" in failed.text
        assert (await b.get(f"/onboarding/{agent_id}")).headers["location"] == f"/onboarding/{agent_id}/provision"
        no_token = await b.post(f"/onboarding/{agent_id}/retry")
        assert no_token.status_code == 403  # CSRF

        # The cause goes away; "Try again" destroys the failed VPS (answering at once, not when the VM
        # is gone), the progress page follows the destroy and then posts once more for a new VPS.
        monkeypatch.delenv("SLOPBOX_SIM_NEVER_READY")
        web.api.state.lifecycle_timeouts = FAST
        old_vps = sql.execute("SELECT vps_id FROM agents WHERE id = %s", (agent_id,)).fetchone()
        again = await b.post(f"/onboarding/{agent_id}/retry", data={"csrf_token": csrf_of(failed.text)})
        following = f"/onboarding/{agent_id}/provision?again=1"
        assert again.status_code == 303 and again.headers["location"] == following, again.text
        async def destroyed() -> bool:
            got = (await b.get(f"/onboarding/{agent_id}/status?again=1")).json()
            assert got["phase"] in ("failed", "working", "none"), got
            return bool(got["phase"] == "none" and got["next"] == following)

        await wait_for("the failed VPS destroyed", destroyed)
        page = await b.get(following)
        assert page.status_code == 200 and "The failed machine was removed." in page.text
        assert 'id="again-form"' in page.text and 'getElementById("again-form").submit()' in page.text
        new = await b.post(f"/onboarding/{agent_id}/retry", data={"csrf_token": csrf_of(page.text)})
        assert new.status_code == 303 and new.headers["location"] == f"/onboarding/{agent_id}/provision", new.text
        await until_phase(b, agent_id, "ready", [])
        rows = sql.execute("SELECT id, state FROM vpses WHERE user_id = (SELECT user_id FROM agents WHERE id = %s)",
                           (agent_id,)).fetchall()
        states = {str(r[0]): r[1] for r in rows}
        assert old_vps is not None and states[str(old_vps[0])] == "destroyed"
        assert sorted(states.values()) == ["destroyed", "running"]
        assert (await b.get(f"/onboarding/{agent_id}/channels")).status_code == 200


async def test_usage_tab(web: Web, sql: psycopg.Connection) -> None:
    email, user = verified_user(sql, "usage")
    api_agent = await web.stack.api.post("/agents", json={"name": "Meter"}, headers=headers(user))
    agent_id = api_agent.json()["id"]
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        empty = await b.get(f"/agents/{agent_id}/usage")
        assert empty.status_code == 200 and 'id="usage-empty"' in empty.text and "No usage figures yet" in empty.text
        assert 'aria-current="page">Usage' in empty.text

        now = datetime.now(UTC)
        period = month_of(int(now.timestamp()))
        vps = make_vps(sql, user, "local-small", ref=None, created=int(now.timestamp()) - 3600)
        sql.execute("UPDATE agents SET vps_id = %s WHERE id = %s", (vps, agent_id))
        gib = 1024 ** 3
        sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes, bandwidth_out_bytes,"
                    " cpu_ms, memory_mb_seconds, storage_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (vps, period, 2 * gib, gib, 7_200_000, 1024 * 3600 * 5, 3 * gib))
        sql.execute("INSERT INTO vps_usage_daily (vps_id, day, bandwidth_in_bytes, bandwidth_out_bytes, cpu_ms,"
                    " memory_mb_seconds, storage_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    # The proxy's bytes are in the month's totals, not in the daily series: the page's
                    # in/out split is the month's, not the days' sum.
                    (vps, now.date(), gib, gib, 7_200_000, 1024 * 3600 * 5, 3 * gib))
        page = await b.get(f"/agents/{agent_id}/usage")
    assert page.status_code == 200 and 'id="usage-empty"' not in page.text
    text = page.text
    assert "3.0 GB (in 2.0 GB, out 1.0 GB)" in text and "5.0 GB" in text  # against the free plan's 5 GB
    assert "2.0 h" in text and "20.0 h" in text  # CPU against 20 CPU hours
    assert "5.00 GB·h" in text
    assert text.count('<svg role="img"') == 4 and "CPU time per day this month" in text
    assert re.search(r'<svg role="img" aria-labelledby="(chart-\d+)".*?<title id="\1">', text, re.S)
    assert f"<td>{now.date().isoformat()}</td>" in text  # the data table behind each chart
    assert 'id="overage"' in text and "overage budget" in text and "projected" in text
    assert '<meter min="0" max="100" value="60"' in text  # 3 of 5 GB


async def test_notifications_page(web: Web, sql: psycopg.Connection) -> None:
    email, user = verified_user(sql, "bell")
    other = make_user(sql)
    ids = []
    for i, severity in enumerate(("info", "warning", "critical")):
        row = sql.execute("INSERT INTO notifications (user_id, kind, severity, title, body, created_at)"
                          " VALUES (%s, 'info', %s, %s, 'Body text', now() - %s * interval '1 minute') RETURNING id",
                          (user, severity, f"Note {i}", i)).fetchone()
        assert row is not None
        ids.append(str(row[0]))
    theirs = sql.execute("INSERT INTO notifications (user_id, kind, title, body) VALUES (%s, 'info', 'Theirs', 'x')"
                         " RETURNING id", (other,)).fetchone()
    assert theirs is not None
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        page = await b.get("/notifications")
        assert page.status_code == 200 and "Theirs" not in page.text
        assert re.search(r'<a id="unread" href="/notifications" aria-label="Notifications: 3 unread"', page.text)
        assert "3 unread of 3" in page.text and "Important: Note 2" in page.text
        marked = await b.post(f"/notifications/{ids[0]}/read", data={"csrf_token": csrf_of(page.text)})
        assert marked.status_code == 303
        page = await b.get("/notifications")
        assert "2 unread of 3" in page.text and 'aria-label="Notifications: 2 unread"' in page.text
        assert f'action="/notifications/{ids[0]}/read"' not in page.text
        only = await b.get("/notifications?unread=true")
        assert "Note 0" not in only.text and "Note 1" in only.text
        assert (await b.post(f"/notifications/{theirs[0]}/read",
                             data={"csrf_token": csrf_of(page.text)})).status_code == 404
        assert (await b.post("/notifications/read-all")).status_code == 403  # no CSRF token
        everything = await b.post("/notifications/read-all", data={"csrf_token": csrf_of(page.text)})
        assert everything.status_code == 303
        page = await b.get("/notifications")
        assert "0 unread of 3" in page.text and 'id="read-all"' not in page.text
    assert sql.execute("SELECT read_at FROM notifications WHERE id = %s", (theirs[0],)).fetchone() == (None,)
    _email, lonely = verified_user(sql, "lonely")
    async with web.browser() as b:
        assert (await log_in(b, _email)).status_code == 303
        empty = await b.get("/notifications")
        assert 'id="no-notifications"' in empty.text and lonely


async def test_other_users_tabs_are_404(web: Web, sql: psycopg.Connection) -> None:
    other = make_user(sql)
    theirs = (await web.stack.api.post("/agents", json={"name": "theirs"}, headers=headers(other))).json()["id"]
    email, _user = verified_user(sql, "nosy")
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        for path in ("/usage", "", "/channels", "/done"):
            page = await b.get(f"/agents/{theirs}{path}") if path in ("/usage", "") else \
                await b.get(f"/onboarding/{theirs}{path}")
            assert page.status_code == 404 and "theirs" not in page.text, path
        for path in ("", "/plan", "/provision", "/status"):
            page = await b.get(f"/onboarding/{theirs}{path}")
            assert page.status_code == 404 and "theirs" not in page.text, path
        token = csrf_of((await b.get("/onboarding")).text)
        for action in ("/plan", "/retry"):
            resp = await b.post(f"/onboarding/{theirs}{action}",
                                data={"csrf_token": token, "plan_id": str(uuid.uuid4())})
            assert resp.status_code == 404, action
    assert sql.execute("SELECT vps_id FROM agents WHERE id = %s", (theirs,)).fetchone() == (None,)


async def test_progress_reads_the_api_state() -> None:
    """The step list and phase from an agent as the API returns it (no stack needed: pure mapping)."""
    from web.routes.agents import uptime
    from web.routes.onboarding import progress

    def agent(**vps: Any) -> dict[str, Any]:
        return {"vps": {"state": "provisioning", "operation": None, "step": None, "last_error": None,
                        "last_operation": None, **vps}}

    queued = progress(agent(operation={"operation": "ProvisionVps", "step": None}, operation_id="p"))
    assert queued["phase"] == "working" and [s["status"] for s in queued["steps"]][:2] == ["current", "todo"]
    booting = progress(agent(operation={"operation": "ProvisionVps"}, step="wait_gateway_ready"))
    assert [s["status"] for s in booting["steps"]] == ["done", "done", "done", "current", "todo", "todo"]
    cleanup = progress(agent(state="error", operation={"operation": "DestroyVps"}, step="destroy_vm"))
    assert cleanup["phase"] == "working" and cleanup["other_step"] == "Removing the failed machine"
    failed = progress(agent(state="error", last_operation={"status": "failed", "error": "boom"}))
    assert failed["phase"] == "failed" and failed["error"] == "boom"
    assert progress({"vps": None})["phase"] == "none"
    assert progress(agent(state="destroyed"))["phase"] == "none"
    assert progress(agent(state="stopped"))["phase"] == "other"
    ready = progress(agent(state="running"))
    assert ready["phase"] == "ready" and {s["status"] for s in ready["steps"]} == {"done"}

    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert uptime({"state": "running", "state_changed_at": "2026-12-02T11:58:30+00:00"}, now) == "1 min 30 s"
    assert uptime({"state": "running", "state_changed_at": "2026-11-30T09:00:00+00:00"}, now) == "2 d 3 h"
    assert uptime({"state": "stopped", "state_changed_at": "2026-12-02T11:00:00+00:00"}, now) is None


async def test_pages_run_only_their_own_nonced_scripts(web: Web, sql: psycopg.Connection) -> None:
    email, _user = verified_user(sql, "csp")
    async with web.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        agent_id = await new_agent(b, "Nonce", "friendly")
        nonces = []
        for _ in range(2):  # the Settings tab always carries its inline script
            page = await b.get(f"/agents/{agent_id}/settings")
            assert page.status_code == 200
            csp = page.headers["content-security-policy"]
            nonce = re.search(r"script-src 'nonce-([\w-]+)'", csp)
            assert nonce, csp
            assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp and "unsafe-inline'" not in \
                csp.split("script-src", 1)[1].split(";", 1)[0]
            scripts = re.findall(r"<script[^>]*>", page.text)
            assert scripts and all(f'nonce="{nonce.group(1)}"' in s for s in scripts), scripts
            nonces.append(nonce.group(1))
        assert nonces[0] != nonces[1]  # one per response
        landing = await b.get("/")
        assert "script-src 'nonce-" in landing.headers["content-security-policy"]


async def test_every_inline_script_in_the_templates_carries_the_nonce() -> None:
    """A script without the response's nonce would not run under the pages' CSP."""
    templates = Path(__file__).resolve().parent.parent / "web" / "templates"  # noqa: ASYNC240 (a test reading files)
    for template in templates.glob("*.html"):
        for tag in re.findall(r"<script[^>]*>", template.read_text()):
            assert 'nonce="{{ csp_nonce }}"' in tag, (template.name, tag)
