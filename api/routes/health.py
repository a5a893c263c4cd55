"""Probes for orchestrators: /healthz = the process answers, /readyz = its dependencies do."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.schemas import ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut,
            responses={503: {"model": ReadyOut, "description": "A dependency is unreachable"}})
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        async with request.app.state.sessions() as session:
            await asyncio.wait_for(session.exec(text("SELECT 1")), 3)  # type: ignore[call-overload]
        checks["database"] = "ok"
    except Exception as err:  # noqa: BLE001  (any failure means "not ready")
        checks["database"] = f"unreachable: {type(err).__name__}"
    try:
        client = await asyncio.wait_for(request.app.state.temporal(), 3)
        await asyncio.wait_for(client.service_client.check_health(), 3)
        checks["temporal"] = "ok"
    except Exception as err:  # noqa: BLE001
        checks["temporal"] = f"unreachable: {type(err).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)
