"""Where metering problems go: a log line, an admin alert per unavailable provider, and a notice to
each user whose VPS could not be metered. Metering problems never stop a VPS (PRD §8.3).

Both kinds of row are deduplicated per hour (admins) or per day (users), so a provider that stays
down for a day alerts each admin once an hour, not once a cycle; the user's notice is API-only
(it asks nothing of them, the next cycle catches up).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession

from notifications.store import alert_admins, notify_user

log = logging.getLogger("metering.alerts")


async def notify_collection_problems(engine: AsyncEngine, alerts: Sequence[Any], failed: Sequence[Any], *,
                                     until: int) -> None:
    """Admin alerts (provider unavailable) and failed-collection notices (per user), in one transaction."""
    at = datetime.fromtimestamp(until, UTC)
    by_user: dict[str, list[str]] = {}
    for f in failed:
        by_user.setdefault(f.user_id, []).append(f.vps_id)
    async with AsyncSession(engine) as session, session.begin():
        for alert in alerts:
            log.error("metering: provider unavailable (admin alert; nobody is stopped)",
                      extra={"provider": alert.provider, "problem": alert.message, "until": until})
            await alert_admins(
                session, kind="provider_outage", severity="warning",
                title=f"Metering: {alert.provider} unavailable",
                body=f"Usage could not be collected from {alert.provider}: {alert.message}. Nobody is stopped "
                     "on missing data; the next cycle collects the gap.",
                dedupe_key=f"provider-outage:{alert.provider}:{at:%Y-%m-%dT%H}",
                data={"provider": alert.provider, "until": until})
        for user_id, vps_ids in by_user.items():
            log.warning("metering: usage of the user's VPS could not be collected (will retry next cycle)",
                        extra={"user_id": user_id, "vps_ids": vps_ids, "until": until})
            await notify_user(
                session, user_id, kind="collection_failed", severity="info",
                title="Usage figures are delayed",
                body="We could not read your agent's latest usage from its cloud provider. Your usage page may "
                     "lag behind for a while; nothing is lost and your agent keeps running.",
                dedupe_key=f"collection-failed:{at:%Y-%m-%d}", data={"vps_ids": vps_ids}, email=False)
