"""Shared fixtures: a real PostgreSQL and a real Temporal dev server, started once per run.

PostgreSQL is `DATABASE_URL` when set, otherwise the embedded server from the wheel on a free
port with its data in a temporary folder. Each test database is migrated once; tests are
isolated by truncating every non-seed table after each test that touched the database.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import pytest_asyncio
from cryptography.fernet import Fernet
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from db.migrate import migrate_and_seed
from devstack import postgres
from devstack.ports import unused_port
from devstack.postgres import EmbeddedPostgres
from devstack.temporal import temporal_cli
from orchestration.search_attributes import SEARCH_ATTRIBUTES
from settings import Settings

API_KEY = "test-api-key-" + "x" * 40
SEED_TABLES = {"plans", "vps_configs", "plan_vps_configs", "alembic_version"}


def free_port() -> int:
    """Below the ephemeral range (devstack/ports.py): a `bind(0)` port could be taken by an outgoing
    connection before the server under test binds it, and a dev stack failed that way."""
    return unused_port()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A server URL (no database part) we may create databases on."""
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external.rsplit("/", 1)[0]
        return
    tmp = Path(tempfile.mkdtemp(prefix="slopbox-test-pg-"))
    pg = EmbeddedPostgres(tmp, free_port())
    proc: subprocess.Popen[bytes] = pg.spawn()
    try:
        pg.wait_ready(proc)
        yield f"postgresql://postgres@127.0.0.1:{pg.port}"
    finally:
        postgres.stop(proc)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def create_database(server: str, name: str) -> str:
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@pytest.fixture(scope="session")
def database_url(pg_server: str) -> str:
    url = create_database(pg_server, f"slopbox_test_{uuid.uuid4().hex[:8]}")
    migrate_and_seed(url.replace("postgresql://", "postgresql+psycopg://", 1))
    return url


@pytest.fixture(scope="session")
def encryption_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture(scope="session")
def temporal_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def settings(database_url: str, encryption_key: str, tmp_path_factory: pytest.TempPathFactory,
             temporal_port: int) -> Settings:
    return Settings(
        database_url=database_url,
        control_plane_api_key=API_KEY,
        encryption_keys=[encryption_key],
        temporal_address=f"127.0.0.1:{temporal_port}",
        temporal_task_queue=f"tq-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path_factory.mktemp("data"),
        # Local VMs run the simulator unless a test opts into the real gateway (OPENCLAW_BIN);
        # no provider credentials leak in from the environment.
        openclaw_bin=None, hcloud_token=None, fly_api_token=None,
        # The test database is a DATABASE_URL, where local VMs are off by default; the suite runs them.
        local_provider=True,
    )


def truncate_user_data(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
        victims = [t for t in tables if t not in SEED_TABLES]
        if victims:
            conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in victims) + " CASCADE")


@pytest.fixture
def db(database_url: str) -> Iterator[str]:
    """The migrated test database; everything but the seeds is wiped after the test."""
    yield database_url
    truncate_user_data(database_url)


@pytest.fixture
def sql(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as conn:
        yield conn


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_env(temporal_port: int) -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        port=temporal_port,
        ui=False,
    ) as env:
        _TEMPORAL.append(env)
        yield env
        _TEMPORAL.clear()


# The dev server this process started, if any (set by `temporal_env`).
_TEMPORAL: list[WorkflowEnvironment] = []


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def no_workflow_outlives_its_test() -> AsyncIterator[None]:
    """Terminate every run a test left running: mostly a VPS's entity run, waiting for its next
    operation (13 of the 51 tests in test_vps_states, test_agent_ops, test_lifecycle_local and
    test_admin_api left one), now and then an operation still in flight. The next test's worker
    shares the task queue, so it would pick those runs up and work on rows the teardown truncated."""
    yield
    if _TEMPORAL:
        await terminate_running_workflows(_TEMPORAL[0].client)


async def terminate_running_workflows(client: Client) -> int:
    """Terminate what the server lists as running; a run that ended meanwhile is not an error."""
    ended = 0
    async for execution in client.list_workflows('ExecutionStatus="Running"'):
        try:
            await client.get_workflow_handle(execution.id, run_id=execution.run_id).terminate(reason="test ended")
            ended += 1
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
    return ended


@pytest_asyncio.fixture(loop_scope="session")
async def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


# The longest modules first (`make test` prints --durations): `make test` hands whole modules to two
# processes in collection order, and one of these starting last kept one process busy alone for minutes
# at the end. Longest-first lets the short ones fill in around them; the real-gateway modules (a Node
# gateway loading three plugins, Chromium) alternate with simulator ones so that they overlap less.
LONGEST_MODULES = ("test_lifecycle_real_gateway.py", "test_faults.py", "test_web_journey.py", "test_vps_states.py",
                   "test_browser_control_ui.py", "test_dev_stack.py", "test_openapi_contract.py", "test_render.py",
                   "test_dev_observability.py", "test_dev_enforcement.py", "test_faults_agent_ops.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (LONGEST_MODULES). `real_gateway` tests need OPENCLAW_BIN
    (scripts/install-openclaw.sh): without it they skip, one place for every module; in CI the tier
    must run, so a missing install is a failure, not a skip."""
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if os.environ.get("OPENCLAW_BIN"):
        return
    real = [item for item in items if item.get_closest_marker("real_gateway")]
    if real and os.environ.get("CI"):
        raise pytest.UsageError("CI is set but OPENCLAW_BIN is not: run scripts/install-openclaw.sh "
                                "(the real-gateway tier must run in CI)")
    skip = pytest.mark.skip(reason="OPENCLAW_BIN not set (real gateway tier): run scripts/install-openclaw.sh "
                                   "and export OPENCLAW_BIN=<the path it prints>")
    for item in real:
        item.add_marker(skip)


@pytest_asyncio.fixture(loop_scope="session")
async def api(settings: Settings, db: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process over ASGI, on the test database (no worker: tests that need one bring it)."""
    from api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield client
