"""A worker killed mid-provisioning: a fresh worker finishes the run, with exactly one VM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from temporalio.client import Client

from settings import Settings
from tests import fault_harness
from tests.helpers import headers, make_user
from tests.lifecycle_harness import running_stack

pytestmark = pytest.mark.asyncio(loop_scope="session")
ROOT = Path(__file__).resolve().parent.parent


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return fault_harness.start_worker(settings, log, env={"SLOPBOX_SIM_READY_AFTER_S": "4"})


async def test_worker_killed_mid_provisioning(settings: Settings, temporal_client: Client, db: str,
                                              sql: psycopg.Connection, tmp_path: Path) -> None:
    async with running_stack(settings, temporal_client, worker=False) as stack:
        user = make_user(sql, plan="starter")
        agent = await stack.new_agent(user)
        first = start_worker(settings, tmp_path / "worker1.log")
        second: subprocess.Popen[bytes] | None = None
        try:
            assert (await stack.provision(user, agent)).status_code == 202
            deadline = time.monotonic() + 60
            while (await stack.agent(user, agent))["vps"]["step"] != "wait_gateway_ready":
                assert time.monotonic() < deadline, (tmp_path / "worker1.log").read_text()[-3000:]
                await asyncio.sleep(0.05)
            first.send_signal(signal.SIGKILL)  # no graceful shutdown, no heartbeat, nothing
            first.wait()
            second = start_worker(settings, tmp_path / "worker2.log")
            vps = await stack.wait_vps(user, agent, "running", "error", timeout=120)
            assert vps["state"] == "running", vps["last_error"]
            vms = [p.name for p in (settings.data_dir / "vms").iterdir() if p.is_dir()]
            assert vms == [vps["id"]]
            managed = await stack.activities.provider("local").list_managed()
            assert [vm.vps_id for vm in managed] == [vps["id"]]
            resp = await stack.api.delete(f"/agents/{agent}/vps", headers=headers(user))
            assert resp.status_code == 202
            await stack.wait_vps(user, agent, "destroyed", timeout=60)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(20)
