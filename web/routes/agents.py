"""The signed-in user's agents: dashboard, the agent page (Overview and Usage tabs) and its
lifecycle buttons. A user with no agent is sent to the onboarding wizard (web/routes/onboarding.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from web.api_client import ApiError, ControlPlane
from web.charts import bar_chart
from web.operations import OP_ID, agent_or_404
from web.pages import ctx, form, human_bytes, readable, render, require_user, unread

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request) -> Response:
    _user, api = await require_user(request)
    page = await api.get("/agents?limit=100")
    if not page["items"]:
        return RedirectResponse("/onboarding", status_code=303)
    return render(request, "dashboard.html", agents=page["items"], unread=await unread(api))


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


@router.get("/agents/{agent_id}", response_class=HTMLResponse)
async def agent_page(request: Request, agent_id: uuid.UUID, notice: str = "") -> Response:
    _user, api = await require_user(request)
    return await show_agent(request, api, agent_id, notice=notice[:500] or None)

def chat_url(request: Request, agent_id: uuid.UUID | str) -> str:
    """The real OpenClaw Control UI through the proxy (same site: the session cookie reaches it)."""
    return f"{ctx(request).settings.proxy_url}/agents/{agent_id}/gateway/"


def is_busy(vps: dict[str, Any] | None) -> bool:
    return bool(vps and (vps.get("operation_id") or vps.get("state") == "provisioning"))


def uptime(vps: dict[str, Any] | None, now: datetime | None = None) -> str | None:
    """How long a running VPS has been running: since its last state change (to `running`)."""
    if not vps or vps.get("state") != "running" or not vps.get("state_changed_at"):
        return None
    since = datetime.fromisoformat(vps["state_changed_at"])
    seconds = max(0, int(((now or datetime.now(UTC)) - since).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


async def channels_of(api: ControlPlane, agent_id: uuid.UUID) -> list[dict[str, Any]] | None:
    """The agent's channels; None when the API cannot say (the page still renders)."""
    try:
        return list((await api.get(f"/agents/{agent_id}/channels"))["items"])
    except (ApiError, KeyError, TypeError):
        return None


async def show_agent(request: Request, api: ControlPlane, agent_id: uuid.UUID, status: int = 200,
                     notice: str | None = None) -> Response:
    agent = await agent_or_404(api, agent_id)
    vps = agent.get("vps")
    return render(request, "agent.html", status, agent=agent, vps=vps, busy=is_busy(vps), notice=notice,
                  uptime=uptime(vps), channels=await channels_of(api, agent_id), chat_url=chat_url(request, agent_id),
                  unread=await unread(api))


def _cpu(ms: int) -> str:
    return f"{ms / 3_600_000:,.1f} h" if ms >= 3_600_000 else f"{ms / 1000:,.0f} s"


def _memory(mb_s: int) -> str:
    return f"{mb_s / 1024 / 3600:,.2f} GB·h"


