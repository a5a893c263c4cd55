"""The API under bad conditions: its database goes away, clients send huge or malformed bodies."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from api.app import create_app
from db.migrate import migrate_and_seed
from devstack import postgres
from devstack.postgres import EmbeddedPostgres
from settings import Settings
from tests.conftest import free_port
from tests.helpers import headers, make_user

pytestmark = pytest.mark.asyncio(loop_scope="session")



def assert_problem(resp: httpx.Response, status: int) -> dict:  # type: ignore[type-arg]
    assert resp.status_code == status, resp.text[:2000]
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body  # type: ignore[no-any-return]


# --- the database goes down ----------------------------------------------------------------------

class PrivatePostgres:
    """A PostgreSQL of this test's own, so stopping it leaves the shared server alone."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="slopbox-test-pg-down-"))
        self.pg = EmbeddedPostgres(self.dir, free_port())
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.pg.spawn()
        self.pg.wait_ready(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            postgres.stop(self.proc)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        server.pg.ensure_database()
        migrate_and_seed(server.pg.url().replace("postgresql://", "postgresql+psycopg://", 1))
        yield server
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(server.dir)], check=False)


async def test_database_down_is_503_with_retry_after_then_recovers(settings: Settings,
                                                                   private_pg: PrivatePostgres) -> None:
    app = create_app(settings.model_copy(update={"database_url": private_pg.pg.url()}))
    with psycopg.connect(private_pg.pg.url(), autocommit=True) as conn:
        user = make_user(conn)
    hdrs = headers(user)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
            assert (await api.get("/users/me", headers=hdrs)).status_code == 200  # the pool holds a connection

            private_pg.stop()
            down = [
                await api.get("/users/me", headers=hdrs),
                await api.get("/agents", headers=hdrs),
                await api.post("/agents", json={"name": "molty"}, headers=hdrs),
                await api.get("/plans", headers=hdrs),
                await api.put("/users/me/overage-budget", json={"budget_cents": 5}, headers=hdrs),
                await api.get(f"/agents/{uuid.uuid4()}/channels", headers=hdrs),
            ]
            for resp in down:
                body = assert_problem(resp, 503)
                assert int(resp.headers["retry-after"]) > 0
                assert "database is unavailable" in body["detail"] and "nothing was changed" in body["detail"]
                assert body["type"].endswith("/database-unavailable")
            ready = await api.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreachable")

            private_pg.start()
            assert (await api.get("/users/me", headers=hdrs)).status_code == 200
            created = await api.post("/agents", json={"name": "molty"}, headers=hdrs)
            assert created.status_code == 201, created.text
            assert (await api.get("/readyz")).json()["checks"]["database"] == "ok"


# --- request body size ---------------------------------------------------------------------------

