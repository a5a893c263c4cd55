"""The agent's Channels and Settings tabs against the real stack (API, PostgreSQL, Temporal, worker,
the local gateway): pages, their forms, and what the API then holds. Plus one run in Chromium that
keeps screenshots of both tabs in artifacts/."""

from __future__ import annotations

import base64
import re
import struct
import uuid
import zlib
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio

from db.encryption import keyring
from gateway_simulator.qr import _modules, qr_data_url
from tests.helpers import headers, make_user
from tests.test_web_app import PASSWORD, Web, csrf_of, log_in, post_form, wait_for, web  # noqa: F401  (its fixture)
from tests.web_browser_harness import ARTIFACTS, MISSING, STEP_MS, chromium_on_web, logged_in_page
from web import auth
from web.qr_svg import dark_pixels, modules, png_bytes, qr_svg

pytestmark = pytest.mark.asyncio(loop_scope="session")
TELEGRAM = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"


@pytest_asyncio.fixture(loop_scope="session")
async def site(web: Web) -> Web:  # noqa: F811  (the web app fixture, under a name this module does not import)
    return web


def web_user(sql: psycopg.Connection) -> tuple[uuid.UUID, str]:
    """A verified user with a password and the starter plan (it may run an agent)."""
    email = f"ch-{uuid.uuid4().hex[:8]}@example.com"
    user = make_user(sql, plan="starter", email=email)
    sql.execute('UPDATE users SET "emailVerified" = now(), password_hash = %s WHERE id = %s',
                (auth.hash_password(PASSWORD), user))
    return user, email


async def running_agent(site: Web, user: uuid.UUID) -> str:
    agent = await site.stack.new_agent(user, "Chatty")
    assert (await site.stack.provision(user, agent)).status_code == 202
    vps = await site.stack.wait_vps(user, agent, "running", "error", timeout=120)
    assert vps["state"] == "running", vps["last_error"]
    return agent


async def settled(b: httpx.AsyncClient, url: str, needle: str) -> str:
    """The page once it shows `needle` and nothing is in flight any more."""
    last: list[str] = [""]

    async def probe() -> str | None:
        page = await b.get(url)
        assert page.status_code == 200, page.text
        last[0] = page.text
        return page.text if needle in page.text and 'data-busy="1"' not in page.text else None
    try:
        return await wait_for(needle, probe)  # type: ignore[no-any-return]
    except AssertionError:
        main = last[0].split("<main>")[-1].split("<h2>Add a channel")[0]
        raise AssertionError(f"timed out waiting for {needle!r}; the page showed:\n{main}") from None


async def channels_api(site: Web, user: uuid.UUID, agent: str) -> list[dict[str, Any]]:
    resp = await site.stack.api.get(f"/agents/{agent}/channels", headers=headers(user))
    return resp.json()["items"]  # type: ignore[no-any-return]


