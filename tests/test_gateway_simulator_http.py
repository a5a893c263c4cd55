"""The simulator's HTTP surface and its command line (launched exactly like `openclaw gateway run`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.ports import unused_port
from gateway_simulator import run_simulator
from openclaw.device import DeviceIdentity
from openclaw.probe import wait_ready
from openclaw.rpc import GatewayClient

TOKEN = "http-token-0123456789"
CONFIG: dict[str, Any] = {
    "gateway": {
        "mode": "local",
        "auth": {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"},
        "controlUi": {"basePath": "/openclaw"},
    }
}
ENV = {"OPENCLAW_GATEWAY_TOKEN": TOKEN, "HOME": "/nonexistent"}
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    return unused_port()


async def test_probes_tools_invoke_and_control_ui(tmp_path: Path) -> None:
    async with (
        run_simulator(tmp_path / "s", config=CONFIG, env=ENV) as sim,
        httpx.AsyncClient(base_url=sim.http_url) as http,
    ):
        for path in ("/health", "/healthz"):
            response = await http.get(path)
            assert response.status_code == 200 and response.json() == {"ok": True, "status": "live"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["failing"] == []
        started = (await http.get("/startupz")).json()
        assert started["status"] == "started" and started["version"] == "2026.9.6"

        unauthorized = await http.post("/tools/invoke", json={"tool": "sessions_list"})
        assert unauthorized.status_code == 401
        assert unauthorized.json() == {"error": {"message": "Unauthorized", "type": "unauthorized"}}
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        denied = await http.post("/tools/invoke", json={"tool": "exec", "args": {}}, headers=bearer)
        assert denied.status_code == 404
        assert denied.json() == {"ok": False, "error": {"type": "not_found", "message": "Tool not available: exec"}}
        listed = await http.post("/tools/invoke", json={"tool": "sessions_list", "args": {}}, headers=bearer)
        assert listed.status_code == 200 and listed.json()["ok"] is True
        assert listed.json()["result"]["content"][0]["type"] == "text"

        assert (await http.get("/")).status_code == 404  # UI lives under basePath only
        page = await http.get("/openclaw/")
        assert page.status_code == 200 and 'data-openclaw-control-ui-base-path="/openclaw"' in page.text
        assert (
            page.headers["X-Frame-Options"] == "DENY"
            and "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        )
        assert "simulator" in page.text
        assert (await http.get("/openclaw/control-ui-config.json")).status_code == 401
        ui_config = await http.get("/openclaw/control-ui-config.json", headers=bearer)
        assert ui_config.json()["basePath"] == "/openclaw" and ui_config.json()["serverVersion"] == "2026.9.6"

        spoofed = await http.get("/healthz", headers={"X-Forwarded-For": "203.0.113.9"})  # no trustedProxies
        assert spoofed.status_code == 403 and spoofed.json()["error"]["type"] == "proxy_attribution_required"


async def test_readiness_while_starting(tmp_path: Path) -> None:
    async with (
        run_simulator(tmp_path / "s", config=CONFIG, env=ENV, never_ready=True) as sim,
        httpx.AsyncClient(base_url=sim.http_url) as http,
    ):
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert ready.json()["failing"] == ["startup-sidecars"]
        startup = await http.get("/startupz")
        assert startup.status_code == 503 and startup.json()["status"] == "starting"
        assert (await http.get("/healthz")).status_code == 200  # live, just not ready


async def test_seeded_paired_json_is_imported_like_the_real_gateway(tmp_path: Path) -> None:
    """Reference §6.2: devices/paired.json with tokens.operator, written before the first start."""
    identity = DeviceIdentity.generate()
    seeded_token = "seeded-device-token-0123456789abcdef"
    scopes = ["operator.admin", "operator.approvals", "operator.pairing", "operator.read", "operator.write"]
    state = tmp_path / "state"
    (state / "devices").mkdir(parents=True)
    record = {
        "deviceId": identity.device_id,
        "publicKey": identity.public_key_b64url,
        "displayName": "control-plane",
        "platform": "linux",
        "clientId": "gateway-client",
        "clientMode": "backend",
        "role": "operator",
        "roles": ["operator"],
        "scopes": scopes,
        "approvedScopes": scopes,
        "tokens": {"operator": {"token": seeded_token, "role": "operator", "scopes": scopes, "createdAtMs": 1}},
        "approvedVia": "owner",
        "createdAtMs": 1,
        "approvedAtMs": 1,
    }
    (state / "devices" / "paired.json").write_text(json.dumps({identity.device_id: record}))
    config = {**CONFIG, "gateway": {**CONFIG["gateway"], "trustedProxies": ["127.0.0.1"]}}
    async with run_simulator(state, config=config, env=ENV) as sim:
        remote = {"X-Forwarded-For": "203.0.113.7"}
        async with GatewayClient(sim.url, device_token=seeded_token, device=identity, headers=remote) as gw:
            assert gw.hello.auth_method == "device-token" and gw.hello.device_token == seeded_token
            assert (await gw.config_get())["exists"] is True
    assert (state / "devices" / "paired.json.migrated").exists()


async def _spawn(
    tmp_path: Path,
    port: int,
    *extra: str,
    config: dict[str, Any] | None = CONFIG,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    state = tmp_path / "state"
    state.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (state / "openclaw.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "OPENCLAW_STATE_DIR": str(state),
        "OPENCLAW_CONFIG_PATH": str(state / "openclaw.json"),
        "OPENCLAW_GATEWAY_TOKEN": TOKEN,
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_simulator",
        "gateway",
        "run",
        "--port",
        str(port),
        "--bind",
        "loopback",
        *extra,
        env=env,
        cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_cli_runs_like_openclaw_gateway_run(tmp_path: Path) -> None:
    port = free_port()
    proc = await _spawn(tmp_path, port)
    try:
        body = await wait_ready(f"http://127.0.0.1:{port}", timeout=20)
        assert body["ready"] is True
        async with GatewayClient(f"ws://127.0.0.1:{port}/", token=TOKEN) as gw:
            cfg = await gw.config_get()
            assert cfg["path"] == str(tmp_path / "state" / "openclaw.json")
            await gw.agents_files_set("main", "SOUL.md", "persisted\n")
        assert (tmp_path / "state" / "workspace" / "SOUL.md").read_text() == "persisted\n"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("config", "extra", "needle"),
    [
        ({"gateway": {"mode": "local", "controlUi": {"allowInsecureAuth": True}}}, (), "Unrecognized key"),
        ({"gateway": {"bind": "loopback"}}, (), "gateway.mode"),
        (None, (), "--allow-unconfigured"),
        ({"gateway": {"mode": "local", "auth": {"token": "${MISSING_VAR_FOR_TEST}"}}}, (), "MISSING_VAR_FOR_TEST"),
    ],
)
async def test_cli_refuses_bad_config_with_exit_78(
    tmp_path: Path, config: dict[str, Any] | None, extra: tuple[str, ...], needle: str
) -> None:
    proc = await _spawn(tmp_path, free_port(), *extra, config=config)
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 78
    assert needle in stderr.decode()


async def test_cli_allow_unconfigured_starts_without_a_config_file(tmp_path: Path) -> None:
    port = free_port()
    proc = await _spawn(tmp_path, port, "--allow-unconfigured", config=None)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", timeout=20)
        async with GatewayClient(f"ws://127.0.0.1:{port}/", token=TOKEN) as gw:
            assert (await gw.config_get())["exists"] is False
            created = await gw.config_apply({"gateway": {"mode": "local"}})  # no file yet: no hash needed
            assert created["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


async def test_cli_sigusr2_restarts_in_process_and_env_knobs_apply(tmp_path: Path) -> None:
    port = free_port()
    proc = await _spawn(tmp_path / "a", port)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", timeout=20)
        async with GatewayClient(f"ws://127.0.0.1:{port}/", token=TOKEN, backoff_initial=0.1) as gw:
            boot = gw.hello.server["bootId"]
            with gw.subscribe("shutdown") as shutdown:
                proc.send_signal(signal.SIGUSR2)
                assert (await shutdown.get(timeout=20)).payload["reason"] == "gateway restarting"
            assert (await gw.health())["ok"] is True  # held until the reconnect, then answered
            assert gw.reconnect_count == 1 and gw.hello.server["bootId"] != boot
            assert proc.returncode is None  # same process, like the real in-process restart
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)

    port = free_port()
    stuck = await _spawn(tmp_path / "b", port, env={"SLOPBOX_SIM_NEVER_READY": "1"})
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                try:
                    response = await http.get(f"http://127.0.0.1:{port}/readyz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            assert response.status_code == 503 and response.json()["failing"] == ["startup-sidecars"]
    finally:
        stuck.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(stuck.wait(), 20) == 0


async def test_scan_hook_links_whatsapp_and_the_link_survives_a_restart(tmp_path: Path) -> None:
    knobs = {"restart_drain_s": 0.05, "restart_down_s": 0.1, "restart_startup_s": 0.05, "restart_cooldown_s": 0}
    config = {**CONFIG, "plugins": {"entries": {"whatsapp": {"enabled": True}}}}  # installed and enabled
    async with run_simulator(tmp_path / "s", config=config, env=ENV, whatsapp_plugin=True, **knobs) as sim:
        async with GatewayClient(sim.url, token=TOKEN, backoff_initial=0.05) as gw, httpx.AsyncClient() as http:
            start = await gw.web_login_start()
            scan_url = f"{sim.http_url}/__simulator__/whatsapp/scan"
            assert (await http.post(scan_url)).status_code == 401  # needs the gateway token
            scanned = await http.post(scan_url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert scanned.json() == {"ok": True}
            done = await gw.web_login_wait(current_qr_data_url=start["qrDataUrl"], timeout_ms=5000)
            assert done["connected"] is True
            assert (sim.state_dir / "credentials" / "whatsapp" / "default" / "creds.json").exists()
            with gw.subscribe("shutdown") as shutdown:
                restart = await http.post(
                    f"{sim.http_url}/__simulator__/restart", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                assert restart.json()["signal"] == "SIGUSR2"
                await shutdown.get(timeout=10)
            status = await gw.channels_status(channel="whatsapp")
            assert status["channels"]["whatsapp"]["linked"] is True and gw.reconnect_count == 1
