"""vps_operations.retrying: the failed attempt of the step Temporal is retrying

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03

Temporal retries a failed activity by itself, so an operation whose provider answers 503 for ten
minutes used to show only `running` on the same step, with no reason, until the retries ran out.
While a step is retried this column holds its last failed attempt (activities/attempts.py); the
API shows it on a running operation. NULL when the step has not failed.
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE vps_operations ADD COLUMN retrying jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE vps_operations DROP COLUMN retrying")