async def test_telegram_channel_add_list_remove(site: Web, sql: psycopg.Connection) -> None:
    user, email = web_user(sql)
    agent = await running_agent(site, user)
    page_url = f"/agents/{agent}/channels"
    async with site.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        page = await b.get(page_url)
        assert page.status_code == 200 and "No channels yet" in page.text
        assert 'aria-current="page">Channels<' in page.text

        # A mistyped token: refused with the API's reason, the Telegram form open again, the token not echoed.
        bad = "1234:typo-in-the-token"
        resp = await post_form(b, page_url, page_url, {"kind": "telegram", "bot_token": bad})
        assert resp.status_code == 400, resp.text
        assert "Telegram bot token looks like" in resp.text and bad not in resp.text
        assert '<details class="card" id="add-telegram" open>' in resp.text
        assert "…" + bad[-4:] in resp.text  # only a masked hint of what was typed
        assert await channels_api(site, user, agent) == []
        # Slack needs both tokens; the page says which is missing before asking the API.
        slack = await post_form(b, page_url, page_url, {"kind": "slack", "bot_token": "xoxb-" + "a" * 30})
        assert slack.status_code == 400 and "App-level token (Socket Mode) is required" in slack.text

        # No CSRF token: refused, nothing stored.
        forged = await b.post(page_url, data={"kind": "telegram", "bot_token": TELEGRAM})
        assert forged.status_code == 403 and "Form expired" in forged.text
        assert await channels_api(site, user, agent) == []

        resp = await post_form(b, page_url, page_url, {"kind": "telegram", "bot_token": TELEGRAM})
        assert resp.status_code == 303, resp.text
        assert resp.headers["location"].startswith(f"{page_url}?op=")
        first = await b.get(resp.headers["location"])
        assert 'id="operation"' in first.text and "ConnectChannel" in first.text
        done = await settled(b, resp.headers["location"], "ConnectChannel succeeded")
        # No network here: the gateway holds the bot but cannot reach Telegram.
        assert "configured (the gateway accepted it" in done and "Telegram" in done
        assert "The gateway started it; it has not connected to Telegram yet." in done
        assert TELEGRAM not in done and "…" + TELEGRAM[-4:] in done
        listed = await channels_api(site, user, agent)
        assert [c["kind"] for c in listed] == ["telegram"] and listed[0]["status"] == "configured"
        live = await b.get(f"{page_url}/live")
        assert live.status_code == 200 and live.text.lstrip().startswith('<section id="live"')

        again = await post_form(b, page_url, page_url, {"kind": "telegram", "bot_token": TELEGRAM})
        assert again.status_code == 409 and "already configured" in again.text and "DELETE /agents" not in again.text

        confirm = await b.get(f"{page_url}/telegram/remove")
        assert confirm.status_code == 200 and "Remove Telegram from Chatty?" in confirm.text
        assert (await b.post(f"{page_url}/telegram/remove", data={})).status_code == 403
        resp = await b.post(f"{page_url}/telegram/remove", data={"csrf_token": csrf_of(confirm.text)})
        assert resp.status_code == 303, resp.text
        await settled(b, resp.headers["location"], "DisconnectChannel succeeded")
        await settled(b, page_url, "No channels yet")
        assert await channels_api(site, user, agent) == []
        gone = await b.get(f"{page_url}/telegram/remove")
        assert gone.status_code == 404


async def scan(sql: psycopg.Connection, agent: str) -> None:
    """The phone scans the code: the simulator's loopback test hook, with the gateway token."""
    token, port = sql.execute("SELECT a.gateway_token, v.gateway_port FROM agents a JOIN vpses v ON v.id = a.vps_id "
                              "WHERE a.id = %s", (agent,)).fetchone()  # type: ignore[misc]
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"http://127.0.0.1:{port}/__simulator__/whatsapp/scan",
                               headers={"Authorization": f"Bearer {keyring().decrypt(token)}"})
    assert resp.json() == {"ok": True}


