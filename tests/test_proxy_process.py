"""`slopbox proxy` as a process: both listeners come up, SIGTERM stops it cleanly after a flush."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import psycopg
import pytest

from settings import Settings
from tests.conftest import API_KEY, free_port
from tests.proxy_harness import seed_gateway_user

pytestmark = pytest.mark.asyncio(loop_scope="session")

SLOPBOX = Path(sys.executable).parent / "slopbox"


async def test_slopbox_proxy_runs_and_stops_on_sigterm(settings: Settings, sql: psycopg.Connection,
                                                       encryption_key: str, database_url: str) -> None:
    seeded = seed_gateway_user(sql, settings, port=1, state="stopped")
    port, forward_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    env.update(DATABASE_URL=database_url, SLOPBOX_ENCRYPTION_KEYS=encryption_key, CONTROL_PLANE_API_KEY=API_KEY,
               PROXY_HOST="127.0.0.1", PROXY_PORT=str(port), FORWARD_PROXY_PORT=str(forward_port), LOG_LEVEL="INFO")
    proc = await asyncio.create_subprocess_exec(str(SLOPBOX), "proxy", env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("proxy did not come up")
            async with http.get(f"http://127.0.0.1:{port}/agents/{seeded.agent_id}/gateway/",
                                headers=seeded.cookie) as resp:
                assert resp.status == 409  # wired to the database; the VM is stopped and stays so
        with socket.create_connection(("127.0.0.1", forward_port), timeout=5) as s:
            s.sendall(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 407")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-2000:]
        logs = err.decode()
        assert "proxy stopped; usage flushed" in logs
        assert seeded.gateway_token not in logs and seeded.session not in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
