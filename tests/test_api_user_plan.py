"""PUT /users/me/plan: a self-serve plan choice, refused when what the user has does not fit the plan."""

from __future__ import annotations

import time
import uuid

import httpx
import psycopg
import pytest

from billing.plans import month_start
from tests.helpers import headers, make_user
from tests.metering_harness import make_vps

pytestmark = pytest.mark.asyncio(loop_scope="session")



def plan_id(sql: psycopg.Connection, name: str) -> str:
    row = sql.execute("SELECT id FROM plans WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return str(row[0])


async def current_plan(api: httpx.AsyncClient, user: uuid.UUID) -> str:
    me = await api.get("/users/me", headers=headers(user))
    assert me.status_code == 200, me.text
    return str(me.json()["plan"]["name"])


async def test_choose_a_plan(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan=None)  # on the default plan (free)
    other = make_user(sql, plan="starter")
    assert await current_plan(api, user) == "free"
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "pro")}, headers=headers(user))
    assert resp.status_code == 200, resp.text
    assert resp.json()["plan"]["name"] == "pro" and resp.json()["id"] == str(user)
    assert await current_plan(api, user) == "pro"
    assert await current_plan(api, other) == "starter"  # scoped to X-User-Id
    again = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "pro")}, headers=headers(user))
    assert again.status_code == 200  # idempotent
    # The new plan's limits apply at once: pro allows more than one agent.
    for name in ("a", "b"):
        assert (await api.post("/agents", json={"name": name}, headers=headers(user))).status_code == 201


async def test_too_small_a_plan_is_a_conflict(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="starter")  # 3 agents, 2 VPSes
    for name in ("one", "two"):
        assert (await api.post("/agents", json={"name": name}, headers=headers(user))).status_code == 201
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "free")}, headers=headers(user))
    assert resp.status_code == 409, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert "2 agent(s) but it allows 1 (max_agents)" in body["detail"]
    assert body["agents"] == 2 and body["max_agents"] == 1
    assert await current_plan(api, user) == "starter"  # unchanged

    # VPSes count too, every one not destroyed (`error` included); another user's count for nothing.
    solo = make_user(sql, plan="starter")
    assert (await api.post("/agents", json={"name": "solo"}, headers=headers(solo))).status_code == 201
    now = int(time.time())
    make_vps(sql, solo, "local-small", ref=None, created=now, state="running")
    make_vps(sql, solo, "local-small", ref=None, created=now, state="error")
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "free")}, headers=headers(solo))
    assert resp.status_code == 409 and "2 VPS(es) but it allows 1 (max_vpses)" in resp.json()["detail"]
    assert "agent(s)" not in resp.json()["detail"]
    sql.execute("UPDATE vpses SET state = 'destroyed', destroyed_at = now() WHERE user_id = %s AND state = 'error'",
                (solo,))
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "free")}, headers=headers(solo))
    assert resp.status_code == 200, resp.text
    assert await current_plan(api, solo) == "free"


async def test_unknown_inactive_and_bad_input(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="starter")
    unknown = await api.put("/users/me/plan", json={"plan_id": str(uuid.uuid4())}, headers=headers(user))
    assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("application/problem+json")
    name = f"retired-{uuid.uuid4().hex[:6]}"
    sql.execute(
        "INSERT INTO plans (name, display_name, max_agents, max_vpses, max_bandwidth_bytes, max_storage_bytes,"
        " max_cpu_ms, max_memory_mb_seconds, overage_bandwidth_cost_per_gb_cents, overage_storage_cost_per_gb_cents,"
        " overage_cpu_cost_per_hour_cents, overage_memory_cost_per_gb_hour_cents, deactivated_at)"
        " VALUES (%s, 'Retired', 9, 9, 1, 1, 1, 1, 0, 0, 0, 0, now())", (name,))
    retired = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, name)}, headers=headers(user))
    assert retired.status_code == 404  # not offered any more
    for body in ({"plan_id": "nope"}, {}, {"plan_id": plan_id(sql, "pro"), "extra": 1}):
        bad = await api.put("/users/me/plan", json=body, headers=headers(user))
        assert bad.status_code == 422, body
    anonymous = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "pro")},
                              headers={"Authorization": headers(user)["Authorization"]})
    assert anonymous.status_code == 401
    assert await current_plan(api, user) == "starter"


async def test_a_plan_this_months_usage_does_not_fit_is_refused_until_accepted(
        api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql, plan="pro")  # 1000 GB included
    vps = make_vps(sql, user, "local-small", ref=None, created=int(time.time()), state="running")
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_out_bytes) VALUES (%s, %s, %s)",
                (vps, month_start(), 200 * 1024**3))

    # Starter includes 100 GB at 2 cents per GB over: 200 cents of overage, and the budget is 0.
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "starter")}, headers=headers(user))
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["type"].endswith("/usage-exceeds-plan") and body["over"] == ["bandwidth"]
    assert body["required_budget_cents"] == body["overage_cents"] == 200 and body["budget_cents"] == 0
    assert "Raise your overage budget to at least $2.00" in body["detail"]
    assert await current_plan(api, user) == "pro"

    # Free has no overage for bandwidth: no budget helps, and the answer says so.
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "free")}, headers=headers(user))
    assert resp.status_code == 409 and resp.json()["required_budget_cents"] is None
    assert "No overage budget covers that" in resp.json()["detail"]

    # With a budget that covers it the move goes through; so does an explicit acceptance of the stop.
    assert (await api.put("/users/me/overage-budget", json={"budget_cents": 200},
                          headers=headers(user))).status_code == 200
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "starter")}, headers=headers(user))
    assert resp.status_code == 200, resp.text
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "free"), "accept_overage_stop": True},
                         headers=headers(user))
    assert resp.status_code == 200 and resp.json()["plan"]["name"] == "free"
    # Already over (on free): moving between plans that are both exceeded is not what causes a stop.
    assert (await api.put("/users/me/overage-budget", json={"budget_cents": 0},
                          headers=headers(user))).status_code == 200
    resp = await api.put("/users/me/plan", json={"plan_id": plan_id(sql, "starter")}, headers=headers(user))
    assert resp.status_code == 200, resp.text
