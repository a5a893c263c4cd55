"""admin_audit_log; plans and VPS configs can be deactivated

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

Every admin action is one `admin_audit_log` row written in the action's own transaction: who
(the admin's id, and their email as it was, so the row outlives the account), what (`action`),
on what (`target_type`, `target_id`), the operation id when the action was submitted to a VPS's
entity workflow, and the details (the request's changes). Rows are never updated or deleted by
the application.

A plan or VPS config that is in use cannot be deleted (users keep their plan, VPS rows keep their
config); an admin deactivates it instead (`deactivated_at`): it is no longer offered to new users
or new VPSes, and existing ones keep working.

`users.usage_exempt`, which the admin API switches, comes from 0007.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("admin_user_id", sa.UUID(), nullable=True),
        sa.Column("admin_email", sa.String(length=255), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=255), nullable=False),
        sa.Column("operation_id", sa.String(length=255), nullable=True),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["admin_user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_admin_audit_log_created", "admin_audit_log", [sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("ix_admin_audit_log_target", "admin_audit_log", ["target_type", "target_id"])
    op.add_column("plans", sa.Column("deactivated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("vps_configs", sa.Column("deactivated_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("vps_configs", "deactivated_at")
    op.drop_column("plans", "deactivated_at")
    op.drop_index("ix_admin_audit_log_target", table_name="admin_audit_log")
    op.drop_index("ix_admin_audit_log_created", table_name="admin_audit_log")
    op.drop_table("admin_audit_log")