async def test_whatsapp_pairing_shows_the_qr_then_paired(site: Web, sql: psycopg.Connection,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOPBOX_SIM_WHATSAPP", "1")
    monkeypatch.setenv("SLOPBOX_SIM_QR_ROTATE_S", "1")
    user, email = web_user(sql)
    agent = await running_agent(site, user)
    page_url = f"/agents/{agent}/channels"
    async with site.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        assert (await b.post(f"{page_url}/whatsapp/pair", data={})).status_code == 403
        resp = await post_form(b, page_url, f"{page_url}/whatsapp/pair", {})
        assert resp.status_code == 303, resp.text

        async def qr(after: int = -1) -> tuple[int, str] | None:
            live = await b.get(f"{page_url}/live")
            found = re.search(r'<figure id="wa-qr" data-version="(\d+)">(<svg .*?</svg>)', live.text)
            return (int(found.group(1)), found.group(2)) if found and int(found.group(1)) > after else None

        version, svg = await wait_for("the QR", qr)
        assert 'role="img"' in svg and "<path d=\"M" in svg and "data:image" not in svg
        page = await b.get(page_url)
        assert 'class="qr"' in page.text and 'data-busy="1"' in page.text and "Cancel pairing" in page.text
        later, svg2 = await wait_for("the QR to rotate", lambda: qr(version))
        assert later > version and svg2 != svg

        # Cancel, then pair again.
        confirm = await b.get(f"{page_url}/whatsapp/remove")
        assert "Cancel the WhatsApp pairing" in confirm.text
        resp = await b.post(f"{page_url}/whatsapp/remove", data={"csrf_token": csrf_of(confirm.text)})
        assert resp.status_code == 303, resp.text
        cancelled = await settled(b, page_url, "Pairing cancelled.")
        assert "Start pairing again" in cancelled and 'id="wa-qr"' not in cancelled

        resp = await post_form(b, page_url, f"{page_url}/whatsapp/pair", {})
        assert resp.status_code == 303, resp.text
        await wait_for("a new QR", qr)
        await scan(sql, agent)
        paired = await settled(b, page_url, "WhatsApp is paired.")
        assert 'id="wa-qr"' not in paired
    assert [c["status"] for c in await channels_api(site, user, agent) if c["kind"] == "whatsapp"] == ["connected"]


async def test_channels_need_a_running_agent(site: Web, sql: psycopg.Connection) -> None:
    user, email = web_user(sql)
    agent = await site.stack.new_agent(user, "Idle")  # no VPS at all
    page_url = f"/agents/{agent}/channels"
    async with site.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        page = await b.get(page_url)
        assert page.status_code == 200 and 'id="not-running"' in page.text
        resp = await post_form(b, page_url, page_url, {"kind": "discord", "bot_token": "x" * 24 + ".abcd." + "y" * 27})
        assert resp.status_code == 409 and "Start the agent first" in resp.text, resp.text
        pair = await post_form(b, page_url, f"{page_url}/whatsapp/pair", {})
        assert pair.status_code == 409 and "Start the agent first" in pair.text
        assert "Traceback" not in resp.text
    assert await channels_api(site, user, agent) == []


async def test_channel_end_states_are_explained(site: Web, sql: psycopg.Connection) -> None:
    """What the workflows leave behind (an expired QR, a channel the gateway refused) reads as such."""
    user, email = web_user(sql)
    agent = await site.stack.new_agent(user, "Quiet")
    sql.execute("INSERT INTO agent_channels (agent_id, kind, status, last_error) VALUES "
                "(%s, 'whatsapp', 'expired', 'the QR code was not scanned in time'), "
                "(%s, 'discord', 'error', 'Used disallowed intents')", (agent, agent))
    async with site.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        page = await b.get(f"/agents/{agent}/channels")
        assert page.status_code == 200 and 'data-busy="0"' in page.text
        assert "The QR code was not scanned in time. Start again" in page.text and "Start pairing again" in page.text
        assert "failed" in page.text and "Reason: Used disallowed intents" in page.text
        # Removing needs the agent's gateway: without a VPS the page says what to do first.
        confirm = await b.get(f"/agents/{agent}/channels/discord/remove")
        resp = await b.post(f"/agents/{agent}/channels/discord/remove", data={"csrf_token": csrf_of(confirm.text)})
        assert resp.status_code == 409 and "Start the agent first" in resp.text


async def test_settings_edit_persists_and_bad_input_is_kept(site: Web, sql: psycopg.Connection) -> None:
    user, email = web_user(sql)
    agent = await running_agent(site, user)
    url = f"/agents/{agent}/settings"
    soul = "# Soul\nAlways answer in haiku.\nNever <script>shout</script>.\n"
    async with site.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        page = await b.get(url)
        assert page.status_code == 200 and 'aria-current="page">Settings<' in page.text
        assert "anthropic/claude-sonnet-5" in page.text  # the default model, offered

        # A model the API would refuse: 400, with every typed text still in the form.
        resp = await post_form(b, url, url, {"SOUL.md": soul, "AGENTS.md": "Be brief.", "IDENTITY.md": "",
                                             "model": "Not A Model"})
        assert resp.status_code == 400 and "the model is written provider/model" in resp.text
        assert "Always answer in haiku." in resp.text and "Never &lt;script&gt;shout&lt;/script&gt;." in resp.text
        assert 'value="Not A Model"' in resp.text
        # No CSRF token: refused, nothing saved.
        forged = await b.post(url, data={"SOUL.md": "hijacked", "model": ""})
        assert forged.status_code == 403

        resp = await post_form(b, url, url, {"SOUL.md": soul.replace("\n", "\r\n"), "AGENTS.md": "Be brief.",
                                             "IDENTITY.md": "name: Nova", "model": "openai/gpt-6-astra"})
        assert resp.status_code == 303, resp.text
        assert resp.headers["location"].startswith(f"{url}?op=")
        done = await settled(b, resp.headers["location"], "the agent now runs with these settings")
        assert "PushConfig succeeded" in done and "Always answer in haiku." in done
        assert 'value="openai/gpt-6-astra"' in done
        fragment = await b.get(f"{url}/operation?" + resp.headers["location"].split("?", 1)[1])
        assert fragment.status_code == 200 and "PushConfig succeeded" in fragment.text

        # Saved again as loaded: nothing is pushed (no restart of the agent), and the page says so.
        again = await post_form(b, url, url, {"SOUL.md": soul.replace("\n", "\r\n"), "AGENTS.md": "Be brief.",
                                              "IDENTITY.md": "name: Nova", "model": "openai/gpt-6-astra"})
        assert again.status_code == 303 and again.headers["location"] == f"{url}?saved=unchanged"
        page = await b.get(again.headers["location"])
        assert "Nothing changed: the agent already has these settings." in page.text

    saved = (await site.stack.api.get(f"/agents/{agent}/settings", headers=headers(user))).json()
    assert saved["files"] == {"SOUL.md": soul, "AGENTS.md": "Be brief.", "IDENTITY.md": "name: Nova"}
    assert saved["model"] == "openai/gpt-6-astra" and saved["default_model"] == "anthropic/claude-sonnet-5"
    agent_row = (await site.stack.api.get(f"/agents/{agent}", headers=headers(user))).json()
    assert agent_row["settings"]["in_sync"] is True


async def test_settings_without_a_vps_and_the_budget(site: Web, sql: psycopg.Connection) -> None:
    user, email = web_user(sql)
    agent = await site.stack.new_agent(user, "Sleepy")
    url = f"/agents/{agent}/settings"
    async with site.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        resp = await post_form(b, url, url, {"SOUL.md": "Calm.", "AGENTS.md": "", "IDENTITY.md": "", "model": ""})
        assert resp.status_code == 303 and resp.headers["location"] == f"{url}?saved=later"
        page = await b.get(resp.headers["location"])
        assert "gets these settings when it next starts" in page.text and ">Calm.</textarea>" in page.text

        for typed, reason in (("12.345", "at most two decimals"), ("lots", "is not an amount in dollars"),
                              ("-5", "cannot be negative"), ("250000", "at most $100,000"), ("NaN", "not an amount")):
            bad = await post_form(b, url, f"{url}/budget", {"budget_dollars": typed})
            assert bad.status_code == 400 and reason in bad.text, (typed, bad.text)
            assert f'name="budget_dollars" value="{typed}"' in bad.text  # what was typed stays
        budget = (await site.stack.api.get("/users/me/overage-budget", headers=headers(user))).json()
        assert budget["budget_cents"] == 0
        assert (await b.post(f"{url}/budget", data={"budget_dollars": "5"})).status_code == 403

        ok = await post_form(b, url, f"{url}/budget", {"budget_dollars": "$1,250.50"})
        assert ok.status_code == 303 and ok.headers["location"] == f"{url}?saved=budget"
        page = await b.get(ok.headers["location"])
        assert "Overage budget saved." in page.text and 'value="1250.50"' in page.text
    budget = (await site.stack.api.get("/users/me/overage-budget", headers=headers(user))).json()
    assert budget["budget_cents"] == 125050


async def test_another_users_agent_tabs_are_404(site: Web, sql: psycopg.Connection) -> None:
    other = make_user(sql)
    theirs = await site.stack.new_agent(other, "Theirs")
    secret = "Their private soul."
    assert (await site.stack.api.patch(f"/agents/{theirs}/settings", json={"files": {"SOUL.md": secret}},
                                      headers=headers(other))).status_code == 200
    assert (await site.stack.api.get(f"/agents/{theirs}/settings", headers=headers(other))).json()["files"][
        "SOUL.md"] == secret
    _me, email = web_user(sql)
    assert (await site.stack.api.get(f"/agents/{theirs}/settings", headers=headers(_me))).status_code == 404
    async with site.browser() as b:
        assert (await log_in(b, email)).status_code == 303
        for path in ("channels", "channels/live", "channels/telegram/remove", "settings", "settings/operation"):
            page = await b.get(f"/agents/{theirs}/{path}")
            assert page.status_code == 404 and secret not in page.text and "Theirs" not in page.text, path
        for path, data in (("channels", {"kind": "telegram", "bot_token": TELEGRAM}), ("channels/whatsapp/pair", {}),
                           ("channels/telegram/remove", {}), ("settings", {"SOUL.md": "mine now", "model": ""}),
                           ("settings/budget", {"budget_dollars": "5"})):
            resp = await post_form(b, "/dashboard", f"/agents/{theirs}/{path}", data)
            assert resp.status_code == 404, (path, resp.text)
        assert (await b.get(f"/agents/{uuid.uuid4()}/channels/myspace/remove")).status_code == 404
    saved = (await site.stack.api.get(f"/agents/{theirs}/settings", headers=headers(other))).json()
    assert saved["files"]["SOUL.md"] == secret


# --- the QR redrawn as SVG ----------------------------------------------------------------------------

def rgba_png(grid: list[list[bool]], scale: int = 3, quiet: int = 4) -> bytes:
    """An RGBA PNG like the real gateway's (node `qrcode` via pngjs), each row under another filter."""
    size = (len(grid) + 2 * quiet) * scale
    rows, prev = [], bytes(size * 4)
    for y in range(size):
        r = y // scale - quiet
        line = bytearray()
        for x in range(size):
            c = x // scale - quiet
            dark = 0 <= r < len(grid) and 0 <= c < len(grid) and grid[r][c]
            line += bytes((0, 0, 0, 255)) if dark else bytes((255, 255, 255, 255))
        ftype = y % 5
        out = bytearray()
        for i, v in enumerate(line):
            a = line[i - 4] if i >= 4 else 0
            b, c2 = prev[i], (prev[i - 4] if i >= 4 else 0)
            pred = {0: 0, 1: a, 2: b, 3: (a + b) // 2}.get(ftype)
            if pred is None:
                p = a + b - c2
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c2)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c2)
            out.append((v - pred) & 0xFF)
        rows.append(bytes([ftype]) + bytes(out))
        prev = bytes(line)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


