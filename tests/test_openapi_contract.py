"""The OpenAPI document tells the truth: schemathesis, with every check, against the running API.

The API is served over real HTTP on loopback by uvicorn inside this process (its event loop also
runs a worker on the real Temporal server, so operations that start a workflow really start
one), and the `schemathesis` CLI runs against it as a client would. The case count is bounded
(`--max-examples`, fixed `--seed`) so the run stays short and reproducible.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send
from temporalio.client import Client

from api.app import create_app
from db.encryption import configure_keys
from db.migrate import migrate_and_seed
from settings import Settings
from tests.conftest import API_KEY, create_database, free_port
from tests.helpers import make_user
from tests.lifecycle_harness import FAST, running_stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_EXAMPLES = 10
SEED = 20261202


# The credentials go in a config file read from the environment, not on a command line `ps` shows.
CONFIG = """
[headers]
Authorization = "Bearer ${SLOPBOX_TEST_API_KEY}"
X-User-Id = "${SLOPBOX_TEST_USER}"
"""


def schemathesis_command(base_url: str, config: Path, report_dir: Path) -> list[str]:
    return [
        str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config),
        "run", f"{base_url}/openapi.json",
        "--checks", "all", "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
        "--request-timeout", "30", "--suppress-health-check", "all", "--warnings", "off",
        "--report-dir", str(report_dir),
    ]


async def run_schemathesis(settings: Settings, temporal_client: Client, user: object, tmp_path: Path,
                           *extra: str) -> tuple[int | None, str, Counter[int]]:
    """The API on loopback (with a worker), schemathesis against it as `user`: exit code, output, statuses."""
    async with running_stack(settings, temporal_client):
        app = create_app(settings)
        app.state.lifecycle_timeouts = FAST
        port = free_port()
        statuses: Counter[int] = Counter()

        async def observed(scope: Scope, receive: Receive, send: Send) -> None:
            async def watch(message: Message) -> None:
                if message["type"] == "http.response.start":
                    statuses[message["status"]] += 1
                await send(message)

            await app(scope, receive, watch)

        server = uvicorn.Server(uvicorn.Config(observed, host="127.0.0.1", port=port, log_level="warning",
                                               lifespan="on"))
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not serving.done(), "uvicorn did not start"
                await asyncio.sleep(0.05)
            config = tmp_path / "schemathesis.toml"
            config.write_text(CONFIG)
            proc = await asyncio.create_subprocess_exec(
                *schemathesis_command(f"http://127.0.0.1:{port}", config, tmp_path / "report"), *extra,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
                env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": "",
                     "SLOPBOX_TEST_API_KEY": API_KEY, "SLOPBOX_TEST_USER": str(user)})
            out, _ = await proc.communicate()
        finally:
            server.should_exit = True
            await serving
    return proc.returncode, out.decode(errors="replace"), statuses


async def test_schemathesis_finds_nothing(settings: Settings, temporal_client: Client, sql: psycopg.Connection,
                                          tmp_path: Path) -> None:
    user = make_user(sql, plan="pro")
    returncode, text, statuses = await run_schemathesis(settings, temporal_client, user, tmp_path)
    assert returncode == 0, text[-20000:]
    # The credentials applied: authenticated requests really got through (201 = agents created).
    assert statuses[200] > 20 and statuses[201] > 0, statuses


async def test_schemathesis_admin_routes(pg_server: str, settings: Settings, temporal_client: Client,
                                         tmp_path: Path) -> None:
    """The admin routes, called by an admin, in a database of their own: they create, change and delete plans
    and VPS configs, which the session's shared seeds must not see."""
    url = create_database(pg_server, f"slopbox_admin_{uuid.uuid4().hex[:8]}")
    migrate_and_seed(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with psycopg.connect(url, autocommit=True) as sql:
        admin = make_user(sql, plan="pro")
        sql.execute("UPDATE users SET is_admin = true WHERE id = %s", (admin,))
        # Another user's VPS for the fleet routes to find (a row only: its stop or destroy fails at the provider).
        owner = make_user(sql, plan="starter")
        config = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
        vps = sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, 'local', "
                          "'running') RETURNING id", (owner, config)).fetchone()[0]  # type: ignore[index]
        sql.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) "
                    "VALUES (%s, 'fleet', %s, 'abcd', %s)",
                    (owner, configure_keys(settings.secret_keys()).encrypt("t" * 64), vps))
    s = settings.model_copy(update={"database_url": url, "temporal_task_queue": f"tq-{uuid.uuid4().hex[:8]}"})
    returncode, text, statuses = await run_schemathesis(s, temporal_client, admin, tmp_path, "--include-tag", "admin")
    assert returncode == 0, text[-20000:]
    assert statuses[200] > 10 and statuses[201] > 0 and statuses[202] > 0, statuses