# (key in the API's resources and daily series, label, formatter, chart unit, daily value -> chart value)
RESOURCES: tuple[tuple[str, str, Callable[[int], str], str, Callable[[int], int]], ...] = (
    ("bandwidth_bytes", "Bandwidth (in + out)", human_bytes, "MB", lambda v: v // (1024 * 1024)),
    ("cpu_ms", "CPU time", _cpu, "CPU s", lambda v: v // 1000),
    ("memory_mb_seconds", "Memory", _memory, "MB·h", lambda v: v // 3600),
    ("storage_bytes", "Storage", human_bytes, "MB", lambda v: v // (1024 * 1024)),
)


@router.get("/agents/{agent_id}/usage", response_class=HTMLResponse)
async def usage_page(request: Request, agent_id: uuid.UUID) -> Response:
    """This month against the plan: a meter, a daily chart and its data table per resource."""
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    usage = await api.get(f"/agents/{agent_id}/usage")
    days = usage.get("daily") or []
    rows = []
    for key, label, fmt, unit, scale in RESOURCES:
        figures = usage["resources"][key]
        used, limit = int(figures["used"]), int(figures["limit"])
        rows.append({
            "key": key, "label": label, "used": fmt(used), "limit": fmt(limit),
            "projected": fmt(int(figures["projected"])),
            "agent_used": fmt(int(figures["agent_used"])), "over": bool(figures["over_limit"]),
            "percent": min(100, round(100 * used / limit)) if limit else 0, "raw_used": used, "raw_limit": limit,
            "chart": bar_chart([d["day"] for d in days], [scale(int(d[key])) for d in days],
                               f"{label} per day this month, in {unit}", unit),
            "columns": [label], "table": [(d["day"], [fmt(int(d[key]))]) for d in days], "split": None,
        })
        if key == "bandwidth_bytes":  # in and out apart: the month's from its totals (the proxy's bytes are
            # counted there as it carries them), each day's from the daily series
            ins, outs = int(figures.get("used_in") or 0), int(figures.get("used_out") or 0)
            rows[-1].update(split=(fmt(ins), fmt(outs)), columns=["In", "Out", "In + out"], table=[
                (d["day"], [fmt(int(d.get("bandwidth_in_bytes", 0))), fmt(int(d.get("bandwidth_out_bytes", 0))),
                            fmt(int(d[key]))]) for d in days])
    empty = not days and all(r["raw_used"] == 0 for r in rows)
    return render(request, "usage.html", agent=agent, usage=usage, rows=rows, empty=empty, unread=await unread(api))

async def act(request: Request, agent_id: uuid.UUID, method: str, path: str, body: Any = None) -> Response:
    _user, api = await require_user(request)
    await form(request)
    await agent_or_404(api, agent_id)
    if path == "provision":
        try:
            reason = await provision(api, str(agent_id))
        except ApiError as err:
            return await refused(request, api, agent_id, err)
        if reason:
            return await show_agent(request, api, agent_id, 409, notice=reason)
        return RedirectResponse(f"/agents/{agent_id}", status_code=303)
    return await call_then(request, api, agent_id, method, f"/agents/{agent_id}/vps{path}", body)


async def call_then(request: Request, api: ControlPlane, agent_id: uuid.UUID, method: str, url: str,
                    body: Any = None, back: str | None = None) -> Response:
    """A button's API call, then back to `back` (the agent's page); a refusal shows the agent's page
    with the API's reason."""
    try:
        await api.call(method, url, body)
    except ApiError as err:
        return await refused(request, api, agent_id, err)
    return RedirectResponse(back or f"/agents/{agent_id}", status_code=303)


async def refused(request: Request, api: ControlPlane, agent_id: uuid.UUID, err: ApiError) -> Response:
    return await show_agent(request, api, agent_id, err.status if err.status >= 400 else 400, notice=readable(err))

@router.post("/agents/{agent_id}/start")
async def start(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "POST", "/start")

@router.post("/agents/{agent_id}/stop")
async def stop(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "POST", "/stop")

@router.post("/agents/{agent_id}/provision")
async def reprovision(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "POST", "provision")

@router.post("/agents/{agent_id}/cancel")
async def cancel(request: Request, agent_id: uuid.UUID) -> Response:
    """"Cancel" next to a provision or start in progress (the agent's page, the onboarding progress)."""
    _user, api = await require_user(request)
    fields = await form(request)
    op = fields.get("op", "")
    back = f"/onboarding/{agent_id}/provision" if fields.get("back") == "onboarding" else f"/agents/{agent_id}"
    await agent_or_404(api, agent_id)
    if not OP_ID.fullmatch(op):
        return await show_agent(request, api, agent_id, 400, notice="That operation cannot be cancelled.")
    return await call_then(request, api, agent_id, "POST", f"/agents/{agent_id}/operations/{op}/cancel", back=back)


@router.get("/agents/{agent_id}/destroy", response_class=HTMLResponse)
async def confirm_destroy(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    return render(request, "destroy.html", agent=await agent_or_404(api, agent_id))

@router.post("/agents/{agent_id}/destroy")
async def destroy(request: Request, agent_id: uuid.UUID) -> Response:
    return await act(request, agent_id, "DELETE", "")
