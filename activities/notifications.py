"""The email outbox: list pending notifications, send one (exactly once per row).

`send_email` holds the notification's row lock from the check to the commit that marks it sent,
so two senders (a retried activity racing its first attempt, two workflow runs) never both mail
it: the second waits, then finds it sent. A failed attempt is counted on the row (its own short
transaction) and raised: Temporal retries it, and a row still pending after the workflow's
retries is picked up by the next run. Users without an address, and a control plane without
SMTP_HOST, get the notification in the API only (`skipped`).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import aiosmtplib
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from db.models import Notification, User
from notifications.email import EmailRejected, build_message, send
from settings import Settings
from workflows.contracts import Act, EmailOutcome

log = logging.getLogger(__name__)


class NotificationActivities:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self.sessions = sessions

    def all(self) -> list[object]:
        return [self.pending_emails, self.send_email]

    @activity.defn(name=Act.pending_emails)
    async def pending_emails(self, limit: int) -> list[str]:
        async with self.sessions() as s:
            rows = (await s.exec(select(Notification.id).where(Notification.email_status == "pending")
                                 .order_by(col(Notification.created_at)).limit(limit))).all()
        return [str(r) for r in rows]

    async def _failed(self, notification_id: uuid.UUID, error: str, *, give_up: bool) -> None:
        values: dict[str, object] = {"email_attempts": col(Notification.email_attempts) + 1,
                                     "email_error": error[:1000]}
        if give_up:
            values["email_status"] = "skipped"
        async with self.sessions() as s, s.begin():
            await s.exec(update(Notification).where(col(Notification.id) == notification_id)  # type: ignore[call-overload]
                         .values(**values))

    @activity.defn(name=Act.send_email)
    async def send_email(self, notification_id: str) -> EmailOutcome:
        nid = uuid.UUID(notification_id)
        error: str | None = None
        rejected = False
        async with self.sessions() as s, s.begin():
            found = (await s.exec(select(Notification, User.email).join(User, col(User.id) == col(Notification.user_id))
                                  .where(Notification.id == nid).with_for_update(of=Notification))).first()
            if found is None:
                return EmailOutcome(notification_id=notification_id, outcome="gone")
            row, address = found
            if row.email_status == "sent":
                return EmailOutcome(notification_id=notification_id, outcome="already")
            if row.email_status != "pending":
                return EmailOutcome(notification_id=notification_id, outcome=row.email_status)
            if self.settings.smtp_host is None or not address:
                row.email_status = "skipped"
                row.email_error = "no SMTP_HOST configured" if self.settings.smtp_host is None else "no email address"
                s.add(row)
                return EmailOutcome(notification_id=notification_id, outcome="skipped")
            try:
                await send(self.settings, build_message(self.settings, address, row))
            except EmailRejected as err:
                error, rejected = f"rejected: {err}", True
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as err:
                error = f"{type(err).__name__}: {err}"
            else:
                row.email_status, row.emailed_at = "sent", datetime.now(UTC)
                row.email_attempts += 1
                row.email_error = None
                s.add(row)
        if error is None:
            log.info("notification emailed", extra={"notification_id": notification_id, "kind": row.kind})
            return EmailOutcome(notification_id=notification_id, outcome="sent")
        await self._failed(nid, error, give_up=rejected)
        log.warning("notification email failed", extra={"notification_id": notification_id, "error": error})
        if rejected:
            return EmailOutcome(notification_id=notification_id, outcome="rejected")
        raise ApplicationError(f"sending the email failed: {error}", type="EmailFailed")
