"""vps_operations; observed VM state and cleanup flag apart from the lifecycle state

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

One row per requested operation (provision, start, stop, destroy, settings, restart, channel
connect/disconnect): its outcome is what the API shows, so a failed push is never only in a
workflow result. Which operation runs is Temporal's business (one entity workflow per VPS), so the
VPS row no longer holds an operation slot. The VPS row keeps what the provider last reported
(`observed_state`) apart from the lifecycle `state`, and `needs_cleanup` says a VM may exist that
must go (a failed compensation or destroy), instead of an error-message prefix. The bootstrap token
is kept encrypted until redeemed so a retried create hands the same token to the VM it adopts.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

KINDS = ("provision", "start", "stop", "destroy", "settings", "restart", "channel_connect", "channel_disconnect")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    op.create_table(
        "vps_operations",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("vps_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("step", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["vps_id"], ["vpses.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_vps_operations_user_idempotency_key"),
        sa.CheckConstraint("kind IN (" + ", ".join(f"'{k}'" for k in KINDS) + ")", name="ck_vps_operations_kind"),
        sa.CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
                           name="ck_vps_operations_status"),
    )
    op.create_index("ix_vps_operations_vps_created", "vps_operations", ["vps_id", "created_at"])
    op.create_index("ix_vps_operations_active", "vps_operations", ["vps_id"],
                    postgresql_where=sa.text("status IN ('queued', 'running')"))
    op.drop_column("vpses", "operation_id")
    op.drop_column("vpses", "step")
    op.add_column("vpses", sa.Column("observed_state", sa.String(length=16), nullable=True))
    op.add_column("vpses", sa.Column("observed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("vpses", sa.Column("needs_cleanup", sa.Boolean(), server_default="false", nullable=False))
    op.add_column("vpses", sa.Column("bootstrap_token", sa.Text(), nullable=True))
    op.add_column("vpses", sa.Column("applied_settings_version", sa.Integer(), nullable=True))
    op.add_column("agents", sa.Column("settings_version", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    op.drop_column("agents", "settings_version")
    op.drop_column("vpses", "applied_settings_version")
    op.drop_column("vpses", "bootstrap_token")
    op.drop_column("vpses", "needs_cleanup")
    op.drop_column("vpses", "observed_at")
    op.drop_column("vpses", "observed_state")
    op.add_column("vpses", sa.Column("operation_id", sa.String(length=255), nullable=True))
    op.add_column("vpses", sa.Column("step", sa.String(length=64), nullable=True))
    op.drop_index("ix_vps_operations_active", table_name="vps_operations")
    op.drop_index("ix_vps_operations_vps_created", table_name="vps_operations")
    op.drop_table("vps_operations")
