"""The API skeleton as a frontend sees it: auth, users, plans, budgets, agents."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from api.app import create_app
from settings import Settings
from tests.helpers import headers, make_user

pytestmark = pytest.mark.asyncio(loop_scope="session")



def assert_problem(resp: httpx.Response, status: int) -> dict:  # type: ignore[type-arg]
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body  # type: ignore[no-any-return]


# --- probes --------------------------------------------------------------------------------------

async def test_healthz_needs_no_auth(api: httpx.AsyncClient) -> None:
    resp = await api.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    assert resp.headers["x-request-id"]


async def test_readyz_reports_each_dependency(api: httpx.AsyncClient, temporal_env: object) -> None:
    resp = await api.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json()["checks"] == {"database": "ok", "temporal": "ok"}


async def test_readyz_is_503_when_temporal_is_unreachable(settings: Settings, db: str) -> None:
    dead = settings.model_copy(update={"temporal_address": "127.0.0.1:1"})
    app = create_app(dead)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            resp = await client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["database"] == "ok"
    assert resp.json()["checks"]["temporal"].startswith("unreachable")


async def test_openapi_is_served(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert "/agents/{agent_id}" in spec["paths"] and "/users/me/overage-budget" in spec["paths"]


# --- BFF auth ------------------------------------------------------------------------------------

async def test_no_key_is_401_problem(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    body = assert_problem(await api.get("/users/me", headers={"X-User-Id": str(user)}), 401)
    assert "Authorization" in body["detail"]


async def test_wrong_key_is_401(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    body = assert_problem(await api.get("/users/me", headers=headers(user, key="nope" * 12)), 401)
    assert body["detail"] == "Invalid API key"


async def test_unknown_user_is_401(api: httpx.AsyncClient) -> None:
    body = assert_problem(await api.get("/users/me", headers=headers(uuid.uuid4())), 401)
    assert "existing user" in body["detail"]


async def test_malformed_user_id_is_401(api: httpx.AsyncClient) -> None:
    body = assert_problem(await api.get("/users/me", headers=headers("1 OR 1=1")), 401)
    assert "UUID" in body["detail"]


async def test_missing_user_id_is_401(api: httpx.AsyncClient) -> None:
    resp = await api.get("/agents", headers={"Authorization": headers(uuid.uuid4())["Authorization"]})
    assert "X-User-Id" in assert_problem(resp, 401)["detail"]


# --- users and plans -----------------------------------------------------------------------------

async def test_me_returns_user_and_plan(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="pro", email="ada@example.com")
    body = (await api.get("/users/me", headers=headers(user))).json()
    assert body["id"] == str(user) and body["email"] == "ada@example.com"
    assert body["plan"]["name"] == "pro" and body["plan"]["max_agents"] == 10


async def test_user_without_plan_gets_the_default_plan(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan=None)
    assert (await api.get("/users/me", headers=headers(user))).json()["plan"]["name"] == "free"


@asynccontextmanager
async def api_with(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            yield client


async def test_plans_list_their_vps_configs(settings: Settings, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    clouds = settings.model_copy(update={"hcloud_token": SecretStr("h" * 20), "fly_api_token": SecretStr("f" * 20)})
    async with api_with(clouds) as api:
        plans = {p["name"]: p for p in (await api.get("/plans", headers=headers(user))).json()}
        me = (await api.get("/users/me", headers=headers(user))).json()
    assert set(plans) == {"free", "starter", "pro"}
    providers = {c["provider"] for c in plans["pro"]["vps_configs"]}
    assert providers == {"hetzner", "fly", "local"}
    assert all(uuid.UUID(c["id"]) for c in plans["free"]["vps_configs"])
    assert me["plan"]["vps_configs"] == plans["starter"]["vps_configs"]


async def test_plans_need_the_key_but_no_user(api: httpx.AsyncClient) -> None:
    """A landing page shows pricing to visitors: the frontend's key is enough, nothing else is."""
    key = {"Authorization": headers(uuid.uuid4())["Authorization"]}
    visitor = await api.get("/plans", headers=key)
    assert visitor.status_code == 200 and {p["name"] for p in visitor.json()} == {"free", "starter", "pro"}
    assert (await api.get("/plans")).status_code == 401
    assert (await api.get("/plans", headers={"Authorization": "Bearer wrong"})).status_code == 401
    assert (await api.get("/users/me", headers=key)).status_code == 401  # everything else still needs a user


