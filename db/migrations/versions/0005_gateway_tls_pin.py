"""vpses.gateway_url, vpses.gateway_cert_sha256: the gateway's address and its pinned certificate

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A cloud VM generates its gateway's TLS key and self-signed certificate at first boot and reports
the certificate's SHA-256 with /bootstrap/ready; the control plane and the proxy connect with
wss:// / https:// trusting exactly that certificate. The URL is stored too, so the proxy reads
both from the row and never builds a provider client. Local VMs (plain loopback) get their
http:// URL backfilled here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("vpses", sa.Column("gateway_url", sa.String(255), nullable=True))
    op.add_column("vpses", sa.Column("gateway_cert_sha256", sa.String(64), nullable=True))
    op.execute(
        "UPDATE vpses SET gateway_url = 'http://' || coalesce(host, '127.0.0.1') || ':' || "
        "coalesce(gateway_port, 18789) WHERE provider = 'local' AND gateway_port IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_column("vpses", "gateway_cert_sha256")
    op.drop_column("vpses", "gateway_url")
