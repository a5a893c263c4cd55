"""vpses.relay_device_token: the UI-relay identity's device token, for the proxy's HTTP requests

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

The gateway proxy authenticates the Control UI's plain HTTP requests (control-ui-config.json,
avatars, media) as the UI-relay identity, whose token carries only the relay's scopes
(read/write/approvals/questions), instead of the owner-level gateway token. Pairing stores it,
encrypted like the other secrets on the row (EncryptedText).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("vpses", sa.Column("relay_device_token", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("vpses", "relay_device_token")
