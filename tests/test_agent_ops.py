"""Settings push, restart and channels on a running agent (local VPS, gateway simulator)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio
from temporalio.client import Client

from settings import Settings
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, Stack, operation_outcome, running_stack
from workflows.contracts import LifecycleTimeouts

pytestmark = pytest.mark.asyncio(loop_scope="session")
TELEGRAM = "123456789:AAH" + "x" * 32


@pytest_asyncio.fixture(loop_scope="session")
async def stack(settings: Settings, temporal_client: Client, db: str) -> AsyncIterator[Stack]:
    async with running_stack(settings, temporal_client) as s:
        yield s


async def running_agent(stack: Stack, sql: psycopg.Connection) -> tuple[Any, str, dict[str, Any]]:
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    assert (await stack.provision(user, agent)).status_code == 202
    vps = await stack.wait_vps(user, agent, "running", "error")
    assert vps["state"] == "running", vps["last_error"]
    return user, agent, vps


def state_dir(stack: Stack, vps: dict[str, Any]) -> Any:
    return stack.settings.data_dir / "vms" / vps["id"] / "state"


async def operation_result(stack: Stack, operation_id: str) -> dict[str, Any]:
    return await operation_outcome(stack.client, operation_id)


async def test_settings_are_pushed_to_the_running_gateway(stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, vps = await running_agent(stack, sql)
    body = {"files": {"SOUL.md": "# Soul\nAlways answer in haiku.\n"}, "model": "openai/gpt-6-astra"}
    resp = await stack.api.patch(f"/agents/{agent}/settings", json=body, headers=headers(user))
    assert resp.status_code == 202, resp.text
    assert resp.json()["operation"] == "PushConfig"
    result = await operation_result(stack, resp.json()["operation_id"])
    assert result["error"] is None
    state = state_dir(stack, vps)
    assert (state / "workspace" / "SOUL.md").read_text() == "# Soul\nAlways answer in haiku.\n"
    config = json.loads((state / "openclaw.json").read_text())
    assert config["agents"]["defaults"]["model"]["primary"] == "openai/gpt-6-astra"
    assert config["agents"]["defaults"]["sandbox"]["mode"] == "all"  # still locked down
    assert (await stack.agent(user, agent))["model"] == "openai/gpt-6-astra"


async def test_saving_unchanged_settings_pushes_nothing_unless_the_gateway_lacks_them(
        stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, vps = await running_agent(stack, sql)
    body = {"files": {"SOUL.md": "# Soul\nTerse.\n"}, "model": "openai/gpt-6-astra"}
    first = await stack.api.patch(f"/agents/{agent}/settings", json=body, headers=headers(user))
    assert first.status_code == 202, first.text
    assert (await operation_result(stack, first.json()["operation_id"]))["error"] is None
    version = (await stack.agent(user, agent))["settings"]["saved_version"]
    pushes = "SELECT count(*) FROM vps_operations WHERE vps_id = %s AND kind = 'settings'"
    assert sql.execute(pushes, (vps["id"],)).fetchone() == (1,)

    # The same form saved again (the model alone, or everything): no new version, no restart of the agent.
    for again in (body, {"model": "openai/gpt-6-astra"}, {"files": {"SOUL.md": "# Soul\nTerse.\n"}}):
        resp = await stack.api.patch(f"/agents/{agent}/settings", json=again, headers=headers(user))
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"saved": True, "unchanged": True, "applied": "nothing changed",
                               "settings_version": version}
    assert sql.execute(pushes, (vps["id"],)).fetchone() == (1,)
    assert (await stack.agent(user, agent))["settings"] == {"saved_version": version, "applied_version": version,
                                                            "in_sync": True}

    # A gateway that does not hold the saved version (its last push failed): the same save pushes again.
    sql.execute("UPDATE vpses SET applied_settings_version = %s WHERE id = %s", (version - 1, vps["id"]))
    retry = await stack.api.patch(f"/agents/{agent}/settings", json=body, headers=headers(user))
    assert retry.status_code == 202, retry.text
    assert (await operation_result(stack, retry.json()["operation_id"]))["error"] is None
    assert (await stack.agent(user, agent))["settings"] == {"saved_version": version, "applied_version": version,
                                                            "in_sync": True}


@pytest.mark.parametrize("body", [{}, {"files": {"TOOLS.md": "x"}}, {"sandbox": {"mode": "off"}},
                                  {"files": {"SOUL.md": "x" * 70_000}}, {"model": "not a model"},
                                  {"files": {"SOUL.md": "a\x00b"}}])
async def test_settings_refuse_anything_else(stack: Stack, sql: psycopg.Connection, body: dict) -> None:  # type: ignore[type-arg]
    user = make_user(sql)
    agent = await stack.new_agent(user)
    resp = await stack.api.patch(f"/agents/{agent}/settings", json=body, headers=headers(user))
    assert resp.status_code == 422, resp.text
    assert sql.execute("SELECT personality, model FROM agents WHERE id = %s", (agent,)).fetchone() == ({}, None)


async def test_settings_on_a_stopped_agent_apply_at_start(stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, vps = await running_agent(stack, sql)
    await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))
    await stack.wait_vps(user, agent, "stopped")
    resp = await stack.api.patch(f"/agents/{agent}/settings", json={"files": {"IDENTITY.md": "name: Nova\n"}},
                                 headers=headers(user))
    assert resp.status_code == 200 and resp.json()["saved"] is True
    for path in (f"/agents/{agent}/restart",):
        r = await stack.api.post(path, headers=headers(user))
        assert r.status_code == 409 and r.json()["vps_state"] == "stopped"
    r = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "telegram",
                             "credentials": {"bot_token": TELEGRAM}}, headers=headers(user))
    assert r.status_code == 409 and "start it first" in r.json()["detail"]
    await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))
    await stack.wait_vps(user, agent, "running")
    assert (state_dir(stack, vps) / "workspace" / "IDENTITY.md").read_text() == "name: Nova\n"


async def test_restart_brings_the_gateway_back(stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, _ = await running_agent(stack, sql)
    resp = await stack.api.post(f"/agents/{agent}/restart", headers=headers(user))
    assert resp.status_code == 202, resp.text
    result = await operation_result(stack, resp.json()["operation_id"])
    assert result["error"] is None and result["status"] == "succeeded"
    assert (await stack.agent(user, agent))["vps"]["state"] == "running"


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"kind": "telegram", "credentials": {"bot_token": "nope"}}, "Telegram bot token looks like"),
    ({"kind": "telegram", "credentials": {}}, "bot_token is required"),
    ({"kind": "slack", "credentials": {"bot_token": "xoxb-" + "a" * 30}}, "app_token is required"),
    ({"kind": "discord", "credentials": {"bot_token": "abc"}}, "three dot-separated parts"),
    ({"kind": "telegram", "credentials": {"bot_token": TELEGRAM, "x": "y"}}, "unexpected credentials"),
    ({"kind": "myspace", "credentials": {}}, "Input should be"),
])
async def test_bad_channel_credentials_are_422_and_store_nothing(stack: Stack, sql: psycopg.Connection,
                                                                 payload: dict, fragment: str) -> None:  # type: ignore[type-arg]
    user = make_user(sql)
    agent = await stack.new_agent(user)
    resp = await stack.api.post(f"/agents/{agent}/channels", json=payload, headers=headers(user))
    assert resp.status_code == 422 and fragment in resp.json()["detail"], resp.text
    assert sql.execute("SELECT count(*) FROM agent_channels").fetchone() == (0,)


async def test_telegram_connect_and_disconnect(stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, vps = await running_agent(stack, sql)
    resp = await stack.api.post(f"/agents/{agent}/channels",
                                json={"kind": "telegram", "credentials": {"bot_token": TELEGRAM}},
                                headers=headers(user))
    assert resp.status_code == 202, resp.text
    await operation_result(stack, resp.json()["operation_id"])
    listed = (await stack.api.get(f"/agents/{agent}/channels", headers=headers(user))).json()["items"]
    assert listed[0]["kind"] == "telegram"
    # No network here: the gateway accepts the bot but cannot reach Telegram, so it is configured, not connected.
    assert listed[0]["status"] == "configured" and listed[0]["live_status"]["configured"] is True
    assert listed[0]["last_error"] is None
    # What the gateway's default account says (the channel summary has no `connected`).
    assert listed[0]["live_status"]["tokenStatus"] == "available"
    assert listed[0]["live_status"]["running"] is True and listed[0]["live_status"]["connected"] is False
    assert listed[0]["credentials"] == {"bot_token": "…" + TELEGRAM[-4:]}
    assert TELEGRAM not in json.dumps(listed)
    stored = sql.execute("SELECT credentials FROM agent_channels").fetchone()[0]  # type: ignore[index]
    assert TELEGRAM not in stored
    config = json.loads((state_dir(stack, vps) / "openclaw.json").read_text())
    assert config["channels"]["telegram"]["botToken"] == TELEGRAM
    again = await stack.api.post(f"/agents/{agent}/channels",
                                 json={"kind": "telegram", "credentials": {"bot_token": TELEGRAM}},
                                 headers=headers(user))
    assert again.status_code == 409

    resp = await stack.api.delete(f"/agents/{agent}/channels/telegram", headers=headers(user))
    assert resp.status_code == 202, resp.text
    await operation_result(stack, resp.json()["operation_id"])
    assert (await stack.api.get(f"/agents/{agent}/channels", headers=headers(user))).json()["items"] == []
    config = json.loads((state_dir(stack, vps) / "openclaw.json").read_text())
    assert "telegram" not in (config.get("channels") or {})
    missing = await stack.api.delete(f"/agents/{agent}/channels/telegram", headers=headers(user))
    assert missing.status_code == 404


async def test_a_gateway_that_dies_while_it_reloads_a_channel_fails_the_change_at_once(
        settings: Settings, temporal_client: Client, db: str, sql: psycopg.Connection,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway answers a channel change only after reloading the channel (seconds to minutes on a
    loaded machine), and dies during that reload. The write's answer is lost; without asking the
    provider, the read-back would wait the whole budget (here 5 minutes) for a gateway that cannot
    come back. The provider says the VM's process is gone, and the change fails with that reason."""
    monkeypatch.setenv("SLOPBOX_SIM_CHANNEL_RELOAD_S", "600")  # the reload outlasts the test
    patient = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 300})
    async with running_stack(settings, temporal_client, timeouts=patient) as stack:
        user, agent, vps = await running_agent(stack, sql)
        resp = await stack.api.post(f"/agents/{agent}/channels",
                                    json={"kind": "telegram", "credentials": {"bot_token": TELEGRAM}},
                                    headers=headers(user))
        assert resp.status_code == 202, resp.text
        config = state_dir(stack, vps) / "openclaw.json"
        deadline = time.monotonic() + 60
        while "botToken" not in config.read_text():  # written: the gateway now reloads before it answers
            assert time.monotonic() < deadline, "the channel change never reached the gateway"
            await asyncio.sleep(0.1)
        os.killpg(int(json.loads((config.parent.parent / "gateway.pid").read_text())["pid"]), signal.SIGKILL)
        op_url = resp.json()["status_url"]
        deadline = time.monotonic() + 120
        while (op := (await stack.api.get(op_url, headers=headers(user))).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, op
            await asyncio.sleep(0.2)
        assert op["status"] == "failed", op
        assert "the gateway's VM is not running: the local VM's state is error (the gateway process exited" \
            in op["error"], op
        channel = (await stack.api.get(f"/agents/{agent}/channels", headers=headers(user))).json()["items"][0]
        assert channel["status"] == "error" and "VM is not running" in channel["last_error"], channel


async def test_a_channel_the_gateway_does_not_run_is_an_error_not_configured(stack: Stack,
                                                                             sql: psycopg.Connection) -> None:
    """Discord is not bundled with the gateway: its config is written, but nothing runs it, and that is said."""
    user, agent, vps = await running_agent(stack, sql)
    token = "M" * 24 + "." + "G" * 6 + "." + "z" * 27
    resp = await stack.api.post(f"/agents/{agent}/channels", headers=headers(user),
                                json={"kind": "discord", "credentials": {"bot_token": token}})
    assert resp.status_code == 202, resp.text
    result = await operation_result(stack, resp.json()["operation_id"])
    assert result["status"] == "failed" and "discord plugin is not installed" in result["error"], result
    listed = (await stack.api.get(f"/agents/{agent}/channels", headers=headers(user))).json()["items"]
    assert listed[0]["status"] == "error" and "discord plugin is not installed" in listed[0]["last_error"]
    assert listed[0]["live_status"] is None  # the gateway said nothing about it
    # Removable like any other.
    resp = await stack.api.delete(f"/agents/{agent}/channels/discord", headers=headers(user))
    assert (await operation_result(stack, resp.json()["operation_id"]))["error"] is None
    assert "discord" not in (json.loads((state_dir(stack, vps) / "openclaw.json").read_text()).get("channels") or {})


async def test_discord_and_slack_run_by_their_installed_plugins_end_as_the_gateway_says(
        stack: Stack, sql: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the external plugins installed (as on the VM image), connecting enables the channel's plugin;
    offline, Discord ends in `error` with the gateway's reason and Slack, still retrying, `configured`."""
    monkeypatch.setenv("SLOPBOX_SIM_CHANNEL_PLUGINS", "discord,slack")
    user, agent, vps = await running_agent(stack, sql)
    for kind, creds in [("discord", {"bot_token": "M" * 24 + "." + "G" * 6 + "." + "z" * 27}),
                        ("slack", {"bot_token": "xoxb-" + "1" * 30, "app_token": "xapp-" + "1" * 30})]:
        resp = await stack.api.post(f"/agents/{agent}/channels", headers=headers(user),
                                    json={"kind": kind, "credentials": creds})
        await operation_result(stack, resp.json()["operation_id"])
        config = json.loads((state_dir(stack, vps) / "openclaw.json").read_text())
        assert config["plugins"]["entries"][kind] == {"enabled": True} and kind in config["channels"]
    listed = {c["kind"]: c for c in (await stack.api.get(f"/agents/{agent}/channels",
                                                         headers=headers(user))).json()["items"]}
    assert listed["discord"]["status"] == "error" and "Failed to resolve Discord application id" in listed[
        "discord"]["last_error"] and "not installed" not in listed["discord"]["last_error"]
    assert listed["slack"]["status"] == "configured" and listed["slack"]["live_status"]["running"] is True
    resp = await stack.api.delete(f"/agents/{agent}/channels/discord", headers=headers(user))
    assert (await operation_result(stack, resp.json()["operation_id"]))["error"] is None
    config = json.loads((state_dir(stack, vps) / "openclaw.json").read_text())
    assert "discord" not in config["channels"] and "discord" not in config["plugins"]["entries"]
    assert config["plugins"]["entries"]["slack"] == {"enabled": True}


async def test_whatsapp_without_the_plugin_is_a_clear_error(stack: Stack, sql: psycopg.Connection) -> None:
    user, agent, _ = await running_agent(stack, sql)
    resp = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "whatsapp"}, headers=headers(user))
    assert resp.status_code == 202, resp.text
    result = await operation_result(stack, resp.json()["operation_id"])
    assert "plugin is not installed" in result["error"]
    qr = (await stack.api.get(f"/agents/{agent}/channels/whatsapp/qr", headers=headers(user))).json()
    assert qr["status"] == "error" and qr["qr_data_url"] is None and "plugin" in qr["last_error"]


