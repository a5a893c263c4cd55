"""Issue 5 acceptance in a real browser: a valid session opens the real OpenClaw Control UI through
the proxy and chats.

Headless Chromium (Debian `chromium`, driven by the `playwright` package, never `playwright
install`) loads `/agents/{id}/gateway/` from the in-process proxy in front of a VPS that the real
provisioning made with the real gateway (local provider, OPENCLAW_BIN). Only loopback traffic.

The proxy runs as `slopbox dev` runs it: `serve(settings)` on its configured host and port, and the
browser opens the URL `slopbox dev` prints (`settings.proxy_url`). That matters: the relay's Origin
upstream is that address and the browser's Host is passed through, so only there does the gateway
apply its Control UI build check (a proxy on a random port slipped past it).

What "chats" means here: without an LLM key the Control UI itself only lets slash commands
through its composer ("No provider credential is configured for this model... Try /models or
/help"), so the test sends `/status`, which the gateway answers without a model. That is a real
`chat.send` from the UI's composer, acknowledged by the gateway, answered with an assistant
message, and kept in the session's history (shown again after a reload).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from temporalio.client import Client

from proxy.app import serve
from settings import Settings
from tests.conftest import free_port
from tests.helpers import make_user
from tests.lifecycle_harness import FAST, running_stack
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")

OPENCLAW_BIN = os.environ.get("OPENCLAW_BIN")
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parent.parent


class Wire:
    """Everything the page did on the network: HTTP responses, failures, WebSocket frames."""

    def __init__(self) -> None:
        self.responses: list[tuple[int, str, str]] = []  # status, url, content-type
        self.failed: list[tuple[str, str]] = []
        self.sockets: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def attach(self, page: Any) -> None:
        page.on("response", lambda r: self.responses.append((r.status, r.url, r.headers.get("content-type", ""))))
        page.on("requestfailed", lambda r: self.failed.append((r.url, str(r.failure))))
        page.on("websocket", self._socket)

    def _socket(self, ws: Any) -> None:
        self.sockets.append(ws.url)
        ws.on("framesent", lambda payload: self._frame(self.sent, payload))
        ws.on("framereceived", lambda payload: self._frame(self.received, payload))

    def _frame(self, into: list[dict[str, Any]], payload: Any) -> None:
        try:
            into.append(json.loads(payload))
        except (TypeError, ValueError):
            into.append({"type": "<non-json>"})
        self._changed.set()

    async def wait_for(self, what: str, find: Any, timeout: float = STEP_TIMEOUT_S) -> Any:
        async def loop() -> Any:
            while True:
                found = find()
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()
        try:
            return await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            errors = [(f.get("error") or {}).get("message") for f in self.received
                      if f.get("type") == "res" and f.get("ok") is False]
            raise AssertionError(f"timed out waiting for {what}; sockets={self.sockets} "
                                 f"sent={[f.get('method') for f in self.sent]} errors={errors}") from None

    def hello_oks(self) -> list[dict[str, Any]]:
        return [f for f in self.received if f.get("type") == "res" and f.get("ok") is True
                and (f.get("payload") or {}).get("type") == "hello-ok"]

    def request(self, method: str, message: str) -> dict[str, Any] | None:
        return next((f for f in self.sent if f.get("method") == method
                     and (f.get("params") or {}).get("message") == message), None)

    def response(self, req_id: str) -> dict[str, Any] | None:
        return next((f for f in self.received if f.get("type") == "res" and f.get("id") == req_id), None)

    def chat_final(self, run_id: str) -> dict[str, Any] | None:
        return next((f for f in self.received if f.get("type") == "event" and f.get("event") == "chat"
                     and f["payload"].get("runId") == run_id and f["payload"].get("state") in ("final", "error")),
                    None)

    def history_with(self, text: str) -> dict[str, Any] | None:
        """A chat.startup / chat.history answer whose messages include a user message `text`."""
        ids = {f["id"] for f in self.sent if f.get("method") in ("chat.startup", "chat.history")}
        for f in self.received:
            if f.get("type") == "res" and f.get("id") in ids and f.get("ok"):
                for m in (f.get("payload") or {}).get("messages") or []:
                    if m.get("role") == "user" and m.get("content") == text:
                        return f
        return None


async def _chat_status(page: Any, wire: Wire) -> None:
    """Send `/status` from the Control UI's composer; the gateway answers it without an LLM key."""
    from playwright.async_api import expect

    composer = page.get_by_label("Chat composer")
    await expect(composer).to_be_editable(timeout=STEP_TIMEOUT_S * 1000)
    await composer.fill("/status")
    for _ in range(5):  # the first Enter may only pick the slash-menu entry
        await composer.press("Enter")
        try:
            await wire.wait_for("chat.send", lambda: wire.request("chat.send", "/status"), timeout=3)
            break
        except AssertionError:
            continue
    send = await wire.wait_for("chat.send from the composer", lambda: wire.request("chat.send", "/status"))
    assert send["params"]["sessionKey"] == "agent:main:main"
    ack = await wire.wait_for("chat.send response", lambda: wire.response(send["id"]))
    assert ack["ok"] is True, ack
    run_id = ack["payload"]["runId"]
    final = await wire.wait_for("the run's final chat event", lambda: wire.chat_final(run_id))
    assert final["payload"]["state"] == "final", final
    answer = "".join(part.get("text", "") for part in final["payload"]["message"]["content"])
    assert "OpenClaw" in answer and "Model: anthropic/claude-sonnet-5" in answer, answer
    await expect(page.get_by_text("Model: anthropic/claude-sonnet-5").first).to_be_visible(
        timeout=STEP_TIMEOUT_S * 1000)


