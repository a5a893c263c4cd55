"""Headless Chromium (Debian's, driven by playwright) on the web app served on a real port in front of
the `web` fixture's in-process API. Screenshots go to artifacts/ (ignored by git, kept by CI)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import uvicorn

from settings import Settings
from tests.conftest import free_port
from tests.test_web_app import Web, wait_for
from web.app import create_app as create_web

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
STEP_MS = 120_000
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _missing() -> str | None:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"{CHROMIUM} missing (apt-get install -y chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


MISSING = _missing()
if MISSING is not None and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the web browser tests: {MISSING}")


@asynccontextmanager
async def chromium_on_web(web: Web) -> AsyncIterator[tuple[Settings, Browser]]:
    """The web app listening on a free port (its settings say so) and a launched Chromium."""
    from playwright.async_api import async_playwright

    port = free_port()
    settings = web.settings.model_copy(update={"web_port": port, "web_public_url": f"http://127.0.0.1:{port}"})
    app = create_web(settings, api_transport=httpx.ASGITransport(app=web.api))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    serving = asyncio.create_task(server.serve())
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        await wait_for("the web app to listen", lambda: asyncio.sleep(0, server.started), 60)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield settings, browser
            finally:
                await browser.close()
    finally:
        server.should_exit = True
        await serving


async def logged_in_page(browser: Browser, settings: Settings, email: str, password: str) -> Page:
    """A new browser context logged in through the log-in form, as a person does."""
    page = await (await browser.new_context()).new_page()
    page.set_default_timeout(STEP_MS)
    await page.goto(settings.web_url + "/login")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()
    return page
