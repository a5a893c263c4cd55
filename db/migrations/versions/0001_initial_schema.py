"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-30

All twelve tables of PRD §5. The four Auth.js tables keep the @auth/pg-adapter column names
(quoted camelCase) with UUID ids; the foreign keys to users cascade because the adapter's
deleteUser removes the user row first. Encrypted columns are plain text holding Fernet
ciphertext (db.encryption).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("is_default", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("price_cents_per_month", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_agents", sa.Integer(), nullable=False),
        sa.Column("max_vpses", sa.Integer(), nullable=False),
        sa.Column("max_bandwidth_bytes", sa.BigInteger(), nullable=False),
        sa.Column("max_storage_bytes", sa.BigInteger(), nullable=False),
        sa.Column("max_cpu_ms", sa.BigInteger(), nullable=False),
        sa.Column("max_memory_mb_seconds", sa.BigInteger(), nullable=False),
        sa.Column("overage_bandwidth_cost_per_gb_cents", sa.Integer(), nullable=False),
        sa.Column("overage_storage_cost_per_gb_cents", sa.Integer(), nullable=False),
        sa.Column("overage_cpu_cost_per_hour_cents", sa.Integer(), nullable=False),
        sa.Column("overage_memory_cost_per_gb_hour_cents", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.CheckConstraint("price_cents_per_month >= 0", name="ck_plans_price_cents_per_month_nonneg"),
        sa.CheckConstraint("max_agents >= 0", name="ck_plans_max_agents_nonneg"),
        sa.CheckConstraint("max_vpses >= 0", name="ck_plans_max_vpses_nonneg"),
        sa.CheckConstraint("max_bandwidth_bytes >= 0", name="ck_plans_max_bandwidth_bytes_nonneg"),
        sa.CheckConstraint("max_storage_bytes >= 0", name="ck_plans_max_storage_bytes_nonneg"),
        sa.CheckConstraint("max_cpu_ms >= 0", name="ck_plans_max_cpu_ms_nonneg"),
        sa.CheckConstraint("max_memory_mb_seconds >= 0", name="ck_plans_max_memory_mb_seconds_nonneg"),
        sa.CheckConstraint(
            "overage_bandwidth_cost_per_gb_cents >= 0",
            name="ck_plans_overage_bandwidth_cost_per_gb_cents_nonneg",
        ),
        sa.CheckConstraint(
            "overage_storage_cost_per_gb_cents >= 0", name="ck_plans_overage_storage_cost_per_gb_cents_nonneg"
        ),
        sa.CheckConstraint(
            "overage_cpu_cost_per_hour_cents >= 0", name="ck_plans_overage_cpu_cost_per_hour_cents_nonneg"
        ),
        sa.CheckConstraint(
            "overage_memory_cost_per_gb_hour_cents >= 0",
            name="ck_plans_overage_memory_cost_per_gb_hour_cents_nonneg",
        ),
    )
    op.create_table(
        "verification_token",
        sa.Column("identifier", sa.Text(), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("identifier", "token"),
    )
    op.create_table(
        "vps_configs",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("cpu_millicores", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("disk_gb", sa.Integer(), nullable=False),
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column("server_type", sa.String(length=64), nullable=True),
        sa.Column("locations", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.CheckConstraint("provider IN ('hetzner', 'fly', 'local')", name="ck_vps_configs_provider"),
        sa.CheckConstraint(
            "cpu_millicores > 0 AND memory_mb > 0 AND disk_gb > 0", name="ck_vps_configs_sizes"
        ),
        sa.CheckConstraint("jsonb_typeof(locations) = 'array'", name="ck_vps_configs_locations_array"),
    )
    op.create_table(
        "plan_vps_configs",
        sa.Column("plan_id", sa.UUID(), nullable=False),
        sa.Column("vps_config_id", sa.UUID(), nullable=False),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["vps_config_id"], ["vps_configs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("plan_id", "vps_config_id"),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("emailVerified", sa.DateTime(timezone=True), nullable=True),
        sa.Column("image", sa.Text(), nullable=True),
        sa.Column("plan_id", sa.UUID(), nullable=True),
        sa.Column("is_admin", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("userId", sa.UUID(), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("provider", sa.String(length=255), nullable=False),
        sa.Column("providerAccountId", sa.String(length=255), nullable=False),
        sa.Column("refresh_token", sa.Text(), nullable=True),
        sa.Column("access_token", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("id_token", sa.Text(), nullable=True),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("session_state", sa.Text(), nullable=True),
        sa.Column("token_type", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["userId"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "overage_budgets",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("budget_cents", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "period_start", name="uq_overage_budgets_user_month"),
        sa.CheckConstraint("budget_cents >= 0", name="ck_overage_budgets_nonneg"),
        sa.CheckConstraint("extract(day from period_start) = 1", name="ck_overage_budgets_month_start"),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("userId", sa.UUID(), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sessionToken", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["userId"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sessionToken"),
    )
    op.create_table(
        "vpses",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("vps_config_id", sa.UUID(), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("provider_ref", sa.String(length=255), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("operation_id", sa.String(length=255), nullable=True),
        sa.Column("region", sa.String(length=64), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("gateway_port", sa.Integer(), nullable=True),
        sa.Column("admin_device_key", sa.Text(), nullable=True),
        sa.Column("admin_device_token", sa.Text(), nullable=True),
        sa.Column("relay_device_key", sa.Text(), nullable=True),
        sa.Column("bootstrap_token_sha256", sa.String(length=64), nullable=True),
        sa.Column("bootstrap_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("bootstrap_redeemed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ready_reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "state_changed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["vps_config_id"], ["vps_configs.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("bootstrap_token_sha256"),
        sa.UniqueConstraint("provider", "provider_ref", name="uq_vpses_provider_ref"),
        sa.CheckConstraint("provider IN ('hetzner', 'fly', 'local')", name="ck_vpses_provider"),
        sa.CheckConstraint(
            "state IN ('provisioning', 'running', 'stopped', 'destroyed', 'error')", name="ck_vpses_state"
        ),
        sa.CheckConstraint(
            "gateway_port IS NULL OR gateway_port BETWEEN 1 AND 65535", name="ck_vpses_gateway_port"
        ),
    )
    op.create_index(op.f("ix_vpses_user_id"), "vpses", ["user_id"], unique=False)
    op.create_table(
        "agents",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("gateway_token", sa.Text(), nullable=False),
        sa.Column("gateway_token_last4", sa.String(length=4), nullable=False),
        sa.Column("vps_id", sa.UUID(), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column(
            "personality",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["vps_id"], ["vpses.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "name", name="uq_agents_user_name"),
        sa.UniqueConstraint("vps_id"),
        sa.CheckConstraint("length(btrim(name)) > 0", name="ck_agents_name_not_blank"),
        sa.CheckConstraint("length(gateway_token_last4) = 4", name="ck_agents_token_last4"),
    )
    op.create_index(
        "ix_accounts_provider_account", "accounts", ["provider", "providerAccountId"], unique=True
    )
    op.create_index("ix_accounts_user_id", "accounts", ["userId"])
    op.create_index("ix_sessions_user_id", "sessions", ["userId"])
    op.create_index("ix_vpses_state", "vpses", ["state"])
    op.create_index(op.f("ix_agents_user_id"), "agents", ["user_id"], unique=False)
    op.create_table(
        "vps_usage_periods",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("vps_id", sa.UUID(), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("bandwidth_in_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("bandwidth_out_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cpu_ms", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("memory_mb_seconds", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("storage_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["vps_id"], ["vpses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("vps_id", "period_start", name="uq_vps_usage_periods_vps_month"),
        sa.CheckConstraint("bandwidth_in_bytes >= 0", name="ck_usage_bandwidth_in_bytes_nonneg"),
        sa.CheckConstraint("bandwidth_out_bytes >= 0", name="ck_usage_bandwidth_out_bytes_nonneg"),
        sa.CheckConstraint("cpu_ms >= 0", name="ck_usage_cpu_ms_nonneg"),
        sa.CheckConstraint("memory_mb_seconds >= 0", name="ck_usage_memory_mb_seconds_nonneg"),
        sa.CheckConstraint("storage_bytes >= 0", name="ck_usage_storage_bytes_nonneg"),
        sa.CheckConstraint("extract(day from period_start) = 1", name="ck_usage_period_is_month_start"),
    )
    op.create_table(
        "agent_channels",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("agent_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("credentials", sa.Text(), nullable=True),
        sa.Column("webhook_secret", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=32), server_default="pending", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("agent_id", "kind", name="uq_agent_channels_agent_kind"),
        sa.CheckConstraint(
            "kind IN ('whatsapp', 'telegram', 'discord', 'slack', 'signal')", name="ck_agent_channels_kind"
        ),
    )


def downgrade() -> None:
    op.drop_table("agent_channels")
    op.drop_table("vps_usage_periods")
    op.drop_index(op.f("ix_agents_user_id"), table_name="agents")
    op.drop_table("agents")
    op.drop_index(op.f("ix_vpses_user_id"), table_name="vpses")
    op.drop_index("ix_vpses_state", table_name="vpses")
    op.drop_table("vpses")
    op.drop_index("ix_sessions_user_id", table_name="sessions")
    op.drop_table("sessions")
    op.drop_table("overage_budgets")
    op.drop_index("ix_accounts_user_id", table_name="accounts")
    op.drop_index("ix_accounts_provider_account", table_name="accounts")
    op.drop_table("accounts")
    op.drop_table("users")
    op.drop_table("plan_vps_configs")
    op.drop_table("vps_configs")
    op.drop_table("verification_token")
    op.drop_table("plans")
