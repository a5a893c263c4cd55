"""Metering: per-VPS watermark, daily series, provider bandwidth, closed months, statements

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

`vps_meter_state.collected_until` is the per-VPS watermark written in the same transaction as the
counters (compare-and-set), so a sample is counted exactly once. `vps_usage_periods` keeps its
columns and meaning (this month's cumulative counters per VPS) and gains the provider's own
bandwidth count and the top-up the collector added over the proxies' count (billable bandwidth =
max of the two), the bandwidth already carried into the daily series, and `frozen_at`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_NEW_USAGE_COLUMNS = ("provider_bandwidth_in_bytes", "provider_bandwidth_out_bytes", "provider_topup_in_bytes",
                      "provider_topup_out_bytes", "daily_seen_in_bytes", "daily_seen_out_bytes")
_COUNTERS = ("bandwidth_in_bytes", "bandwidth_out_bytes", "cpu_ms", "memory_mb_seconds", "storage_bytes")


def upgrade() -> None:
    for name in _NEW_USAGE_COLUMNS:
        op.add_column("vps_usage_periods", sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))
        op.create_check_constraint(f"ck_usage_{name}_nonneg", "vps_usage_periods", f"{name} >= 0")
    op.add_column("vps_usage_periods", sa.Column("frozen_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "vps_meter_state",
        sa.Column("vps_id", sa.UUID(), nullable=False),
        sa.Column("collected_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("counter_ref", sa.String(64), nullable=True),
        sa.Column("counter_cpu_ms", sa.BigInteger(), nullable=True),
        sa.Column("stale", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["vps_id"], ["vpses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vps_id"),
    )
    op.create_index("ix_vps_meter_state_collected_until", "vps_meter_state", ["collected_until"])
    op.create_table(
        "vps_usage_daily",
        sa.Column("vps_id", sa.UUID(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        *[sa.Column(c, sa.BigInteger(), server_default="0", nullable=False) for c in _COUNTERS],
        sa.ForeignKeyConstraint(["vps_id"], ["vpses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vps_id", "day"),
        *[sa.CheckConstraint(f"{c} >= 0", name=f"ck_usage_daily_{c}_nonneg") for c in _COUNTERS],
    )
    op.create_table(
        "metering_months",
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("period_start"),
        sa.CheckConstraint("extract(day from period_start) = 1", name="ck_metering_months_month_start"),
    )
    op.create_table(
        "usage_statements",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("plan_id", sa.UUID(), nullable=True),
        sa.Column("bandwidth_bytes", sa.BigInteger(), nullable=False),
        sa.Column("cpu_ms", sa.BigInteger(), nullable=False),
        sa.Column("memory_mb_seconds", sa.BigInteger(), nullable=False),
        sa.Column("storage_bytes", sa.BigInteger(), nullable=False),
        sa.Column("overage_cost_cents", sa.BigInteger(), nullable=False),
        sa.Column("budget_cents", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "period_start", name="uq_usage_statements_user_month"),
        sa.CheckConstraint("overage_cost_cents >= 0", name="ck_usage_statements_cost_nonneg"),
    )


def downgrade() -> None:
    op.drop_table("usage_statements")
    op.drop_table("metering_months")
    op.drop_table("vps_usage_daily")
    op.drop_index("ix_vps_meter_state_collected_until", table_name="vps_meter_state")
    op.drop_table("vps_meter_state")
    op.drop_column("vps_usage_periods", "frozen_at")
    for name in reversed(_NEW_USAGE_COLUMNS):
        op.drop_constraint(f"ck_usage_{name}_nonneg", "vps_usage_periods", type_="check")
        op.drop_column("vps_usage_periods", name)
