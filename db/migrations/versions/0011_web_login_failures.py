"""web_login_failures: failed logins (and reset requests) seen by every web process

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03

The web app's login rate limit lived in each process's memory, so N web processes let a password
guesser try N times as often. Each failure is now a row here (web/auth.py LoginLimiter), keyed by
the SHA-256 of the email or the client address (neither is stored), counted over a sliding window
and swept once older than it.
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE web_login_failures (
            scope text NOT NULL,
            key bytea NOT NULL,
            at timestamptz NOT NULL DEFAULT now()
        )
    """)
    op.execute("CREATE INDEX ix_web_login_failures_key ON web_login_failures (scope, key, at)")
    op.execute("CREATE INDEX ix_web_login_failures_at ON web_login_failures (at)")


def downgrade() -> None:
    op.execute("DROP TABLE web_login_failures")