def _needs() -> str | None:
    if not OPENCLAW_BIN:
        return "OPENCLAW_BIN not set (real gateway tier)"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"{CHROMIUM} missing (apt-get install -y chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright; no browser download needed)"
    return None


def _tools_tree() -> Path | None:
    """The `.tools` tree OPENCLAW_BIN's wrapper lives in (scripts/install-openclaw.sh), if it is one."""
    if not OPENCLAW_BIN:
        return None
    tools = Path(OPENCLAW_BIN).resolve().parent.parent
    return tools if (tools / "openclaw" / "node_modules" / "openclaw" / "openclaw.mjs").is_file() else None


_TOOLS = _tools_tree()

# In CI (.ci/run installs Chromium and playwright) a missing piece is a failure, not a skip.
_MISSING = _needs()
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the browser test: {_MISSING}")


@pytest.mark.real_gateway
@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
async def test_control_ui_loads_and_chats_through_the_proxy(settings: Settings, temporal_client: Client, db: str,
                                                            sql: psycopg.Connection, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    # `slopbox dev`'s proxy settings, on ports free on this machine (8080 may be taken by a running stack).
    real = settings.model_copy(update={"openclaw_bin": OPENCLAW_BIN, "proxy_host": "127.0.0.1",
                                       "proxy_port": free_port(), "forward_proxy_port": free_port()})
    slow = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 90, "poll_interval_s": 0.5})
    async with running_stack(real, temporal_client, timeouts=slow) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent)).status_code == 202
        vps = await stack.wait_vps(user, agent, "running", "error", timeout=180)
        assert vps["state"] == "running", vps["last_error"]
        # Signed in as the README says: `slopbox session create` prints a single-use link; one click.
        signin = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "session", "create", "--user", str(user), "--agent", agent,
            "--valid-for", "180",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            env={"PATH": os.environ["PATH"], "DATABASE_URL": db, "SLOPBOX_DATA_DIR": str(tmp_path),
                 "PROXY_HOST": real.proxy_host, "PROXY_PORT": str(real.proxy_port)})
        assert signin.stdout is not None
        printed = [(await asyncio.wait_for(signin.stdout.readline(), 30)).decode() for _ in range(3)]
        link = printed[1].strip()

        async with serve(real) as proxy, async_playwright() as pw:
            assert proxy.url == real.proxy_url  # the printed URL, Host and Origin 127.0.0.1:<configured port>
            prefix = f"/agents/{uuid.UUID(agent)}/gateway"
            base = proxy.url + prefix
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context()
                page = await context.new_page()
                wire = Wire()
                wire.attach(page)

                # 1. The sign-in link lands on the real Control UI, which loads through the prefix and connects.
                assert printed[2].strip() == f"It opens {base}/", printed
                doc = await page.goto(link)
                assert doc is not None and doc.status == 200 and doc.url == base + "/", doc and doc.url
                assert await asyncio.wait_for(signin.wait(), 10) == 0
                assert "<title>OpenClaw Control</title>" in await doc.text()
                await wire.wait_for("hello-ok", wire.hello_oks)
                ws_base = "ws://" + proxy.url.removeprefix("http://") + prefix
                assert wire.sockets and all(u.startswith(ws_base) for u in wire.sockets), wire.sockets

                # 2. Chat through the UI's composer: chat.send accepted, answered, rendered.
                await _chat_status(page, wire)

                # 3. The message is in the gateway's history: a fresh page load shows it again.
                sockets_before = len(wire.sockets)
                await page.reload()
                await wire.wait_for("a second hello-ok", lambda: len(wire.hello_oks()) >= 2)
                assert len(wire.sockets) > sockets_before
                await wire.wait_for("history with the sent message", lambda: wire.history_with("/status"))
                await expect(page.get_by_text("Model: anthropic/claude-sonnet-5").first).to_be_visible(
                    timeout=STEP_TIMEOUT_S * 1000)

                shot = tmp_path / "control-ui.png"
                await page.screenshot(path=str(shot))
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
                print(f"screenshot: {shot}")
            finally:
                await browser.close()

    # Nothing the UI asked for left the prefix or was refused by the proxy itself (problem+json):
    # the only 4xx are the gateway's own "not found" for an unset avatar and "owner access required"
    # for the workspace icon.
    ours = [u for _, u, _ in wire.responses if u.startswith(proxy.url + "/")]
    assert ours and all(u.startswith(base) for u in ours), [u for u in ours if not u.startswith(base)]
    # The proxy authenticates as the UI-relay identity (no admin), so the gateway's owner-only workspace
    # icon answers its own 403 (cosmetic, reference §6.6); the proxy's refusals are problem+json.
    refused = [(s, u) for s, u, ct in wire.responses if s >= 400 and ("problem+json" in ct or s not in (403, 404))
               or (s == 403 and "/__openclaw__/workspace-icon/" not in u)]
    # Now and then (seen twice, 2026-12-03) the UI, before the agent's identity has loaded, renders
    # its emoji (IDENTITY.md's 🦞) as an <img src>, a path relative to the page (`chat/🦞`). That is
    # no route of the UI (the gateway has no image there either; the avatar shows once the identity
    # arrives), and the allow-list refuses it: the UI's glitch, not something it needs.
    emoji_as_image = f"{base}/chat/%F0%9F%A6%9E"
    refused = [(s, u) for s, u in refused if not (s == 403 and u == emoji_as_image)]
    assert not refused, refused
    assert all("ERR_ABORTED" in why for _, why in wire.failed), wire.failed  # only what the reload cut off
    blocked = [f for f in wire.received if f.get("type") == "res" and not f.get("ok")
               and (f.get("error") or {}).get("details", {}).get("reason") == "blocked-by-proxy"]
    assert {r["id"] for r in blocked} <= {f["id"] for f in wire.sent if f.get("method") == "config.get"}


