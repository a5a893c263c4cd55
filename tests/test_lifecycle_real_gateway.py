"""The local provider running the real OpenClaw gateway: provisioning pairs both identities and pushes config."""

from __future__ import annotations

import os

import psycopg
import pytest
from temporalio.client import Client

from settings import Settings
from tests.helpers import headers, make_user
from tests.lifecycle_harness import FAST, running_stack
from workflows.contracts import LifecycleTimeouts

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.real_gateway]

OPENCLAW_BIN = os.environ.get("OPENCLAW_BIN")


@pytest.mark.skipif(not OPENCLAW_BIN, reason="OPENCLAW_BIN not set (real gateway tier)")
async def test_real_gateway_provision_stop_start_destroy(settings: Settings, temporal_client: Client, db: str,
                                                         sql: psycopg.Connection) -> None:
    real = settings.model_copy(update={"openclaw_bin": OPENCLAW_BIN})
    # The real gateway needs ~10-13 s to be ready on a 2-core machine (reference §5).
    slow = LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 90, "poll_interval_s": 0.5})
    async with running_stack(real, temporal_client, timeouts=slow) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        assert (await stack.provision(user, agent)).status_code == 202
        vps = await stack.wait_vps(user, agent, "running", "error", timeout=180)
        assert vps["state"] == "running", vps["last_error"]
        # Running means both identities connected with their scopes and the config push went through.
        # Over loopback the real gateway authenticates the device by token and issues no device token.
        row = sql.execute("SELECT admin_device_key IS NOT NULL, relay_device_key IS NOT NULL FROM vpses "
                          "WHERE id = %s", (vps["id"],)).fetchone()
        assert row == (True, True)
        workspace = real.data_dir / "vms" / vps["id"] / "state" / "workspace" / "IDENTITY.md"
        assert "molty" in workspace.read_text()
        assert (await stack.api.post(f"/agents/{agent}/vps/stop", headers=headers(user))).status_code == 202
        assert (await stack.wait_vps(user, agent, "stopped", timeout=60))["state"] == "stopped"
        assert (await stack.api.post(f"/agents/{agent}/vps/start", headers=headers(user))).status_code == 202
        assert (await stack.wait_vps(user, agent, "running", "error", timeout=180))["state"] == "running"
        assert (await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))).status_code == 202
        assert (await stack.wait_vps(user, agent, "destroyed", timeout=60))["state"] == "destroyed"
        assert not (real.data_dir / "vms" / vps["id"]).exists()
