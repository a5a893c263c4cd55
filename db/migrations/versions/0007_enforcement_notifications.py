"""usage enforcement and notifications: usage_enforcements, notifications, users.usage_exempt, budget revision

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

`usage_enforcements`: one row per user, period and overage-budget revision when `EnforceUsage`
stopped (or, for an exempt user, would have stopped) their VPSes. `notifications`: what the user
is told, with an email outbox (`email_status`, `emailed_at`) and a per-user unique `dedupe_key` so
a warning or a stop notice is written once however often the check runs. `users.usage_exempt`: an
admin's exemption. `overage_budgets.revision`: bumped on every budget change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("usage_exempt", sa.Boolean(), server_default="false", nullable=False))
    op.add_column("overage_budgets", sa.Column("revision", sa.BigInteger(), server_default="1", nullable=False))
    op.create_table(
        "usage_enforcements",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("period_start", sa.Date(), nullable=False),
        sa.Column("budget_revision", sa.BigInteger(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("overage_cents", sa.BigInteger(), nullable=False),
        sa.Column("budget_cents", sa.BigInteger(), nullable=False),
        sa.Column("vps_ids", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"),
                  nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "period_start", "budget_revision",
                            name="uq_usage_enforcements_user_period_revision"),
        sa.CheckConstraint("decision IN ('stop', 'exempt')", name="ck_usage_enforcements_decision"),
        sa.CheckConstraint("extract(day from period_start) = 1", name="ck_usage_enforcements_month_start"),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), server_default="info", nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column("dedupe_key", sa.String(length=255), nullable=True),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("emailed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("email_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "dedupe_key", name="uq_notifications_user_dedupe_key"),
        sa.CheckConstraint("severity IN ('info', 'warning', 'critical')", name="ck_notifications_severity"),
        sa.CheckConstraint("email_status IN ('pending', 'sent', 'skipped')", name="ck_notifications_email_status"),
    )
    op.create_index("ix_notifications_user_created", "notifications", ["user_id", sa.text("created_at DESC"),
                                                                       sa.text("id DESC")])
    op.create_index("ix_notifications_outbox", "notifications", ["created_at"],
                    postgresql_where=sa.text("email_status = 'pending'"))


def downgrade() -> None:
    op.drop_index("ix_notifications_outbox", table_name="notifications")
    op.drop_index("ix_notifications_user_created", table_name="notifications")
    op.drop_table("notifications")
    op.drop_table("usage_enforcements")
    op.drop_column("overage_budgets", "revision")
    op.drop_column("users", "usage_exempt")
