"""users.password_hash for the web app's email + password sign-in

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

Auth.js's own schema has no password column (its credentials provider leaves storage to the app),
so the web app (web/) keeps an argon2 hash here. NULL = the user has no password (created by the
CLI, or a future OAuth sign-in). The adapter's `select * from users` simply carries the extra column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("password_hash", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "password_hash")