@pytest.mark.real_gateway
@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
async def test_make_run_with_nothing_set_is_one_click_from_chatting_with_the_real_gateway(tmp_path: Path) -> None:
    """The issue's "done when": `slopbox dev` with no settings picks the installed real gateway, the
    printed proxy URL serves its Control UI, and `slopbox session create` signs a browser in."""
    from playwright.async_api import async_playwright

    tools = _TOOLS
    if tools is None:  # `make run` finds the gateway only in a .tools tree; CI installs one (.ci/run)
        why = f"OPENCLAW_BIN={OPENCLAW_BIN} is not an install-openclaw.sh wrapper in a .tools tree"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    ports = {name: str(free_port()) for name in ("API_PORT", "PROXY_PORT", "FORWARD_PROXY_PORT", "TEMPORAL_PORT",
                                                  "TEMPORAL_UI_PORT", "EMBEDDED_POSTGRES_PORT")}
    home = Path(tempfile.mkdtemp(prefix="slopbox-run-test-"))  # outside basetemp: see test_dev_stack.data_dir
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(ports, SLOPBOX_DATA_DIR=str(home / "data"))
    if tools != ROOT / ".tools":  # the same installer run, against the tree OPENCLAW_BIN lives in (offline)
        env["OPENCLAW_TOOLS_DIR"] = str(tools)
    out_path = tmp_path / "dev.out"
    with out_path.open("w") as out_file:
        dev = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", "dev", cwd=ROOT, env=env,
                                                   stdout=out_file, stderr=asyncio.subprocess.STDOUT)

    async def printed(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text not in out_path.read_text():
            assert dev.returncode is None and time.monotonic() < deadline, out_path.read_text()
            await asyncio.sleep(0.3)
        return out_path.read_text()

    try:
        out = await printed("Slopbox is up.", 300)
        assert f"gateway: OpenClaw ({tools}/bin/openclaw)" in out and "simulator" not in out, out
        proxy_url = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("Proxy "))
        assert proxy_url == f"http://127.0.0.1:{ports['PROXY_PORT']}"
        user_id = next(line.split()[3] for line in out.splitlines() if "Demo user id" in line)
        key = next(line.split()[2] for line in out.splitlines() if "API key" in line)
        api = f"http://127.0.0.1:{ports['API_PORT']}"
        auth = {"Authorization": f"Bearer {key}", "X-User-Id": user_id}
        async with httpx.AsyncClient(base_url=api, headers=auth, timeout=30) as client:
            plans = (await client.get("/plans")).json()
            config = next(c["id"] for p in plans if p["name"] == "starter" for c in p["vps_configs"]
                          if c["provider"] == "local")
            agent = (await client.post("/agents", json={"name": "molty"})).json()["id"]
            assert (await client.post(f"/agents/{agent}/vps", json={"vps_config_id": config})).status_code == 202
            deadline = time.monotonic() + 300
            while (vps := (await client.get(f"/agents/{agent}")).json()["vps"])["state"] not in ("running", "error"):
                assert time.monotonic() < deadline and dev.returncode is None, vps
                await asyncio.sleep(1)
            assert vps["state"] == "running", vps

        signin = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "session", "create", "--user", "demo@slopbox.local",
            "--valid-for", "180", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE)
        assert signin.stdout is not None
        lines = [(await asyncio.wait_for(signin.stdout.readline(), 60)).decode() for _ in range(3)]
        base = f"{proxy_url}/agents/{agent}/gateway"
        assert lines[2].strip() == f"It opens {base}/", lines
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = await (await browser.new_context()).new_page()
                wire = Wire()
                wire.attach(page)
                doc = await page.goto(lines[1].strip())  # the one click
                assert doc is not None and doc.status == 200 and doc.url == base + "/"
                assert await asyncio.wait_for(signin.wait(), 10) == 0
                await wire.wait_for("hello-ok", wire.hello_oks)
                await _chat_status(page, wire)
            finally:
                await browser.close()
    finally:
        if dev.returncode is None:
            dev.send_signal(signal.SIGTERM)
        await asyncio.wait_for(dev.wait(), 90)
        shutil.rmtree(home, ignore_errors=True)
    assert dev.returncode == 0, out_path.read_text()
