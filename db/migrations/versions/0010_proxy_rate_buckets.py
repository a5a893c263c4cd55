"""proxy_rate_buckets: per-user token buckets shared by every proxy process

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

With `PROXY_PROCESSES` > 1 each proxy process leases slices of a user's request, frame and byte
budgets from one row here (proxy/shared_limits.py), so the per-user limits hold across processes.
UNLOGGED: a bucket is a few seconds of state; after a crash an empty table only means full buckets,
and no WAL is written for the hot updates.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE UNLOGGED TABLE proxy_rate_buckets (
            key text PRIMARY KEY,
            tokens double precision NOT NULL,
            granted double precision NOT NULL DEFAULT 0,
            stamp timestamptz NOT NULL DEFAULT now()
        )
    """)


def downgrade() -> None:
    op.execute("DROP TABLE proxy_rate_buckets")