async def wait_qr(stack: Stack, user: Any, agent: str, after: int | None = None) -> dict[str, Any]:
    params = {"after": after, "wait": 10} if after is not None else {}
    deadline = time.monotonic() + 30
    while True:
        qr = (await stack.api.get(f"/agents/{agent}/channels/whatsapp/qr", params=params,
                                  headers=headers(user))).json()
        if qr.get("status") not in ("pending", "connecting") or time.monotonic() > deadline:
            return qr  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)


async def test_whatsapp_qr_rotates_and_pairs(stack: Stack, sql: psycopg.Connection,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOPBOX_SIM_WHATSAPP", "1")
    monkeypatch.setenv("SLOPBOX_SIM_QR_ROTATE_S", "1")
    user, agent, vps = await running_agent(stack, sql)
    resp = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "whatsapp"}, headers=headers(user))
    assert resp.status_code == 202, resp.text
    first = await wait_qr(stack, user, agent)
    assert first["status"] == "awaiting_scan" and first["qr_data_url"].startswith("data:image/png;base64,")
    rotated = await wait_qr(stack, user, agent, after=first["version"])  # long-poll for the next QR
    assert rotated["version"] > first["version"] and rotated["qr_data_url"] != first["qr_data_url"]
    # A pairing in progress blocks nothing: another channel connects meanwhile (it used to be a 409)...
    other = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "telegram",
                                 "credentials": {"bot_token": TELEGRAM}}, headers=headers(user))
    assert other.status_code == 202, other.text
    assert (await operation_result(stack, other.json()["operation_id"]))["status"] == "succeeded"
    # ...but a second pairing is refused, naming the one in progress.
    second = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "whatsapp"}, headers=headers(user))
    assert second.status_code == 409, second.text
    # The phone scans the code (the simulator's test hook, on loopback with the gateway token).
    token = sql.execute("SELECT gateway_token FROM agents WHERE id = %s", (agent,)).fetchone()[0]  # type: ignore[index]
    from db.encryption import keyring
    port = sql.execute("SELECT gateway_port FROM vpses WHERE id = %s", (vps["id"],)).fetchone()[0]  # type: ignore[index]
    async with httpx.AsyncClient() as http:
        scan = await http.post(f"http://127.0.0.1:{port}/__simulator__/whatsapp/scan",
                               headers={"Authorization": f"Bearer {keyring().decrypt(token)}"})
        assert scan.json() == {"ok": True}
    result = await operation_result(stack, resp.json()["operation_id"])
    assert result["error"] is None
    done = (await stack.api.get(f"/agents/{agent}/channels/whatsapp/qr", headers=headers(user))).json()
    assert done["status"] == "connected" and done["qr_data_url"] is None
    # Removing it logs the linked phone out first: no WhatsApp session is left on the VM's disk.
    creds = state_dir(stack, vps) / "credentials" / "whatsapp" / "default" / "creds.json"
    assert creds.exists()
    resp = await stack.api.delete(f"/agents/{agent}/channels/whatsapp", headers=headers(user))
    assert (await operation_result(stack, resp.json()["operation_id"]))["error"] is None
    assert not creds.exists()
    config = json.loads((state_dir(stack, vps) / "openclaw.json").read_text())
    assert "whatsapp" not in (config.get("channels") or {}) and "whatsapp" not in config["plugins"]["entries"]