async def test_qr_png_is_redrawn_module_for_module() -> None:
    url = qr_data_url("secret:1")
    assert modules(dark_pixels(png_bytes(url))) == _modules("secret:1")  # type: ignore[arg-type]
    grid = _modules("other:2")
    rgba = "data:image/png;base64," + base64.b64encode(rgba_png(grid)).decode()
    assert modules(dark_pixels(png_bytes(rgba))) == grid  # type: ignore[arg-type]
    svg = qr_svg(rgba)
    assert svg is not None and svg.startswith("<svg ") and svg.count("h1v1h-1z") == sum(map(sum, grid))
    for junk in (None, "", "https://evil.example/qr.png", "data:image/png;base64,!!!",
                 "data:image/png;base64," + base64.b64encode(b"GIF89a....").decode(),
                 "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()):
        assert qr_svg(junk) is None


# --- in Chromium -------------------------------------------------------------------------------------

@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
async def test_channels_and_settings_tabs_in_the_browser(site: Web, sql: psycopg.Connection,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from playwright.async_api import expect

    monkeypatch.setenv("SLOPBOX_SIM_WHATSAPP", "1")
    user, email = web_user(sql)
    agent = await running_agent(site, user)
    async with chromium_on_web(site) as (settings, browser):
        page = await logged_in_page(browser, settings, email, PASSWORD)
        await page.goto(f"{settings.web_url}/agents/{agent}/channels")

        await page.get_by_text("Telegram", exact=True).click()
        await page.get_by_label("Bot token (from @BotFather)").fill(TELEGRAM)
        await page.get_by_role("button", name="Connect Telegram").click()
        await expect(page.locator("#operation")).to_contain_text("ConnectChannel succeeded", timeout=STEP_MS)
        await expect(page.locator("#channels")).to_contain_text("configured", timeout=STEP_MS)
        await page.screenshot(path=ARTIFACTS / "web-channels.png", full_page=True)

        await page.get_by_role("button", name="Start WhatsApp pairing").click()
        qr = page.locator("#wa-qr svg")
        await expect(qr).to_be_visible(timeout=STEP_MS)  # arrived through the page's polling, not a reload
        await page.screenshot(path=ARTIFACTS / "web-whatsapp-qr.png", full_page=True)
        await scan(sql, agent)
        await expect(page.locator("#wa-state")).to_contain_text("WhatsApp is paired.", timeout=STEP_MS)

        await page.get_by_role("link", name="Settings").click()
        await page.get_by_label("SOUL.md").fill("Answer like a pirate.")
        await page.get_by_role("button", name="Save personality and model").click()
        await expect(page.locator("#operation")).to_contain_text("the agent now runs with these settings",
                                                                 timeout=STEP_MS)
        await page.get_by_label("Monthly overage budget in US dollars").fill("7.5")
        await page.get_by_role("button", name="Save budget").click()
        await expect(page.locator("#notice")).to_contain_text("Overage budget saved.", timeout=STEP_MS)
        await page.screenshot(path=ARTIFACTS / "web-settings.png", full_page=True)
    saved = (await site.stack.api.get(f"/agents/{agent}/settings", headers=headers(user))).json()
    assert saved["files"]["SOUL.md"] == "Answer like a pirate."
