"""The admin API against the real stack: auth, the fleet (force stop/destroy through Temporal), plans and
VPS configs CRUD, usage, the exemption switch and the audit log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from api.app import create_app
from billing.plans import month_start
from db.encryption import configure_keys
from settings import Settings
from tests.conftest import free_port
from tests.helpers import headers, make_user
from tests.lifecycle_harness import Stack, running_stack

pytestmark = pytest.mark.asyncio(loop_scope="session")
PROBLEM = "application/problem+json"


@pytest_asyncio.fixture(loop_scope="session")
async def stack(settings: Settings, temporal_client: Client, db: str) -> AsyncIterator[Stack]:
    async with running_stack(settings, temporal_client) as s:
        yield s


@pytest.fixture
def cleanup_plans(sql: psycopg.Connection) -> Iterator[None]:
    """Plans and configs are seed tables (not truncated between tests): remove what a test added."""
    plans = {r[0] for r in sql.execute("SELECT id FROM plans").fetchall()}
    configs = {r[0] for r in sql.execute("SELECT id FROM vps_configs").fetchall()}
    yield
    sql.execute("UPDATE users SET plan_id = NULL WHERE NOT (plan_id = ANY(%s))", (list(plans),))
    sql.execute("DELETE FROM vpses WHERE NOT (vps_config_id = ANY(%s))", (list(configs),))
    sql.execute("UPDATE plans SET is_default = (name = 'free'), deactivated_at = NULL")
    sql.execute("DELETE FROM plans WHERE NOT (id = ANY(%s))", (list(plans),))
    sql.execute("DELETE FROM vps_configs WHERE NOT (id = ANY(%s))", (list(configs),))
    sql.execute("UPDATE vps_configs SET deactivated_at = NULL")


def make_admin(sql: psycopg.Connection) -> uuid.UUID:
    admin = make_user(sql, plan="pro", email=f"admin-{uuid.uuid4().hex[:6]}@example.com")
    sql.execute("UPDATE users SET is_admin = true WHERE id = %s", (admin,))
    return admin


def audit_rows(sql: psycopg.Connection, target_id: object) -> list[tuple[object, ...]]:
    return sql.execute("SELECT action, admin_user_id, operation_id, details FROM admin_audit_log WHERE target_id = %s "
                       "ORDER BY id", (str(target_id),)).fetchall()


async def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await stack.api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


ADMIN_CALLS = [
    ("GET", "/admin/users", None), ("GET", "/admin/vpses", None), ("GET", "/admin/plans", None),
    ("GET", "/admin/usage", None), ("GET", "/admin/audit-log", None), ("GET", "/admin/vps-configs", None),
    ("POST", f"/admin/vpses/{uuid.uuid4()}/stop", None), ("DELETE", f"/admin/vpses/{uuid.uuid4()}", None),
    ("PUT", f"/admin/users/{uuid.uuid4()}/usage-exempt", {"exempt": True}),
    ("DELETE", f"/admin/plans/{uuid.uuid4()}", None),
]


async def test_admin_routes_refuse_non_admins_and_bad_keys(stack: Stack, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    admin = make_admin(sql)
    for method, path, body in ADMIN_CALLS:
        resp = await stack.api.request(method, path, json=body, headers=headers(user))
        assert resp.status_code == 403, (path, resp.text)
        assert resp.headers["content-type"] == PROBLEM and resp.json()["type"].endswith("/forbidden")
        resp = await stack.api.request(method, path, json=body, headers=headers(admin, key="x" * 43))
        assert resp.status_code == 401, (path, resp.text)
        resp = await stack.api.request(method, path, json=body, headers={"X-User-Id": str(admin)})
        assert resp.status_code == 401, (path, resp.text)
    assert (await stack.api.get("/admin/users", headers=headers(admin))).status_code == 200
    assert sql.execute("SELECT count(*) FROM admin_audit_log").fetchone() == (0,)


async def test_admin_force_stops_and_destroys_another_users_vps(stack: Stack, sql: psycopg.Connection) -> None:
    admin = make_admin(sql)
    owner = make_user(sql, plan="starter")
    agent = await stack.new_agent(owner)
    assert (await stack.provision(owner, agent)).status_code == 202
    vps = await stack.wait_vps(owner, agent, "running", "error")
    assert vps["state"] == "running", vps["last_error"]
    vps_id = vps["id"]

    listed = (await stack.api.get("/admin/vpses", params={"user_id": str(owner), "state": "running",
                                                          "provider": "local"}, headers=headers(admin))).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == vps_id
    assert listed["items"][0]["agent_id"] == agent and listed["items"][0]["user_id"] == str(owner)
    assert (await stack.api.get("/admin/vpses", params={"user_id": str(owner), "state": "stopped"},
                                headers=headers(admin))).json()["total"] == 0
    # A plain user cannot do it through the admin route, even to their own VPS.
    assert (await stack.api.post(f"/admin/vpses/{vps_id}/stop", headers=headers(owner))).status_code == 403
    assert audit_rows(sql, vps_id) == []

    before = await scrape(stack)
    resp = await stack.api.post(f"/admin/vpses/{vps_id}/stop", headers=headers(admin))
    assert resp.status_code == 202, resp.text
    stop = resp.json()
    assert stop["operation"] == "StopVps" and resp.headers["location"] == stop["status_url"]
    assert (await stack.wait_vps(owner, agent, "stopped"))["state"] == "stopped"
    # Recorded as the owner's operation (the owner sees it), and audited with its id, in one transaction.
    op = sql.execute("SELECT user_id, kind, status FROM vps_operations WHERE id = %s",
                     (stop["operation_id"],)).fetchone()
    assert op == (owner, "stop", "succeeded")
    rows = audit_rows(sql, vps_id)
    assert [(r[0], r[1], r[2]) for r in rows] == [("vps.stop", admin, stop["operation_id"])]
    assert rows[0][3]["user_id"] == str(owner) and rows[0][3]["state"] == "running"
    entry = sql.execute("SELECT id FROM admin_audit_log WHERE operation_id = %s", (stop["operation_id"],)).fetchone()
    assert entry == (stop["audit_id"],)
    followed = (await stack.api.get(stop["status_url"], headers=headers(admin))).json()
    assert followed["status"] == "succeeded" and followed["kind"] == "stop"
    owners_view = await stack.api.get(f"/agents/{agent}/operations/{stop['operation_id']}", headers=headers(owner))
    assert owners_view.status_code == 200
    # The owner is told, once, in the app (and by email through the outbox).
    told = (await stack.api.get("/users/me/notifications", headers=headers(owner))).json()
    assert [n["title"] for n in told["items"]] == ["An administrator stopped your agent molty"], told
    assert told["unread_count"] == 1

    # Metrics: the submit is counted by the API, the outcome by the worker's finish activity.
    after = await scrape(stack)
    submitted = ("slopbox_operations_submitted_total", (("kind", "stop"),))
    finished = ("slopbox_operations_finished_total", (("kind", "stop"), ("status", "succeeded")))
    assert after[submitted] == before.get(submitted, 0) + 1
    assert after[finished] == before.get(finished, 0) + 1

    # A stop on a stopped VPS is refused like the owner's own, and leaves no audit row.
    again = await stack.api.post(f"/admin/vpses/{vps_id}/stop", headers=headers(admin))
    assert again.status_code == 409 and again.json()["vps_state"] == "stopped"
    assert len(audit_rows(sql, vps_id)) == 1

    resp = await stack.api.delete(f"/admin/vpses/{vps_id}", headers=headers(admin))
    assert resp.status_code == 202, resp.text
    destroy = resp.json()
    assert destroy["operation"] == "DestroyVps"
    assert (await stack.wait_vps(owner, agent, "destroyed"))["state"] == "destroyed"
    told = (await stack.api.get("/users/me/notifications", headers=headers(owner))).json()
    assert [n["title"] for n in told["items"]][0] == "An administrator destroyed your agent molty", told
    assert told["unread_count"] == 2
    assert [(r[0], r[2]) for r in audit_rows(sql, vps_id)] == [("vps.stop", stop["operation_id"]),
                                                               ("vps.destroy", destroy["operation_id"])]
    done = await stack.api.delete(f"/admin/vpses/{vps_id}", headers=headers(admin))
    assert done.status_code == 200 and done.json() == {"vps_id": vps_id, "state": "destroyed", "operation_id": None}
    assert (await stack.api.post(f"/admin/vpses/{uuid.uuid4()}/stop", headers=headers(admin))).status_code == 404
    assert len(audit_rows(sql, vps_id)) == 2


async def test_a_submit_temporal_refuses_records_nothing(settings: Settings, sql: psycopg.Connection, db: str) -> None:
    """Temporal unreachable: 503, and neither the operation nor the audit row is written."""
    admin = make_admin(sql)
    owner = make_user(sql)
    config = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
    vps = sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, 'local', 'running') "
                      "RETURNING id", (owner, config)).fetchone()[0]  # type: ignore[index]
    sql.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) "
                "VALUES (%s, 'a', %s, 'abcd', %s)", (owner, configure_keys(settings.secret_keys()).encrypt("t"), vps))

    app = create_app(settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as api:
        resp = await api.post(f"/admin/vpses/{vps}/stop", headers=headers(admin))
    assert resp.status_code == 503, resp.text
    assert sql.execute("SELECT count(*) FROM vps_operations").fetchone() == (0,)
    assert audit_rows(sql, vps) == []


PLAN = {
    "name": "team", "display_name": "Team", "price_cents_per_month": 4900, "max_agents": 20, "max_vpses": 10,
    "max_bandwidth_bytes": 10**12, "max_storage_bytes": 10**11, "max_cpu_ms": 10**9, "max_memory_mb_seconds": 10**10,
    "overage_bandwidth_cost_per_gb_cents": 1, "overage_storage_cost_per_gb_cents": 5,
    "overage_cpu_cost_per_hour_cents": 2, "overage_memory_cost_per_gb_hour_cents": 1,
}


async def test_plan_crud_and_its_rules(stack: Stack, sql: psycopg.Connection, cleanup_plans: None) -> None:
    admin = make_admin(sql)
    user = make_user(sql, plan=None)
    local = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
    h = headers(admin)

    bad = await stack.api.post("/admin/plans", json={**PLAN, "vps_config_ids": [str(uuid.uuid4())]}, headers=h)
    assert bad.status_code == 409 and bad.json()["type"].endswith("/unknown-vps-config")
    for broken in ({**PLAN, "max_agents": -1}, {**PLAN, "name": "Team Plan"}, {**PLAN, "extra": 1},
                   {**PLAN, "max_cpu_ms": 1.5}, {**PLAN, "max_cpu_ms": 2**63},
                   {k: v for k, v in PLAN.items() if k != "max_vpses"}):
        assert (await stack.api.post("/admin/plans", json=broken, headers=h)).status_code == 422, broken
    resp = await stack.api.post("/admin/plans", json={**PLAN, "vps_config_ids": [str(local)]}, headers=h)
    assert resp.status_code == 201, resp.text
    plan = resp.json()
    assert plan["active"] and not plan["is_default"] and plan["vps_config_ids"] == [str(local)]
    dup = await stack.api.post("/admin/plans", json=PLAN, headers=h)
    assert dup.status_code == 409 and dup.json()["name"] == "team"
    offered = {p["name"] for p in (await stack.api.get("/plans", headers=headers(user))).json()}
    assert "team" in offered

    assigned = await stack.api.put(f"/admin/users/{user}/plan", json={"plan_id": plan["id"]}, headers=h)
    assert assigned.status_code == 200 and assigned.json()["plan"]["name"] == "team"
    assert assigned.json()["plan_assigned"] is True

    # In use: not deleted, deactivated instead.
    refused = await stack.api.delete(f"/admin/plans/{plan['id']}", headers=h)
    assert refused.status_code == 409 and refused.headers["content-type"] == PROBLEM
    assert refused.json()["users"] == 1 and "Deactivate" in refused.json()["detail"]
    patched = await stack.api.patch(f"/admin/plans/{plan['id']}", json={"active": False, "max_agents": 5}, headers=h)
    assert patched.status_code == 200 and patched.json()["active"] is False and patched.json()["max_agents"] == 5
    assert "team" not in {p["name"] for p in (await stack.api.get("/plans", headers=headers(user))).json()}
    me = (await stack.api.get("/users/me", headers=headers(user))).json()
    assert me["plan"]["name"] == "team" and me["plan"]["max_agents"] == 5  # the user keeps it
    other = make_user(sql, plan=None)
    blocked = await stack.api.put(f"/admin/users/{other}/plan", json={"plan_id": plan["id"]}, headers=h)
    assert blocked.status_code == 409

    # The default plan: never deleted, never deactivated, never left without one.
    free = next(p for p in (await stack.api.get("/admin/plans", headers=h)).json() if p["name"] == "free")
    assert free["is_default"]
    assert (await stack.api.delete(f"/admin/plans/{free['id']}", headers=h)).status_code == 409
    assert (await stack.api.patch(f"/admin/plans/{free['id']}", json={"active": False}, headers=h)).status_code == 409
    assert (await stack.api.patch(f"/admin/plans/{free['id']}", json={"is_default": False},
                                  headers=h)).status_code == 409
    assert (await stack.api.patch(f"/admin/plans/{plan['id']}", json={"is_default": True},
                                  headers=h)).status_code == 409  # deactivated
    moved = await stack.api.patch(f"/admin/plans/{plan['id']}", json={"is_default": True, "active": True}, headers=h)
    assert moved.status_code == 200 and moved.json()["is_default"]
    assert sql.execute("SELECT name FROM plans WHERE is_default").fetchall() == [("team",)]
    assert (await stack.api.patch(f"/admin/plans/{free['id']}", json={"is_default": True},
                                  headers=h)).status_code == 200

    # Unused: deleted.
    assert (await stack.api.put(f"/admin/users/{user}/plan", json={"plan_id": free["id"]},
                                headers=h)).status_code == 200
    assert (await stack.api.delete(f"/admin/plans/{plan['id']}", headers=h)).status_code == 204
    assert (await stack.api.get(f"/admin/plans/{plan['id']}", headers=h)).status_code == 404
    assert [r[0] for r in audit_rows(sql, plan["id"])] == ["plan.create", "plan.update", "plan.update", "plan.delete"]
    assert [r[0] for r in audit_rows(sql, user)] == ["user.plan", "user.plan"]


async def test_vps_config_crud_and_in_use_rules(stack: Stack, sql: psycopg.Connection, cleanup_plans: None) -> None:
    admin = make_admin(sql)
    h = headers(admin)
    body = {"name": "local-big", "provider": "local", "cpu_millicores": 2000, "memory_mb": 2048, "disk_gb": 10,
            "image": "openclaw@2026.9.6", "locations": ["local"]}
    assert (await stack.api.post("/admin/vps-configs", json={**body, "provider": "aws"}, headers=h)).status_code == 422
    assert (await stack.api.post("/admin/vps-configs", json={**body, "disk_gb": 0}, headers=h)).status_code == 422
    assert (await stack.api.post("/admin/vps-configs", json={**body, "locations": []}, headers=h)).status_code == 422
    resp = await stack.api.post("/admin/vps-configs", json=body, headers=h)
    assert resp.status_code == 201, resp.text
    config = resp.json()
    assert (await stack.api.post("/admin/vps-configs", json=body, headers=h)).status_code == 409

    # Allowed on the starter plan: a starter user can provision it until it is deactivated.
    starter = next(p for p in (await stack.api.get("/admin/plans", headers=h)).json() if p["name"] == "starter")
    linked = await stack.api.patch(f"/admin/plans/{starter['id']}",
                                   json={"vps_config_ids": [*starter["vps_config_ids"], config["id"]]}, headers=h)
    assert linked.status_code == 200 and config["id"] in linked.json()["vps_config_ids"]
    user = make_user(sql, plan="starter")
    agent = await stack.new_agent(user)
    assert (await stack.api.patch(f"/admin/vps-configs/{config['id']}", json={"active": False},
                                  headers=h)).json()["active"] is False
    refused = await stack.api.post(f"/agents/{agent}/vps", json={"vps_config_id": config["id"]}, headers=headers(user))
    assert refused.status_code == 403, refused.text
    offered = [c["id"] for p in (await stack.api.get("/plans", headers=headers(user))).json() for c in p["vps_configs"]]
    assert config["id"] not in offered

    # A VPS row using it (here a destroyed one): sizes of a live one are fixed, and it is never deleted.
    vps = sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, 'local', 'stopped') "
                      "RETURNING id", (user, config["id"])).fetchone()[0]  # type: ignore[index]
    resized = await stack.api.patch(f"/admin/vps-configs/{config['id']}", json={"disk_gb": 20}, headers=h)
    assert resized.status_code == 409 and resized.json()["vpses"] == 1
    assert (await stack.api.patch(f"/admin/vps-configs/{config['id']}", json={"image": "openclaw@2026.10.1"},
                                  headers=h)).json()["image"] == "openclaw@2026.10.1"
    sql.execute("UPDATE vpses SET state = 'destroyed' WHERE id = %s", (vps,))
    in_use = await stack.api.delete(f"/admin/vps-configs/{config['id']}", headers=h)
    assert in_use.status_code == 409 and in_use.json()["vpses"] == 1 and "deactivate" in in_use.json()["detail"]
    sql.execute("DELETE FROM vpses WHERE id = %s", (vps,))
    assert (await stack.api.delete(f"/admin/vps-configs/{config['id']}", headers=h)).status_code == 204
    assert sql.execute("SELECT count(*) FROM plan_vps_configs WHERE vps_config_id = %s",
                       (config["id"],)).fetchone() == (0,)
    assert [r[0] for r in audit_rows(sql, config["id"])] == [
        "vps_config.create", "vps_config.update", "vps_config.update", "vps_config.delete"]


def add_usage(sql: psycopg.Connection, user: uuid.UUID, provider: str, amounts: tuple[int, ...],
              period: object = None) -> uuid.UUID:
    config = sql.execute("SELECT id FROM vps_configs WHERE provider = %s LIMIT 1", (provider,)).fetchone()[0]  # type: ignore[index]
    vps = sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, %s, 'running') "
                      "RETURNING id", (user, config, provider)).fetchone()[0]  # type: ignore[index]
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start, bandwidth_in_bytes, bandwidth_out_bytes, cpu_ms, "
                "memory_mb_seconds, storage_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (vps, period or month_start(), *amounts))
    return vps  # type: ignore[no-any-return]


async def test_users_usage_and_the_exemption_switch(stack: Stack, sql: psycopg.Connection) -> None:
    admin = make_admin(sql)
    h = headers(admin)
    user = make_user(sql, plan="starter", email=f"heavy_{uuid.uuid4().hex[:6]}@example.com")
    await stack.new_agent(user)
    add_usage(sql, user, "local", (10, 20, 30, 40, 50))
    add_usage(sql, user, "hetzner", (1, 2, 3, 4, 5))
    add_usage(sql, user, "hetzner", (100, 100, 100, 100, 100), period=datetime(2020, 1, 1, tzinfo=UTC).date())

    page = (await stack.api.get("/admin/users", params={"email": "HEAVY_"}, headers=h)).json()
    assert page["total"] == 1
    row = page["items"][0]
    assert row["id"] == str(user) and row["plan"]["name"] == "starter" and row["agent_count"] == 1
    assert row["vps_count"] == 3 and row["usage_exempt"] is False
    assert row["usage"] == {"bandwidth_in_bytes": 11, "bandwidth_out_bytes": 22, "cpu_ms": 33,
                            "memory_mb_seconds": 44, "storage_bytes": 55}
    # `_` and `%` in the filter are literal.
    assert (await stack.api.get("/admin/users", params={"email": "heavy%"}, headers=h)).json()["total"] == 0

    usage = (await stack.api.get("/admin/usage", headers=h)).json()
    assert usage["usage"]["cpu_ms"] == 33 and usage["vpses"] == 2 and usage["users"] == 1
    assert {p["provider"]: p["usage"]["cpu_ms"] for p in usage["by_provider"]} == {"hetzner": 3, "local": 30}
    old = (await stack.api.get("/admin/usage", params={"month": "2020-01"}, headers=h)).json()
    assert old["usage"]["cpu_ms"] == 100 and old["period_start"] == "2020-01-01"
    assert (await stack.api.get("/admin/usage", params={"month": "2020-13"}, headers=h)).status_code == 422

    for bad in ({"exempt": "yes"}, {"exempt": 1}, {}, {"exempt": True, "x": 1}):
        assert (await stack.api.put(f"/admin/users/{user}/usage-exempt", json=bad, headers=h)).status_code == 422
    resp = await stack.api.put(f"/admin/users/{user}/usage-exempt", json={"exempt": True}, headers=h)
    assert resp.status_code == 200 and resp.json()["usage_exempt"] is True
    assert sql.execute("SELECT usage_exempt FROM users WHERE id = %s", (user,)).fetchone() == (True,)
    again = await stack.api.put(f"/admin/users/{user}/usage-exempt", json={"exempt": True}, headers=h)
    assert again.status_code == 200  # no change, no audit row
    rows = audit_rows(sql, user)
    assert [(r[0], r[1], r[3]) for r in rows] == [("user.usage_exempt", admin, {"before": False, "after": True})]
    assert (await stack.api.put(f"/admin/users/{uuid.uuid4()}/usage-exempt", json={"exempt": True},
                                headers=h)).status_code == 404


async def test_audit_log_is_paginated_newest_first(stack: Stack, sql: psycopg.Connection) -> None:
    admin = make_admin(sql)
    h = headers(admin)
    user = make_user(sql)
    for exempt in (True, False, True, False, True):
        assert (await stack.api.put(f"/admin/users/{user}/usage-exempt", json={"exempt": exempt},
                                    headers=h)).status_code == 200
    seen = []
    for offset in (0, 2, 4):
        page = (await stack.api.get("/admin/audit-log", params={"limit": 2, "offset": offset}, headers=h)).json()
        assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == offset
        seen += page["items"]
    assert [e["details"]["after"] for e in seen] == [True, False, True, False, True]
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5
    assert seen[0]["admin_user_id"] == str(admin) and seen[0]["admin_email"].startswith("admin-")
    assert seen[0]["target_type"] == "user" and seen[0]["target_id"] == str(user)
    filtered = (await stack.api.get("/admin/audit-log", params={"action": "plan.create"}, headers=h)).json()
    assert filtered["total"] == 0
    assert (await stack.api.get("/admin/audit-log", params={"limit": 0}, headers=h)).status_code == 422
    # The log outlives the admin's account: who acted stays readable.
    sql.execute("DELETE FROM users WHERE id = %s", (admin,))
    other = make_admin(sql)
    kept = (await stack.api.get("/admin/audit-log", headers=headers(other))).json()["items"]
    assert kept[0]["admin_user_id"] is None and kept[0]["admin_email"].startswith("admin-")


async def test_cli_grants_and_revokes_the_admin_flag(sql: psycopg.Connection, db: str) -> None:
    from cli.users import UserError, create_user, set_admin

    url = db.replace("postgresql://", "postgresql+psycopg://", 1)
    made = create_user(url, email="Boss@Example.com", plan=None, admin=True)
    assert sql.execute("SELECT is_admin FROM users WHERE id = %s", (made,)).fetchone() == (True,)
    user = make_user(sql, email="later@example.com")
    assert set_admin(url, email="LATER@example.com", admin=True) == user
    assert sql.execute("SELECT is_admin FROM users WHERE id = %s", (user,)).fetchone() == (True,)
    assert set_admin(url, email="later@example.com", admin=False) == user
    assert sql.execute("SELECT is_admin FROM users WHERE id = %s", (user,)).fetchone() == (False,)
    with pytest.raises(UserError):
        set_admin(url, email="nobody@example.com", admin=True)
