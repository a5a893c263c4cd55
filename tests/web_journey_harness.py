"""The stack of `make run` (`slopbox dev`) as a subprocess, for browser tests of the web app.

`DevStack.start` runs `python -m cli.main dev` with free ports (a developer's own `make run` may hold
the default ones) and a data directory outside pytest's basetemp, waits for "Slopbox is up." and
reads every URL and secret from what it printed, exactly as a person would: the web app, the API,
the proxy, the demo admin's id, the API key and the mail sink's log. The local VPSes run the real
OpenClaw gateway (OPENCLAW_BIN).

`DevStack.cli` runs other `slopbox` commands (e.g. `user admin`) with the same environment.

Also here: `verification_link`, which reads the sign-up mail from the sink's `mail.log`, and
`Shots`, the numbered screenshots (artifacts/web-journey-NN-<page>.png, kept by CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0
PORT_VARS = ("API_PORT", "PROXY_PORT", "FORWARD_PROXY_PORT", "TEMPORAL_PORT", "TEMPORAL_UI_PORT",
             "EMBEDDED_POSTGRES_PORT", "SLOPBOX_MAIL_SINK_PORT", "WEB_PORT", "WORKER_METRICS_PORT",
             "WORKER_TEMPORAL_METRICS_PORT", "PROXY_METRICS_PORT")


def _printed(out: str, label: str) -> str:
    """The value after `label` on the banner line that starts with it (`  Web app       http://...`)."""
    for line in out.split("Slopbox is up.", 1)[-1].splitlines():
        if line.strip().startswith(label + " "):
            return line.strip().removeprefix(label).split()[0]
    raise AssertionError(f"`slopbox dev` printed no {label!r} line:\n{out}")


@dataclass
class DevStack:
    """A running `slopbox dev` and what it printed."""

    proc: asyncio.subprocess.Process
    home: Path
    out_path: Path
    ports: dict[str, str]
    web_url: str = ""
    api_url: str = ""
    proxy_url: str = ""
    demo_user_id: str = ""
    api_key: str = ""
    mail_log: Path = field(default_factory=Path)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def start(cls, extra_env: dict[str, str] | None = None) -> DevStack:
        home = Path(tempfile.mkdtemp(prefix="slopbox-journey-"))  # outside basetemp: see test_dev_stack.data_dir
        ports = {name: str(free_port()) for name in PORT_VARS}
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "OPENCLAW_BIN")}
        env.update(ports, SLOPBOX_DATA_DIR=str(home / "data"), **(extra_env or {}))
        out_path = home / "dev.out"
        with out_path.open("w") as out_file:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", "dev", cwd=ROOT, env=env,
                                                        stdout=out_file, stderr=asyncio.subprocess.STDOUT)
        stack = cls(proc=proc, home=home, out_path=out_path, ports=ports, env=env)
        try:
            out = await stack.wait_printed("Slopbox is up.", START_TIMEOUT_S)
            stack.web_url = _printed(out, "Web app")
            stack.api_url = _printed(out, "API")
            stack.proxy_url = _printed(out, "Proxy")
            stack.demo_user_id = _printed(out, "Demo user id")
            stack.api_key = _printed(out, "API key")
            logs = Path(_printed(out, "Logs"))
            stack.mail_log = logs / "mail.log"
            assert _printed(out, "Mail sink") == f"smtp://127.0.0.1:{ports['SLOPBOX_MAIL_SINK_PORT']}", out
        except BaseException:
            await stack.stop()
            raise
        return stack

    async def wait_printed(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text not in (out := self.out_path.read_text()):
            assert self.proc.returncode is None, f"`slopbox dev` exited with {self.proc.returncode}:\n{out}"
            assert time.monotonic() < deadline, f"`slopbox dev` did not print {text!r} in {timeout:g} s:\n{out}"
            await asyncio.sleep(0.3)
        return out

    async def cli(self, *args: str) -> str:
        """`slopbox <args>` as an operator runs it beside `make run`: the same environment as `slopbox dev`
        (so the same embedded PostgreSQL); its output, asserted to exit 0."""
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=self.env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        text = out.decode(errors="replace")
        assert proc.returncode == 0, f"`slopbox {' '.join(args)}` exited with {proc.returncode}:\n{text}"
        return text

    def output(self) -> str:
        return self.out_path.read_text()

    def log(self, service: str, lines: int = 40) -> str:
        """The end of one service's log (for assertion messages)."""
        path = self.home / "data" / "logs" / f"{service}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no {path})"

    def api(self, user_id: str | None = None) -> httpx.AsyncClient:
        """The control-plane API with the printed key, vouching for `user_id` (the demo admin by default)."""
        return httpx.AsyncClient(base_url=self.api_url, timeout=30, headers={
            "Authorization": f"Bearer {self.api_key}", "X-User-Id": user_id or self.demo_user_id})

    async def user_id(self, email: str) -> str:
        """A signed-up user's id, looked up as the printed demo admin would (GET /admin/users)."""
        async with self.api() as admin:
            resp = await admin.get("/admin/users", params={"email": email})
            assert resp.status_code == 200, resp.text
            return str(next(u["id"] for u in resp.json()["items"] if u["email"] == email))

    async def stop(self) -> int | None:
        """SIGTERM, as Ctrl-C: the stack halts its gateways, Temporal and PostgreSQL; then the temp dir goes."""
        try:
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            shutil.rmtree(self.home, ignore_errors=True)
        return self.proc.returncode


def mails_to(mail_log: Path, email: str) -> list[dict[str, Any]]:
    """Every message the sink logged for `email` (one JSON line each: rcpt_to, subject, body)."""
    try:
        lines = mail_log.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if email in (event.get("rcpt_to") or []):
            found.append(event)
    return found


async def verification_link(mail_log: Path, email: str, web_url: str, timeout: float = 30.0) -> str:
    """The link in the newest "Verify your email" message to `email`, as the sink logged it."""
    deadline = time.monotonic() + timeout
    while True:
        for event in reversed(mails_to(mail_log, email)):
            if "Verify your email" in str(event.get("subject")):  # "[Slopbox] Verify your email"
                found = re.search(re.escape(web_url) + r"/verify\?\S+", event.get("body", ""))
                assert found, f"no {web_url}/verify link in the mail: {event}"
                return found.group(0)
        assert time.monotonic() < deadline, f"no verification mail to {email} in {mail_log} after {timeout:g} s"
        await asyncio.sleep(0.3)


class Shots:
    """Numbered full-page screenshots: artifacts/<prefix>-NN-<page>.png (artifacts/ is ignored by git)."""

    def __init__(self, prefix: str = "web-journey") -> None:
        self.prefix = prefix
        self.count = 0
        self.taken: list[Path] = []
        ARTIFACTS.mkdir(exist_ok=True)
        for old in ARTIFACTS.glob(f"{prefix}-[0-9][0-9]-*.png"):  # a failed earlier run's FAILED-* shots mislead
            old.unlink()

    async def take(self, page: Any, name: str) -> Path:
        self.count += 1
        path = ARTIFACTS / f"{self.prefix}-{self.count:02d}-{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        self.taken.append(path)
        return path