async def test_plans_offer_only_configured_providers(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    """No cloud token here: their configs are not offered (provisioning one would be refused)."""
    user = make_user(sql, plan="pro")
    plans = (await api.get("/plans", headers=headers(user))).json()
    assert {c["provider"] for p in plans for c in p["vps_configs"]} == {"local"}
    me = (await api.get("/users/me", headers=headers(user))).json()
    assert [c["provider"] for c in me["plan"]["vps_configs"]] == ["local"]


async def test_no_local_vms_with_a_database_url(settings: Settings, sql: psycopg.Connection) -> None:
    """DATABASE_URL set and SLOPBOX_LOCAL_PROVIDER unset: a worker host is no place for agent gateways."""
    prod = Settings(database_url=settings.database_url, control_plane_api_key=settings.control_plane_api_key,
                    encryption_keys=settings.encryption_keys, temporal_address=settings.temporal_address,
                    hcloud_token="h" * 20, _env_file=None)  # type: ignore[call-arg]
    assert prod.local_provider is None and not prod.local_provider_enabled
    user = make_user(sql, plan="pro")
    local_config = str(sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0])  # type: ignore[index]
    async with api_with(prod) as api:
        plans = (await api.get("/plans", headers=headers(user))).json()
        assert {c["provider"] for p in plans for c in p["vps_configs"]} == {"hetzner"}
        agent = (await api.post("/agents", json={"name": "prod"}, headers=headers(user))).json()["id"]
        resp = await api.post(f"/agents/{agent}/vps", json={"vps_config_id": local_config}, headers=headers(user))
    body = assert_problem(resp, 409)
    assert body["provider"] == "local" and "not configured" in body["detail"]
    assert sql.execute("SELECT count(*) FROM vpses").fetchone() == (0,)


async def test_blank_provider_tokens_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HCLOUD_TOKEN", "")
    monkeypatch.setenv("FLY_API_TOKEN", "  ")
    monkeypatch.setenv("SLOPBOX_LOCAL_PROVIDER", "")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    embedded = Settings()
    assert embedded.hcloud_token is None and embedded.fly_api_token is None
    assert embedded.configured_providers() == ["local"]
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.example/slopbox")
    assert Settings().configured_providers() == []
    monkeypatch.setenv("HCLOUD_TOKEN", "h" * 20)
    monkeypatch.setenv("SLOPBOX_LOCAL_PROVIDER", "1")
    assert Settings().configured_providers() == ["local", "hetzner"]


async def test_seed_leaves_out_local_configs_without_the_local_provider(pg_server: str) -> None:
    from sqlalchemy import create_engine, text

    from db.migrate import migrate_and_seed
    from tests.conftest import create_database

    name = f"slopbox_seed_{uuid.uuid4().hex[:8]}"
    url = create_database(pg_server, name).replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url)
    try:
        migrate_and_seed(url, local_provider=False)
        with engine.connect() as conn:
            providers = set(conn.execute(text("SELECT provider FROM vps_configs")).scalars())
            linked = set(conn.execute(text("SELECT c.provider FROM plan_vps_configs pc JOIN vps_configs c "
                                           "ON c.id = pc.vps_config_id")).scalars())
    finally:
        engine.dispose()
        with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert providers == linked == {"hetzner", "fly"}


# --- overage budget ------------------------------------------------------------------------------

async def test_budget_defaults_to_zero_and_can_be_set(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    first = (await api.get("/users/me/overage-budget", headers=headers(user))).json()
    assert first["budget_cents"] == 0 and first["currency"] == "USD"
    resp = await api.put("/users/me/overage-budget", json={"budget_cents": 2500}, headers=headers(user))
    assert resp.status_code == 200 and resp.json()["budget_cents"] == 2500
    assert (await api.get("/users/me/overage-budget", headers=headers(user))).json()["budget_cents"] == 2500
    resp = await api.put("/users/me/overage-budget", json={"budget_cents": 100}, headers=headers(user))
    rows = sql.execute("SELECT budget_cents FROM overage_budgets WHERE user_id = %s", (user,)).fetchall()
    assert rows == [(100,)]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"budget_cents": -1}, "greater than or equal to 0"),
        ({"budget_cents": 10**12}, "less than or equal to"),
        ({"budget_cents": "500"}, "valid integer"),
        ({"budget_cents": 12.5}, "valid integer"),
        ({"budget_cents": None}, "valid integer"),
        ({}, "Field required"),
        ({"budget_cents": 5, "extra": 1}, "Extra inputs"),
    ],
)
async def test_bad_budget_is_422_and_stores_nothing(api: httpx.AsyncClient, sql: psycopg.Connection,
                                                    payload: dict, fragment: str) -> None:  # type: ignore[type-arg]
    user = make_user(sql)
    body = assert_problem(await api.put("/users/me/overage-budget", json=payload, headers=headers(user)), 422)
    assert fragment in body["detail"] and body["errors"]
    assert sql.execute("SELECT count(*) FROM overage_budgets").fetchone() == (0,)


