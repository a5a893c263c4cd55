"""The bell's page: the user's notifications (newest first, paged) with mark-read and mark-all-read."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from web.api_client import ApiError
from web.pages import PageError, form, render, require_user

router = APIRouter(prefix="/notifications")
PAGE = 20


@router.get("", response_class=HTMLResponse)
async def notifications(request: Request, offset: int = 0, unread: bool = False) -> Response:
    _user, api = await require_user(request)
    offset = max(0, min(offset, 1_000_000))
    page = await api.get(f"/users/me/notifications?limit={PAGE}&offset={offset}&unread={str(unread).lower()}")
    return render(request, "notifications.html", page=page, unread=page["unread_count"], only_unread=unread,
                  offset=offset, size=PAGE)


@router.post("/read-all")
async def read_all(request: Request) -> Response:
    _user, api = await require_user(request)
    await form(request)
    await api.post("/users/me/notifications/read-all")
    return RedirectResponse("/notifications", status_code=303)


@router.post("/{notification_id}/read")
async def read_one(request: Request, notification_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    await form(request)
    try:
        await api.post(f"/users/me/notifications/{notification_id}/read")
    except ApiError as err:
        if err.status == 404:  # another user's id reads like one that never existed
            raise PageError(404, "Notification not found", "There is no such notification in your account.") from None
        raise
    return RedirectResponse("/notifications", status_code=303)
