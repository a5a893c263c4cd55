"""The signed-in user's agents: dashboard, new agent, the agent page and its lifecycle buttons."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from web.api_client import ApiError, ControlPlane
from web.charts import bar_chart
from web.pages import PageError, ctx, form, log, readable, render, require_user, unread
from web.presets import PRESETS

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request) -> Response:
    _user, api = await require_user(request)
    page = await api.get("/agents?limit=100")
    return render(request, "dashboard.html", agents=page["items"], unread=await unread(api), presets=PRESETS)

@router.post("/agents")
async def new_agent(request: Request) -> Response:
    _user, api = await require_user(request)
    fields = await form(request)
    preset = fields.get("preset", "helpful")
    if preset not in PRESETS:
        preset = "helpful"
    try:
        agent = await api.post("/agents", {"name": fields.get("name", "")})
    except ApiError as err:
        page = await api.get("/agents?limit=100")
        return render(request, "dashboard.html", 400 if err.status == 422 else err.status, agents=page["items"],
                      unread=await unread(api), presets=PRESETS, error=readable(err))
    try:
        await api.call("PATCH", f"/agents/{agent['id']}/settings", {"files": {"SOUL.md": PRESETS[preset][1]}})
    except ApiError as err:  # the agent exists: say why its personality is not set, and go on
        log.warning("personality not saved for a new agent: %s", err)
    notice = await provision(api, agent["id"])
    target = f"/agents/{agent['id']}" + (f"?{urlencode({'notice': notice})}" if notice else "")
    return RedirectResponse(target, status_code=303)

async def provision(api: ControlPlane, agent_id: str) -> str | None:
    """Start ProvisionVps on the plan's first local config (else its first); a reason when refused."""
    me = await api.get("/users/me")
    configs = me["plan"]["vps_configs"]
    local = [c for c in configs if c.get("provider") == "local"] or configs
    if not local:
        return "Your plan offers no VPS configuration to run this agent on."
    try:
        await api.post(f"/agents/{agent_id}/vps", {"vps_config_id": local[0]["id"]})
    except ApiError as err:
        return readable(err)
    return None

async def agent_or_404(api: ControlPlane, agent_id: uuid.UUID) -> dict[str, Any]:
    try:
        return await api.get(f"/agents/{agent_id}")  # type: ignore[no-any-return]
    except ApiError as err:
        if err.status == 404:
            raise PageError(404, "Agent not found", "There is no such agent in your account.") from None
        raise

@router.get("/agents/{agent_id}", response_class=HTMLResponse)
async def agent_page(request: Request, agent_id: uuid.UUID, notice: str = "") -> Response:
    _user, api = await require_user(request)
    return await show_agent(request, api, agent_id, notice=notice[:500] or None)

async def show_agent(request: Request, api: ControlPlane, agent_id: uuid.UUID, status: int = 200,
                     notice: str | None = None) -> Response:
    agent = await agent_or_404(api, agent_id)
    vps = agent.get("vps")
    busy = bool(vps and (vps.get("operation_id") or vps.get("state") == "provisioning"))
    usage, chart = None, None
    try:
        usage = await api.get(f"/agents/{agent_id}/usage")
        days = usage.get("daily") or []
        chart = bar_chart([d["day"] for d in days], [int(d["cpu_ms"]) // 1000 for d in days],
                          "CPU seconds per day this month", "CPU s")
    except ApiError:
        usage = None
    chat_url = f"{ctx(request).settings.proxy_url}/agents/{agent_id}/gateway/"
    return render(request, "agent.html", status, agent=agent, vps=vps, busy=busy, notice=notice, usage=usage,
                  chart=chart, chat_url=chat_url, unread=await unread(api))

async def act(request: Request, agent_id: uuid.UUID, method: str, path: str, body: Any = None) -> Response:
    _user, api = await require_user(request)
    await form(request)
    await agent_or_404(api, agent_id)
    try:
        if path == "provision":
            reason = await provision(api, str(agent_id))
            if reason:
                return await show_agent(request, api, agent_id, 409, notice=reason)
        else:
            await api.call(method, f"/agents/{agent_id}/vps{path}", body)
    except ApiError as err:
        return await show_agent(request, api, agent_id, err.status if err.status >= 400 else 400,
                                notice=readable(err))
    return RedirectResponse(f"/agents/{agent_id}", status_code=303)

@router.post("/agents/{agent_id}/start")
async def start(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "POST", "/start")

@router.post("/agents/{agent_id}/stop")
async def stop(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "POST", "/stop")

@router.post("/agents/{agent_id}/provision")
async def reprovision(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "POST", "provision")

@router.get("/agents/{agent_id}/destroy", response_class=HTMLResponse)
async def confirm_destroy(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    return render(request, "destroy.html", agent=await agent_or_404(api, agent_id))

@router.post("/agents/{agent_id}/destroy")
async def destroy(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "DELETE", "")
