"""GET /agents/{id}/usage: this month against the plan, summed over the user's VPSes, scoped to the user."""

from __future__ import annotations

import time
import uuid

import httpx
import psycopg
import pytest
from temporalio.client import Client

from billing.overage import GIB, UsageSnapshot, overage_cost_cents
from db.models import Plan
from metering.periods import epoch, month_of
from settings import Settings
from tests.fakes.hetzner_api import FakeHetzner
from tests.helpers import headers, make_user
from tests.metering_harness import collectors, make_vps, metering_worker
from workflows.metering import MeteringCycle, MeteringCycleInput

pytestmark = pytest.mark.asyncio(loop_scope="session")



def tiny_plan(sql: psycopg.Connection) -> None:
    """Limits a one-hour cx23 goes over: 1 GiB bandwidth, 10 CPU minutes, 1 GB-hour, 1 GiB storage."""
    sql.execute(
        "INSERT INTO plans (name, display_name, max_agents, max_vpses, max_bandwidth_bytes, max_storage_bytes,"
        " max_cpu_ms, max_memory_mb_seconds, overage_bandwidth_cost_per_gb_cents, overage_storage_cost_per_gb_cents,"
        " overage_cpu_cost_per_hour_cents, overage_memory_cost_per_gb_hour_cents) VALUES"
        " ('tiny-usage', 'Tiny', 3, 3, %s, %s, %s, %s, 10, 7, 3, 2) ON CONFLICT (name) DO NOTHING",
        (GIB, GIB // 1000, 600_000, 1024 * 3600))


async def test_usage_against_the_plan(api: httpx.AsyncClient, temporal_client: Client, settings: Settings,
                                      sql: psycopg.Connection) -> None:
    tiny_plan(sql)
    user = make_user(sql, plan="tiny-usage")
    other = make_user(sql)
    agent = (await api.post("/agents", json={"name": "molty"}, headers=headers(user))).json()
    now = int(time.time())
    start = max(epoch(month_of(now)), now // 3600 * 3600 - 2 * 3600)
    async with FakeHetzner() as fake:
        servers = [fake.add_server(n) for n in ("a", "b")]
        mine = make_vps(sql, user, "hetzner-cx23", ref=str(servers[0]["id"]), created=start)
        make_vps(sql, user, "hetzner-cx23", ref=str(servers[1]["id"]), created=start)  # another agent's VPS
        sql.execute("UPDATE agents SET vps_id = %s WHERE id = %s", (mine, agent["id"]))
        sql.execute("INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES (%s, %s, 500)",
                    (user, month_of(now)))
        async with metering_worker(temporal_client, settings, collectors(settings, hetzner_url=fake.base_url)) \
                as (_, tq):
            await temporal_client.execute_workflow(MeteringCycle.run, MeteringCycleInput(until=start + 3600),
                                                   id=f"meter-{uuid.uuid4().hex[:6]}", task_queue=tq)

    resp = await api.get(f"/agents/{agent['id']}/usage", headers=headers(user))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    cpu = body["resources"]["cpu_ms"]
    assert cpu["used"] == 2 * 50 * 60 * 10 * 60 and cpu["agent_used"] == cpu["used"] // 2
    assert cpu["limit"] == 600_000 and cpu["over_limit"] is True and cpu["projected"] >= cpu["used"]
    bw = body["resources"]["bandwidth_bytes"]
    assert bw["used"] == 2 * 3000 * 3600 and bw["over_limit"] is False
    assert bw["used_in"] + bw["used_out"] == bw["used"] and body["resources"]["cpu_ms"]["used_in"] is None
    assert body["resources"]["memory_mb_seconds"]["used"] == 2 * 4096 * 3600
    assert body["budget_cents"] == 500 and body["period_start"] == month_of(now).isoformat()
    plan = Plan(name="t", display_name="t", max_agents=3, max_vpses=3, max_bandwidth_bytes=GIB,
                max_storage_bytes=GIB // 1000, max_cpu_ms=600_000, max_memory_mb_seconds=1024 * 3600,
                overage_bandwidth_cost_per_gb_cents=10, overage_storage_cost_per_gb_cents=7,
                overage_cpu_cost_per_hour_cents=3, overage_memory_cost_per_gb_hour_cents=2)
    res = body["resources"]
    expected = overage_cost_cents(UsageSnapshot(plan, 500, frozenset(), res["bandwidth_bytes"]["used"],
                                                res["cpu_ms"]["used"], res["memory_mb_seconds"]["used"],
                                                res["storage_bytes"]["used"]))
    assert body["overage_cost_cents"] == expected > 0
    assert body["projected_overage_cost_cents"] >= expected
    assert sum(d["cpu_ms"] for d in body["daily"]) == cpu["used"]
    assert sum(d["bandwidth_in_bytes"] + d["bandwidth_out_bytes"] for d in body["daily"]) == bw["used"]
    assert all(d["bandwidth_in_bytes"] + d["bandwidth_out_bytes"] == d["bandwidth_bytes"] for d in body["daily"])
    assert sum(d["storage_bytes"] for d in body["daily"]) == res["storage_bytes"]["used"] > 0
    assert body["collected_until"] is not None and body["stale"] is False

    # Another user's agent is a 404 problem, like a missing one.
    resp = await api.get(f"/agents/{agent['id']}/usage", headers=headers(other))
    assert resp.status_code == 404 and resp.headers["content-type"].startswith("application/problem+json")
    resp = await api.get(f"/agents/{uuid.uuid4()}/usage", headers=headers(user))
    assert resp.status_code == 404


async def test_usage_of_a_new_agent_is_zero(api: httpx.AsyncClient, sql: psycopg.Connection) -> None:
    user = make_user(sql)
    agent = (await api.post("/agents", json={"name": "fresh"}, headers=headers(user))).json()
    body = (await api.get(f"/agents/{agent['id']}/usage", headers=headers(user))).json()
    assert body["resources"]["cpu_ms"]["used"] == 0 and body["daily"] == [] and body["overage_cost_cents"] == 0
    assert body["collected_until"] is None
