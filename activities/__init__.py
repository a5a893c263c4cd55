"""Every side effect the workflows orchestrate: providers, gateway RPC, database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from settings import Settings


async def build_activities(settings: Settings) -> list[Callable[..., Any]]:
    from activities.agent_ops import AgentActivities
    from activities.enforcement import EnforcementActivities
    from activities.metering import MeteringActivities
    from activities.notifications import NotificationActivities
    from db.engine import make_engine, session_factory

    engine = make_engine(settings, pool_size=10)
    sessions = session_factory(engine)
    return [*AgentActivities(settings, sessions).all(), *EnforcementActivities(settings, sessions).all(),
            *NotificationActivities(settings, sessions).all(), *MeteringActivities(settings, engine).all()]
