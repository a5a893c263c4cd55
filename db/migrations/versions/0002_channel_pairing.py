"""agent_channels: WhatsApp pairing QR and live status

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

The current QR (a short-lived pairing secret, so encrypted like other credentials) and a version
number the API's long-poll compares against, so a frontend follows QR rotation without polling
the gateway. `live_status` keeps the gateway's last reported channel status.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("agent_channels", sa.Column("qr_data_url", sa.Text(), nullable=True))
    op.add_column("agent_channels", sa.Column("qr_version", sa.Integer(), server_default="0", nullable=False))
    op.add_column("agent_channels", sa.Column("qr_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("agent_channels", sa.Column("live_status", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.create_check_constraint("ck_agent_channels_status", "agent_channels",
                               "status IN ('pending', 'connecting', 'awaiting_scan', 'configured', 'connected', "
                               "'expired', 'cancelled', 'error')")


def downgrade() -> None:
    op.drop_constraint("ck_agent_channels_status", "agent_channels", type_="check")
    op.drop_column("agent_channels", "live_status")
    op.drop_column("agent_channels", "qr_expires_at")
    op.drop_column("agent_channels", "qr_version")
    op.drop_column("agent_channels", "qr_data_url")
