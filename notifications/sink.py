"""A local SMTP sink for `slopbox dev`: accepts every message and logs it, delivers nothing.

`slopbox mail-sink` (run by `slopbox dev` as the supervised `mail` service when SMTP_HOST is not
set) listens on 127.0.0.1:SLOPBOX_MAIL_SINK_PORT with aiosmtpd and writes one JSON log line per
message (from, to, subject, body) to `logs/mail.log`, so the notification email of a demo user
stopped for overage can be read there. Loopback only, no auth, no TLS: a development tool.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("mail")
MAX_BODY_LOGGED = 4000


def summarize(raw: bytes) -> dict[str, Any]:
    msg = message_from_bytes(raw, policy=policy.default)
    body = ""
    if isinstance(msg, EmailMessage):
        part = msg.get_body(preferencelist=("plain",))
        if part is not None:
            body = str(part.get_content())
    return {"subject": str(msg.get("Subject", "")), "message_id": str(msg.get("Message-ID", "")),
            "body": body[:MAX_BODY_LOGGED]}


class LoggingHandler:
    """aiosmtpd handler: log the message, answer 250."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.original_content or b""
        event = {"mail_from": envelope.mail_from, "rcpt_to": list(envelope.rcpt_tos), **summarize(raw)}
        self.received.append(event)
        log.info("mail received", extra=event)
        return "250 Message accepted for delivery (dev sink: not delivered)"


async def serve(host: str, port: int, handler: LoggingHandler | None = None) -> asyncio.Server:
    handler = handler or LoggingHandler()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SMTP(handler, hostname="slopbox-dev-sink"), host, port)


async def run(host: str, port: int) -> None:
    server = await serve(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("mail sink listening", extra={"host": host, "port": port})
    async with server:
        await stop.wait()
