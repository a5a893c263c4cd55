"""Plans and VPS configs every fresh database starts with (idempotent: upsert by name).

Limits are monthly. Overage rates are in cents: bandwidth and storage per GB, CPU per
vCPU-hour, memory per GB-hour. Hetzner RAM is not metered by the provider, so its usage is
the configured allocation (PRD §8.2).

The `local` config (a gateway process on the worker's host) is seeded only when the local
provider is enabled (embedded mode by default, see `Settings.local_provider_enabled`).
"""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.engine import Connection

GB = 1024**3
HOUR_MS = 3_600_000

VPS_CONFIGS = [
    # name, provider, cpu_millicores, memory_mb, disk_gb, image, server_type, locations
    ("local-small", "local", 1000, 1024, 5, "openclaw@2026.9.6", None, ["local"]),
    ("hetzner-cx23", "hetzner", 2000, 4096, 40, "slopbox-openclaw-2026-9-6", "cx23", ["fsn1", "nbg1", "hel1"]),
    ("hetzner-cx33", "hetzner", 4000, 8192, 80, "slopbox-openclaw-2026-9-6", "cx33", ["fsn1", "nbg1", "hel1"]),
    ("fly-shared-2x", "fly", 2000, 2048, 10, "registry.fly.io/slopbox-openclaw:2026.9.6", "shared-cpu-2x",
     ["fra", "ams"]),
    ("fly-performance-2x", "fly", 2000, 4096, 20, "registry.fly.io/slopbox-openclaw:2026.9.6",
     "performance-2x", ["fra", "ams"]),
]

PLANS = [
    dict(
        name="free", display_name="Free", is_default=True, price_cents_per_month=0,
        max_agents=1, max_vpses=1,
        max_bandwidth_bytes=5 * GB, max_storage_bytes=5 * GB,
        max_cpu_ms=20 * HOUR_MS, max_memory_mb_seconds=1024 * 3600 * 100,
        overage_bandwidth_cost_per_gb_cents=0, overage_storage_cost_per_gb_cents=0,
        overage_cpu_cost_per_hour_cents=0, overage_memory_cost_per_gb_hour_cents=0,
        configs=["local-small", "hetzner-cx23"],
    ),
    dict(
        name="starter", display_name="Starter", is_default=False, price_cents_per_month=900,
        max_agents=3, max_vpses=2,
        max_bandwidth_bytes=100 * GB, max_storage_bytes=40 * GB,
        max_cpu_ms=300 * HOUR_MS, max_memory_mb_seconds=4096 * 3600 * 730,
        overage_bandwidth_cost_per_gb_cents=2, overage_storage_cost_per_gb_cents=10,
        overage_cpu_cost_per_hour_cents=3, overage_memory_cost_per_gb_hour_cents=1,
        configs=["local-small", "hetzner-cx23", "fly-shared-2x"],
    ),
    dict(
        name="pro", display_name="Pro", is_default=False, price_cents_per_month=2900,
        max_agents=10, max_vpses=5,
        max_bandwidth_bytes=1000 * GB, max_storage_bytes=200 * GB,
        max_cpu_ms=2000 * HOUR_MS, max_memory_mb_seconds=8192 * 3600 * 730 * 2,
        overage_bandwidth_cost_per_gb_cents=1, overage_storage_cost_per_gb_cents=8,
        overage_cpu_cost_per_hour_cents=2, overage_memory_cost_per_gb_hour_cents=1,
        configs=["local-small", "hetzner-cx23", "hetzner-cx33", "fly-shared-2x", "fly-performance-2x"],
    ),
]


def seed(conn: Connection, *, local: bool = True) -> None:
    """Upsert plans and configs; `local=False` leaves out the local provider's configs."""
    seeded = set()
    for name, provider, cpu, mem, disk, image, stype, locs in VPS_CONFIGS:
        if provider == "local" and not local:
            continue
        seeded.add(name)
        conn.execute(
            text(
                "INSERT INTO vps_configs (name, provider, cpu_millicores, memory_mb, disk_gb, image, server_type,"
                " locations) VALUES (:name, :provider, :cpu, :mem, :disk, :image, :stype, CAST(:locs AS jsonb))"
                " ON CONFLICT (name) DO UPDATE SET provider = EXCLUDED.provider,"
                " cpu_millicores = EXCLUDED.cpu_millicores, memory_mb = EXCLUDED.memory_mb,"
                " disk_gb = EXCLUDED.disk_gb, image = EXCLUDED.image, server_type = EXCLUDED.server_type,"
                " locations = EXCLUDED.locations"
            ),
            dict(name=name, provider=provider, cpu=cpu, mem=mem, disk=disk, image=image, stype=stype,
                 locs=json.dumps(locs)),
        )
    for plan in PLANS:
        values = {k: v for k, v in plan.items() if k != "configs"}
        cols = ", ".join(values)
        params = ", ".join(f":{k}" for k in values)
        updates = ", ".join(f"{k} = EXCLUDED.{k}" for k in values if k != "name")
        conn.execute(
            text(f"INSERT INTO plans ({cols}) VALUES ({params}) ON CONFLICT (name) DO UPDATE SET {updates}"),  # noqa: S608
            values,
        )
        conn.execute(
            text(
                "INSERT INTO plan_vps_configs (plan_id, vps_config_id)"
                " SELECT p.id, c.id FROM plans p, vps_configs c WHERE p.name = :plan AND c.name = ANY(:configs)"
                " ON CONFLICT DO NOTHING"
            ),
            dict(plan=plan["name"], configs=[c for c in plan["configs"] if c in seeded]),
        )