async def test_oversize_body_is_413_without_being_read(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    pulled = 0

    async def five_mb() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(80):
            pulled += 64 * 1024
            yield b" " * (64 * 1024)

    resp = await api.put("/users/me/overage-budget", content=five_mb(),
                         headers={**headers(user), "Content-Type": "application/json",
                                  "Content-Length": str(80 * 64 * 1024)})
    body = assert_problem(resp, 413)
    assert "1048576" in body["detail"] and len(resp.content) < 1024
    assert pulled == 0  # answered from the declared length alone
    assert (await api.get("/users/me/overage-budget", headers=headers(user))).json()["budget_cents"] == 0


async def test_chunked_oversize_body_is_413(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    """No Content-Length: the streamed bytes are counted and reading stops past the limit."""
    user = make_user(sql)
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield b'{"name": "' + b"a" * 1000
        for _ in range(200):
            pulled += 64 * 1024
            yield b"a" * (64 * 1024)

    resp = await api.post("/agents", content=endless(), headers={**headers(user), "Content-Type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert_problem(resp, 413)
    assert len(resp.content) < 1024
    assert pulled <= 1024 * 1024 + 64 * 1024  # stopped reading one chunk past the limit
    assert (await api.get("/agents", headers=headers(user))).json()["total"] == 0


async def test_body_at_the_limit_is_read(settings: Settings, db: str, sql: psycopg.Connection) -> None:
    """The limit is a setting; a body under it reaches validation as before."""
    app = create_app(settings.model_copy(update={"max_request_body_bytes": 2048}))
    user = make_user(sql)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
            small = await api.post("/agents", json={"name": "x" * 40}, headers=headers(user))
            assert small.status_code == 201, small.text
            big = await api.post("/agents", json={"name": "x" * 3000}, headers=headers(user))
            assert "2048" in assert_problem(big, 413)["detail"]


async def test_422_for_thousands_of_unknown_keys_is_small(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    payload = {"budget_cents": 5, **{f"unknown_key_{i}": "v" * 50 for i in range(8000)}}
    assert len(json.dumps(payload)) < 1024 * 1024
    resp = await api.put("/users/me/overage-budget", json=payload, headers=headers(user))
    body = assert_problem(resp, 422)
    assert len(resp.content) < 16 * 1024
    assert body["errors_total"] == 8000 and len(body["errors"]) <= 20
    assert body["errors"][0] == {"field": "unknown_key_0", "message": "Extra inputs are not permitted",
                                 "type": "extra_forbidden"}
    assert "unknown_key_0: Extra inputs are not permitted" in body["detail"] and "7980 more" in body["detail"]


# --- schema-valid input is accepted --------------------------------------------------------------

async def test_integral_number_is_an_integer(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    """JSON Schema's integer includes 500.0 (schemathesis sent one); strings and fractions stay refused."""
    user = make_user(sql)
    resp = await api.put("/users/me/overage-budget", content=b'{"budget_cents": 500.0}',
                         headers={**headers(user), "Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.json()["budget_cents"] == 500, resp.text
    for bad in ('"600"', "5.5", "true"):
        resp = await api.put("/users/me/overage-budget", content=f'{{"budget_cents": {bad}}}'.encode(),
                             headers={**headers(user), "Content-Type": "application/json"})
        assert_problem(resp, 422)
    assert (await api.get("/users/me/overage-budget", headers=headers(user))).json()["budget_cents"] == 500


async def test_blank_agent_name_is_refused_by_the_documented_schema(api: httpx.AsyncClient) -> None:
    """The name is stripped, so a whitespace-only one is invalid: the OpenAPI pattern must say so too."""
    spec = (await api.get("/openapi.json")).json()
    pattern = spec["components"]["schemas"]["AgentCreate"]["properties"]["name"]["pattern"]
    assert re.search(pattern, "molty") and re.search(pattern, " molty ")
    assert not re.search(pattern, "   ") and not re.search(pattern, "\u3000\u00a0")


async def test_405_names_every_method_of_the_path(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    """GET and DELETE /agents/{id} are two routes; a 405 must list both, not just the first one's."""
    user = make_user(sql)
    resp = await api.request("PUT", f"/agents/{uuid.uuid4()}", headers=headers(user))
    assert_problem(resp, 405)
    assert set(resp.headers["allow"].split(", ")) == {"GET", "HEAD", "DELETE"}
    resp = await api.request("OPTIONS", "/users/me/overage-budget", headers=headers(user))
    assert_problem(resp, 405)
    assert set(resp.headers["allow"].split(", ")) == {"GET", "HEAD", "PUT"}


async def test_openapi_documents_problem_answers(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    provision = spec["paths"]["/agents/{agent_id}/vps"]["post"]["responses"]
    assert {"202", "400", "401", "403", "404", "409", "413", "422", "503"} <= set(provision)
    assert list(provision["409"]["content"]) == ["application/problem+json"]
    assert provision["503"]["headers"]["Retry-After"]["required"] is True
    assert provision["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/OperationAccepted")
    assert list(provision["422"]["content"]) == ["application/problem+json"]
    assert provision["422"]["content"]["application/problem+json"]["schema"]["$ref"].endswith("/ValidationProblem")


async def test_orchestrator_down_is_503_with_retry_after(settings: Settings, db: str,
                                                         sql: psycopg.Connection) -> None:
    """The lifecycle routes' own 503 (Temporal unreachable) says when to retry too, and changes nothing."""
    app = create_app(settings.model_copy(update={"temporal_address": "127.0.0.1:1"}))
    user = make_user(sql)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
            agent = (await api.post("/agents", json={"name": "molty"}, headers=headers(user))).json()["id"]
            plans = (await api.get("/plans", headers=headers(user))).json()
            config = next(c["id"] for p in plans if p["name"] == "starter" for c in p["vps_configs"]
                          if c["provider"] == "local")
            resp = await api.post(f"/agents/{agent}/vps", json={"vps_config_id": config}, headers=headers(user))
            assert_problem(resp, 503)
            assert int(resp.headers["retry-after"]) > 0
            assert (await api.get(f"/agents/{agent}", headers=headers(user))).json()["vps"] is None


async def test_only_connection_failures_count_as_unavailable() -> None:
    """A deadlock or a statement timeout is a failed query (500, logged), not a database that is down."""
    from psycopg import errors
    from sqlalchemy.exc import OperationalError

    from api.problems import database_unavailable

    refused = psycopg.OperationalError("connection failed: Connection refused")
    assert database_unavailable(OperationalError("SELECT 1", None, refused))
    assert database_unavailable(OperationalError("SELECT 1", None, errors.AdminShutdown()))
    assert database_unavailable(errors.ConnectionFailure())
    assert not database_unavailable(OperationalError("UPDATE", None, errors.DeadlockDetected()))
    assert not database_unavailable(OperationalError("SELECT", None, errors.QueryCanceled()))
