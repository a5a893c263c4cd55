"""Which plan governs a user, and the calendar month usage and budgets belong to."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from db.models import Plan, User


def month_start(now: datetime | None = None) -> date:
    now = now or datetime.now(UTC)
    return date(now.year, now.month, 1)


async def effective_plan(session: AsyncSession, user: User) -> Plan:
    """The user's plan, or the default plan for users Auth.js created without one."""
    if user.plan_id is not None:
        plan = await session.get(Plan, user.plan_id)
        if plan is not None:
            return plan
    plan = (await session.exec(select(Plan).where(Plan.is_default == True))).first()  # noqa: E712
    if plan is None:
        raise LookupError("no default plan: run `slopbox migrate` to seed plans")
    return plan
