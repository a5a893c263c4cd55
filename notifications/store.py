"""Writing notifications: `notify_user` and `alert_admins`, inside the caller's transaction.

Durable delivery is an outbox: the row is written in the same transaction as whatever caused it
(an enforcement decision, a failed collection), with `email_status = 'pending'`; the
`EnforceUsage` workflow's `send_email` activity mails it later (activities/notifications.py) and
marks it sent under the row's lock. So a notification is never lost (it commits with its cause or
not at all) and never mailed twice.

A `dedupe_key` (unique per user) makes a notification idempotent: the 80% bandwidth warning of a
month, or the stop notice of one enforcement, is written once however often the check runs; the
second write returns None.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from db.models import Notification, User

KINDS = ("usage_warning", "overage_stop", "collection_failed", "provider_outage", "admin_alert", "info")
SEVERITIES = ("info", "warning", "critical")


async def notify_user(session: AsyncSession, user_id: uuid.UUID | str, *, kind: str, title: str, body: str,
                      severity: str = "info", dedupe_key: str | None = None, data: dict[str, Any] | None = None,
                      email: bool = True) -> uuid.UUID | None:
    """Add a notification for one user in `session`'s transaction (the caller commits).

    Returns its id, or None when one with the same `dedupe_key` already exists for this user.
    `email=False` keeps it out of the outbox (shown in the API only).
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}")
    if not 0 < len(kind) <= 32:
        raise ValueError("kind must be 1 to 32 characters (e.g. one of KINDS)")
    stmt = insert(Notification).values(
        user_id=uuid.UUID(str(user_id)), kind=kind, severity=severity, title=title[:200], body=body,
        data=data or {}, dedupe_key=dedupe_key, email_status="pending" if email else "skipped",
    ).on_conflict_do_nothing(constraint="uq_notifications_user_dedupe_key").returning(col(Notification.id))
    return (await session.exec(stmt)).scalar_one_or_none()  # type: ignore[call-overload,no-any-return]


async def alert_admins(session: AsyncSession, *, title: str, body: str, kind: str = "admin_alert",
                       severity: str = "warning", dedupe_key: str | None = None,
                       data: dict[str, Any] | None = None, email: bool = True) -> list[uuid.UUID]:
    """Notify every admin (`users.is_admin`) in `session`'s transaction; returns the new rows' ids.

    With a `dedupe_key` (e.g. `provider-outage:hetzner:2026-12-02T10`) each admin gets it once.
    """
    admins = (await session.exec(select(User.id).where(User.is_admin == True))).all()  # noqa: E712
    made = []
    for admin_id in admins:
        new = await notify_user(session, admin_id, kind=kind, title=title, body=body, severity=severity,
                                dedupe_key=dedupe_key, data=data, email=email)
        if new is not None:
            made.append(new)
    return made
