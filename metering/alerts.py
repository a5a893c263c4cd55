"""Where metering problems go: today a structured log line; the notifications module plugs in here.

`notify_collection_problems` is the one function to point at the notifications module (admin
alert per unavailable provider; a notice to each user whose VPS could not be metered). Metering
problems never stop a VPS (PRD §8.3).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("metering.alerts")


async def notify_collection_problems(alerts: Sequence[Any], failed: Sequence[Any], *, until: int) -> None:
    """Admin alerts (provider unavailable) and failed-collection notices (per user), logged."""
    for alert in alerts:
        log.error("metering: provider unavailable (admin alert; nobody is stopped)",
                  extra={"provider": alert.provider, "problem": alert.message, "until": until})
    by_user: dict[str, list[str]] = {}
    for f in failed:
        by_user.setdefault(f.user_id, []).append(f.vps_id)
    for user_id, vps_ids in by_user.items():
        log.warning("metering: usage of the user's VPS could not be collected (will retry next cycle)",
                    extra={"user_id": user_id, "vps_ids": vps_ids, "until": until})