async def test_whatsapp_pairing_can_be_cancelled(stack: Stack, sql: psycopg.Connection,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOPBOX_SIM_WHATSAPP", "1")
    user, agent, _ = await running_agent(stack, sql)
    resp = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "whatsapp"}, headers=headers(user))
    assert (await wait_qr(stack, user, agent))["status"] == "awaiting_scan"
    cancel = await stack.api.delete(f"/agents/{agent}/channels/whatsapp", headers=headers(user))
    assert cancel.status_code == 202 and cancel.json()["status"] == "cancelling"
    cancelled = await operation_result(stack, resp.json()["operation_id"])
    assert cancelled["status"] == "cancelled" and cancelled["error"] == "pairing cancelled"
    deadline = time.monotonic() + 20
    while (await wait_qr(stack, user, agent))["status"] != "cancelled":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    vps = await stack.wait_vps(user, agent, "running")
    assert vps["operation_id"] is None and vps["last_operation"]["status"] == "cancelled"


async def test_stop_and_destroy_do_not_wait_for_a_whatsapp_pairing(stack: Stack, sql: psycopg.Connection,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A pairing waits minutes for a scan; stopping the agent cancels it instead of waiting (or a 409)."""
    monkeypatch.setenv("SLOPBOX_SIM_WHATSAPP", "1")
    user, agent, _ = await running_agent(stack, sql)
    pairing = await stack.api.post(f"/agents/{agent}/channels", json={"kind": "whatsapp"}, headers=headers(user))
    assert (await wait_qr(stack, user, agent))["status"] == "awaiting_scan"
    stop = await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))
    assert stop.status_code == 202, stop.text
    assert (await stack.wait_vps(user, agent, "stopped", timeout=30))["state"] == "stopped"
    assert (await operation_result(stack, pairing.json()["operation_id"]))["status"] == "cancelled"
    assert (await wait_qr(stack, user, agent))["status"] == "cancelled"
    assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
    await stack.wait_vps(user, agent, "destroyed")