async def test_budget_body_that_is_not_json_is_422(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    resp = await api.put("/users/me/overage-budget", content=b"{not json",
                         headers={**headers(user), "content-type": "application/json"})
    assert_problem(resp, 422)


# --- agents --------------------------------------------------------------------------------------

async def test_agent_crud(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    resp = await api.post("/agents", json={"name": "  Molty  ", "model": "anthropic/claude-sonnet-5"},
                          headers=headers(user))
    assert resp.status_code == 201, resp.text
    agent = resp.json()
    assert agent["name"] == "Molty" and agent["vps"] is None
    assert resp.headers["location"] == f"/agents/{agent['id']}"
    # The token: 64 hex chars in the database (encrypted), only a 4-char hint in the API.
    token_enc, last4 = sql.execute("SELECT gateway_token, gateway_token_last4 FROM agents WHERE id = %s",
                                   (agent["id"],)).fetchone()  # type: ignore[misc]
    assert agent["gateway_token_hint"] == "…" + last4
    assert "gateway_token" not in agent and len(token_enc) > 64 and token_enc.startswith("gAAAAA")

    got = (await api.get(f"/agents/{agent['id']}", headers=headers(user))).json()
    assert got == agent
    listed = (await api.get("/agents", headers=headers(user))).json()
    assert listed["total"] == 1 and listed["items"] == [agent]

    assert (await api.delete(f"/agents/{agent['id']}", headers=headers(user))).status_code == 204
    assert_problem(await api.get(f"/agents/{agent['id']}", headers=headers(user)), 404)
    assert sql.execute("SELECT count(*) FROM agents").fetchone() == (0,)


async def test_gateway_token_is_64_hex_and_unique(api: httpx.AsyncClient, sql: psycopg.Connection,
                                                  settings: Settings) -> None:
    from db.encryption import configure_keys

    keyring = configure_keys(settings.secret_keys())
    user = make_user(sql, plan="pro")
    for i in range(3):
        assert (await api.post("/agents", json={"name": f"a{i}"}, headers=headers(user))).status_code == 201
    tokens = [keyring.decrypt(r[0]) for r in sql.execute("SELECT gateway_token FROM agents").fetchall()]
    assert len(set(tokens)) == 3
    assert all(len(t) == 64 and int(t, 16) >= 0 for t in tokens)


async def test_other_users_agent_is_invisible(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    alice, bob = make_user(sql), make_user(sql)
    agent = (await api.post("/agents", json={"name": "secret"}, headers=headers(alice))).json()
    assert_problem(await api.get(f"/agents/{agent['id']}", headers=headers(bob)), 404)
    assert_problem(await api.delete(f"/agents/{agent['id']}", headers=headers(bob)), 404)
    assert (await api.get("/agents", headers=headers(bob))).json()["total"] == 0
    # Bob's 404 is indistinguishable from a truly missing agent (apart from the id echoed back).
    missing = (await api.get(f"/agents/{uuid.uuid4()}", headers=headers(bob))).json()
    theirs = (await api.get(f"/agents/{agent['id']}", headers=headers(bob))).json()
    assert missing["title"] == theirs["title"] and missing["type"] == theirs["type"]
    assert sql.execute("SELECT count(*) FROM agents").fetchone() == (1,)


async def test_plan_limit_on_agents(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="free")  # max_agents = 1
    assert (await api.post("/agents", json={"name": "one"}, headers=headers(user))).status_code == 201
    body = assert_problem(await api.post("/agents", json={"name": "two"}, headers=headers(user)), 403)
    assert body["limit"] == "max_agents" and body["max"] == 1 and "max_agents" in body["detail"]
    assert sql.execute("SELECT count(*) FROM agents").fetchone() == (1,)


async def test_concurrent_creates_cannot_exceed_the_limit(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="starter")  # max_agents = 3
    results = await asyncio.gather(*[
        api.post("/agents", json={"name": f"c{i}"}, headers=headers(user)) for i in range(8)
    ])
    assert sorted(r.status_code for r in results) == [201] * 3 + [403] * 5
    assert sql.execute("SELECT count(*) FROM agents").fetchone() == (3,)


async def test_duplicate_agent_name_is_409(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    assert (await api.post("/agents", json={"name": "dup"}, headers=headers(user))).status_code == 201
    assert_problem(await api.post("/agents", json={"name": "dup"}, headers=headers(user)), 409)


@pytest.mark.parametrize("payload", [{"name": ""}, {"name": "   "}, {"name": "x" * 65}, {"name": 5},
                                     {"name": "ok", "model": "no-slash"}, {"name": "ok", "gateway_token": "a"},
                                     {"name": "bad\nname"}])
async def test_bad_agent_input_is_422(api: httpx.AsyncClient, sql: psycopg.Connection, payload: dict) -> None:  # type: ignore[type-arg]
    user = make_user(sql)
    assert_problem(await api.post("/agents", json=payload, headers=headers(user)), 422)
    assert sql.execute("SELECT count(*) FROM agents").fetchone() == (0,)


async def test_agent_list_is_paginated(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="pro")
    for i in range(5):
        await api.post("/agents", json={"name": f"p{i}"}, headers=headers(user))
    page1 = (await api.get("/agents?limit=2", headers=headers(user))).json()
    page3 = (await api.get("/agents?limit=2&offset=4", headers=headers(user))).json()
    assert page1["total"] == 5 and [a["name"] for a in page1["items"]] == ["p0", "p1"]
    assert [a["name"] for a in page3["items"]] == ["p4"]
    assert_problem(await api.get("/agents?limit=0", headers=headers(user)), 422)
    assert_problem(await api.get("/agents?limit=1000", headers=headers(user)), 422)


async def test_malformed_agent_id_is_422(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    assert_problem(await api.get("/agents/not-a-uuid", headers=headers(user)), 422)
