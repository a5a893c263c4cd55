"""The current user's notifications: list (newest first, with the unread count) and mark read.

Every query is scoped to the user: another user's notification id is a 404, like one that never
existed. Notifications are written by the worker (threshold warnings, automatic stops, failed
collections; notifications/store.py) and emailed through an outbox; here they are only read.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import CurrentUser, SessionDep
from api.problems import Problem
from api.schemas import NotificationOut, NotificationPage, NotificationsMarked, problem_responses
from db.models import Notification, User

router = APIRouter(prefix="/users/me/notifications", tags=["notifications"])


def _out(row: Notification) -> NotificationOut:
    return NotificationOut(id=row.id, kind=row.kind, severity=row.severity, title=row.title,  # type: ignore[arg-type]
                           body=row.body, data=row.data, created_at=row.created_at,  # type: ignore[arg-type]
                           read_at=row.read_at, emailed_at=row.emailed_at)


async def _unread(session: AsyncSession, user: User) -> int:
    return int((await session.exec(select(func.count()).select_from(Notification).where(
        Notification.user_id == user.id, col(Notification.read_at).is_(None)))).one())


@router.get("", response_model=NotificationPage)
async def list_notifications(
    session: SessionDep, user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    unread: Annotated[bool, Query(description="Only unread ones")] = False,
) -> NotificationPage:
    scope = select(Notification).where(Notification.user_id == user.id)
    if unread:
        scope = scope.where(col(Notification.read_at).is_(None))
    total = (await session.exec(select(func.count()).select_from(scope.subquery()))).one()
    rows = (await session.exec(scope.order_by(col(Notification.created_at).desc(), col(Notification.id).desc())
                               .limit(limit).offset(offset))).all()
    return NotificationPage(items=[_out(r) for r in rows], unread_count=await _unread(session, user), total=total,
                            limit=limit, offset=offset)


@router.post("/read-all", response_model=NotificationsMarked)
async def mark_all_read(session: SessionDep, user: CurrentUser) -> NotificationsMarked:
    result = await session.exec(update(Notification).where(  # type: ignore[call-overload]
        col(Notification.user_id) == user.id, col(Notification.read_at).is_(None)).values(read_at=datetime.now(UTC)))
    await session.commit()
    return NotificationsMarked(marked=result.rowcount, unread_count=await _unread(session, user))


@router.post("/{notification_id}/read", response_model=NotificationOut, responses=problem_responses(404))
async def mark_read(notification_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> NotificationOut:
    """Idempotent: an already read notification keeps its first `read_at`."""
    row = (await session.exec(select(Notification).where(
        Notification.id == notification_id, Notification.user_id == user.id))).first()
    if row is None:
        raise Problem(404, "Notification not found", f"No notification {notification_id}.", type_="not-found")
    if row.read_at is None:
        row.read_at = datetime.now(UTC)
        session.add(row)
        await session.commit()
        await session.refresh(row)
    return _out(row)
