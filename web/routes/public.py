"""Pages for everyone: the landing page with pricing, and the health check."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from web.api_client import ApiError
from web.pages import api_for, render, signed_in

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse)
async def landing(request: Request) -> Response:
    user = await signed_in(request)
    try:  # pricing for everyone, signed in or not
        plans: list[dict[str, Any]] = await api_for(request, user.id if user else None).get("/plans")
    except ApiError:
        plans = []
    return render(request, "landing.html", plans=plans)
