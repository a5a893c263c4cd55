"""Email over SMTP (aiosmtplib): one message per notification.

The Message-ID is derived from the notification id, so the rare duplicate SMTP itself cannot rule
out (the server accepted the message and the process died before recording it) carries the same
id as the original and mail clients collapse the two.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import aiosmtplib

from db.models import Notification
from settings import Settings


class EmailRejected(Exception):
    """The server refused the message for good (5xx): retrying will not help."""


def build_message(settings: Settings, to: str, notification: Notification) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.smtp_from
    msg["To"] = to
    msg["Subject"] = f"[Slopbox] {notification.title}"
    msg["Message-ID"] = f"<notification-{notification.id}@slopbox>"
    if notification.created_at is not None:
        msg["Date"] = format_datetime(notification.created_at)
    msg["X-Slopbox-Notification"] = f"{notification.kind}; id={notification.id}"
    msg.set_content(f"{notification.body}\n\n-- \nSlopbox notifications: GET /users/me/notifications\n")
    return msg


async def send(settings: Settings, msg: EmailMessage) -> None:
    """Deliver to SMTP_HOST. Raises `EmailRejected` for a permanent refusal, `aiosmtplib.SMTPException`
    or `OSError` for what a retry may fix (connection refused, timeouts, 4xx)."""
    if settings.smtp_host is None:
        raise RuntimeError("SMTP_HOST is not set")
    kwargs: dict[str, Any] = {}
    if settings.smtp_user:
        kwargs["username"] = settings.smtp_user
        kwargs["password"] = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
    try:
        await aiosmtplib.send(msg, hostname=settings.smtp_host, port=settings.smtp_port,
                              start_tls=settings.smtp_starttls, timeout=settings.smtp_timeout_s, **kwargs)
    except aiosmtplib.SMTPRecipientsRefused as err:
        if all(500 <= r.code < 600 for r in err.recipients):
            raise EmailRejected(str(err)) from None
        raise
    except aiosmtplib.SMTPResponseException as err:
        if 500 <= err.code < 600 and not isinstance(err, aiosmtplib.SMTPServerDisconnected):
            raise EmailRejected(f"{err.code} {err.message}") from None
        raise


__all__ = ["EmailRejected", "build_message", "send"]
