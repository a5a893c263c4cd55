"""The agent's Channels tab: the connected channels, the token forms, removal, WhatsApp pairing.

Tokens go straight to the API and are never written back into a page: a refused form comes back
with the channel chosen and the reason, and at most the last 4 characters of what was typed (the
same hint the API shows for stored tokens). The live part of the page (channels, the operation in
flight, the WhatsApp QR) is a fragment that the page's script re-fetches while something is in
flight, so the QR follows its rotation and typed tokens in the forms below stay where they are.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from web.api_client import ApiError, ControlPlane
from web.operations import agent_or_404, explain, no_vps, operation, page_status, running
from web.pages import PageError, form, render, require_user, unread
from web.qr_svg import png_bytes, qr_svg

router = APIRouter()

# kind -> (label, [(field, label, placeholder)])
TOKEN_CHANNELS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "telegram": ("Telegram", [("bot_token", "Bot token (from @BotFather)", "123456789:AA…")]),
    "discord": ("Discord", [("bot_token", "Bot token (Developer Portal → Bot)", "three parts separated by dots")]),
    "slack": ("Slack", [("bot_token", "Bot token", "xoxb-…"),
                        ("app_token", "App-level token (Socket Mode)", "xapp-…")]),
}
LABELS = {**{k: v[0] for k, v in TOKEN_CHANNELS.items()}, "whatsapp": "WhatsApp"}
PAIRING = ("pending", "connecting", "awaiting_scan")
IN_FLIGHT = ("pending", "connecting", "awaiting_scan")
STATUS_WORDS = {
    "pending": "waiting to be set up", "connecting": "connecting", "awaiting_scan": "waiting for the QR scan",
    "connected": "connected", "configured": "configured (the gateway accepted it; not yet connected)",
    "error": "failed", "expired": "QR expired", "cancelled": "pairing cancelled",
}
CHANNEL_OPS = ("ConnectChannel", "DisconnectChannel")


def kind_or_404(kind: str) -> str:
    if kind not in LABELS:
        raise PageError(404, "Page not found", "There is no such channel.")
    return kind


async def live_state(api: ControlPlane, agent: dict[str, Any], op_id: str | None) -> dict[str, Any]:
    """Everything the live fragment shows, and whether it is still changing."""
    agent_id = uuid.UUID(agent["id"])
    items: list[dict[str, Any]] = (await api.get(f"/agents/{agent_id}/channels"))["items"]
    op = await operation(api, agent_id, op_id)
    vps = agent.get("vps") or {}
    queued = vps.get("operation") if (vps.get("operation") or {}).get("operation") in CHANNEL_OPS else None
    whatsapp = next((c for c in items if c["kind"] == "whatsapp"), None)
    qr: dict[str, Any] | None = None
    if whatsapp and whatsapp["status"] in PAIRING:
        try:
            qr = await api.get(f"/agents/{agent_id}/channels/whatsapp/qr")
        except ApiError:
            qr = None
    svg, fallback = None, None
    if qr and qr.get("status") == "awaiting_scan" and qr.get("qr_data_url"):
        svg = qr_svg(qr["qr_data_url"])
        # A PNG the redrawing cannot read is still shown, as the image it is (checked to be a PNG).
        fallback = qr["qr_data_url"] if svg is None and png_bytes(qr["qr_data_url"]) else None
    busy = running(op) or queued is not None or any(c["status"] in IN_FLIGHT for c in items)
    query = urlencode({"op": op["id"]}) if op else ""
    return {"channels": items, "op": op, "queued": queued, "whatsapp": whatsapp, "qr": qr, "qr_svg": svg,
            "qr_fallback": fallback, "busy": busy, "labels": LABELS, "words": STATUS_WORDS,
            "live_src": f"/agents/{agent_id}/channels/live" + (f"?{query}" if query else "")}


async def show(request: Request, api: ControlPlane, agent_id: uuid.UUID, status: int = 200, *, op: str | None = None,
               error: str | None = None, chosen: str | None = None, hint: str | None = None) -> Response:
    agent = await agent_or_404(api, agent_id)
    live = await live_state(api, agent, op)
    vps = agent.get("vps") or {}
    return render(request, "agent_channels.html", status, agent=agent, tab="channels", unread=await unread(api),
                  error=error, chosen=chosen, hint=hint, token_channels=TOKEN_CHANNELS,
                  agent_running=vps.get("state") == "running", **live)


@router.get("/agents/{agent_id}/channels", response_class=HTMLResponse)
async def channels_page(request: Request, agent_id: uuid.UUID, op: str = "") -> Response:
    _user, api = await require_user(request)
    return await show(request, api, agent_id, op=op or None)


@router.get("/agents/{agent_id}/channels/live", response_class=HTMLResponse)
async def channels_live(request: Request, agent_id: uuid.UUID, op: str = "") -> Response:
    """The fragment the page polls: channels, the operation in flight, the current QR."""
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    live = await live_state(api, agent, op or None)
    response = render(request, "_channels_live.html", agent=agent, **live)
    response.headers["Cache-Control"] = "no-store"
    return response


def after(agent_id: uuid.UUID, accepted: dict[str, Any] | None) -> Response:
    op = (accepted or {}).get("operation_id")
    query = f"?{urlencode({'op': op})}" if op else ""
    return RedirectResponse(f"/agents/{agent_id}/channels{query}", status_code=303)


@router.post("/agents/{agent_id}/channels")
async def add_channel(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    fields = await form(request)
    await agent_or_404(api, agent_id)
    kind = fields.get("kind", "")
    if kind not in TOKEN_CHANNELS:
        return await show(request, api, agent_id, 400, error="Choose Telegram, Discord or Slack.")
    credentials = {name: fields.get(name, "").strip() for name, _label, _ph in TOKEN_CHANNELS[kind][1]}
    missing = [label for name, label, _ph in TOKEN_CHANNELS[kind][1] if not credentials[name]]
    typed = [v for v in credentials.values() if v]
    hint = ", ".join(f"…{v[-4:]}" for v in typed if len(v) >= 8) or None
    if missing:
        return await show(request, api, agent_id, 400, chosen=kind, hint=hint,
                          error=f"Check the form: {', '.join(missing)} is required for {LABELS[kind]}.")
    try:
        accepted = await api.post(f"/agents/{agent_id}/channels", {"kind": kind, "credentials": credentials})
    except ApiError as err:
        return await show(request, api, agent_id, page_status(err), chosen=kind, hint=hint, error=explain(err))
    return after(agent_id, accepted)


@router.post("/agents/{agent_id}/channels/whatsapp/pair")
async def pair_whatsapp(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    await form(request)
    await agent_or_404(api, agent_id)
    try:
        accepted = await api.post(f"/agents/{agent_id}/channels", {"kind": "whatsapp"})
    except ApiError as err:
        return await show(request, api, agent_id, page_status(err), error=explain(err))
    return after(agent_id, accepted)


@router.get("/agents/{agent_id}/channels/{kind}/remove", response_class=HTMLResponse)
async def confirm_remove(request: Request, agent_id: uuid.UUID, kind: str) -> Response:
    _user, api = await require_user(request)
    kind = kind_or_404(kind)
    agent = await agent_or_404(api, agent_id)
    items = (await api.get(f"/agents/{agent_id}/channels"))["items"]
    channel = next((c for c in items if c["kind"] == kind), None)
    if channel is None:
        raise PageError(404, "Channel not found", f"This agent has no {LABELS[kind]} channel.")
    return render(request, "channel_remove.html", agent=agent, kind=kind, label=LABELS[kind], channel=channel,
                  pairing=kind == "whatsapp" and channel["status"] in PAIRING, unread=await unread(api))


@router.post("/agents/{agent_id}/channels/{kind}/remove")
async def remove_channel(request: Request, agent_id: uuid.UUID, kind: str) -> Response:
    _user, api = await require_user(request)
    await form(request)
    kind = kind_or_404(kind)
    await agent_or_404(api, agent_id)
    try:
        accepted = await api.call("DELETE", f"/agents/{agent_id}/channels/{kind}")
    except ApiError as err:
        if err.status == 404 and not no_vps(err):
            return await show(request, api, agent_id, 404, error=f"This agent has no {LABELS[kind]} channel.")
        return await show(request, api, agent_id, page_status(err), error=explain(err))
    return after(agent_id, accepted)
