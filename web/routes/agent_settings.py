"""The agent's Settings tab: personality files, model, and the user's monthly overage budget.

Saving the personality or model starts a config push when the agent runs (PushConfig); the tab
follows it like the Channels tab does. A refused form comes back with what was typed and why.
The overage budget is the user's, for all their agents, this month: typed in dollars, sent in cents.
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from web.api_client import ApiError, ControlPlane
from web.operations import agent_or_404, explain, operation, page_status, running
from web.pages import form, render, require_user, unread

router = APIRouter()

FILES = ("AGENTS.md", "SOUL.md", "IDENTITY.md")
FILE_HELP = {
    "AGENTS.md": "How the agent works: its rules, routines and what it may do.",
    "SOUL.md": "Its personality: tone, values, how it speaks.",
    "IDENTITY.md": "Who it is: name, role, a short self-description.",
}
MAX_FILE_CHARS = 64 * 1024  # the API's limit per file
# The API's model id: "provider/model" (api/schemas.py ModelId); checked here to keep the message plain.
MODEL = re.compile(r"^[a-z0-9][a-z0-9._-]*/[A-Za-z0-9._:-]+$")
MAX_BUDGET_DOLLARS = Decimal(100_000)  # the API refuses more than 10,000,000 cents a month


async def show(request: Request, api: ControlPlane, agent_id: uuid.UUID, status: int = 200, *, op: str | None = None,
               typed: dict[str, str] | None = None, error: str | None = None, budget_typed: str | None = None,
               budget_error: str | None = None, notice: str | None = None) -> Response:
    agent = await agent_or_404(api, agent_id)
    saved = await api.get(f"/agents/{agent_id}/settings")
    budget = await api.get("/users/me/overage-budget")
    try:
        usage: dict[str, Any] | None = await api.get(f"/agents/{agent_id}/usage")
    except ApiError:
        usage = None
    values = {name: saved["files"].get(name, "") for name in FILES}
    values["model"] = saved["model"] or ""
    if typed is not None:
        values.update(typed)
    op_row = await operation(api, agent_id, op)
    models = [m for m in dict.fromkeys((saved["default_model"], saved["model"] or "")) if m]
    budget_value = budget_typed if budget_typed is not None else f"{budget['budget_cents'] / 100:.2f}"
    return render(request, "agent_settings.html", status, agent=agent, tab="settings", unread=await unread(api),
                  values=values, files=FILES, file_help=FILE_HELP, default_model=saved["default_model"],
                  models=models, error=error, notice=notice, op=op_row, busy=running(op_row),
                  op_src=f"/agents/{agent_id}/settings/operation?{urlencode({'op': op or ''})}",
                  budget=budget, budget_value=budget_value, budget_error=budget_error, usage=usage)


@router.get("/agents/{agent_id}/settings", response_class=HTMLResponse)
async def settings_page(request: Request, agent_id: uuid.UUID, op: str = "", saved: str = "") -> Response:
    _user, api = await require_user(request)
    notice = {"later": "Saved. The agent is not running: it gets these settings when it next starts.",
              "unchanged": "Nothing changed: the agent already has these settings.",
              "budget": "Overage budget saved."}.get(saved)
    return await show(request, api, agent_id, op=op or None, notice=notice)


@router.get("/agents/{agent_id}/settings/operation", response_class=HTMLResponse)
async def settings_operation(request: Request, agent_id: uuid.UUID, op: str = "") -> Response:
    """The fragment the page polls while the config push runs."""
    _user, api = await require_user(request)
    await agent_or_404(api, agent_id)
    op_row = await operation(api, agent_id, op or None)
    response = render(request, "_settings_operation.html", op=op_row, busy=running(op_row),
                      op_src=f"/agents/{agent_id}/settings/operation?{urlencode({'op': op})}")
    response.headers["Cache-Control"] = "no-store"
    return response


def check_settings(typed: dict[str, str]) -> str | None:
    model = typed["model"]
    if model and not MODEL.fullmatch(model):
        return ("Check the form: the model is written provider/model, e.g. anthropic/claude-sonnet-5 "
                "(lower-case provider, no spaces).")
    too_long = [name for name in FILES if len(typed[name]) > MAX_FILE_CHARS]
    if too_long:
        return f"Check the form: {', '.join(too_long)} is longer than {MAX_FILE_CHARS:,} characters."
    if any("\x00" in typed[name] for name in FILES):
        return "Check the form: the text contains a NUL character."
    return None


@router.post("/agents/{agent_id}/settings")
async def save_settings(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    fields = await form(request)
    await agent_or_404(api, agent_id)
    # Browsers send textarea line breaks as CRLF; the files are plain Markdown with LF.
    typed = {name: fields.get(name, "").replace("\r\n", "\n") for name in FILES}
    typed["model"] = fields.get("model", "").strip()
    problem = check_settings(typed)
    if problem:
        return await show(request, api, agent_id, 400, typed=typed, error=problem)
    body: dict[str, Any] = {"files": {name: typed[name] for name in FILES}}
    if typed["model"]:
        body["model"] = typed["model"]
    try:
        answer = await api.call("PATCH", f"/agents/{agent_id}/settings", body)
    except ApiError as err:
        return await show(request, api, agent_id, page_status(err), typed=typed,
                          error=explain(err))
    if answer and answer.get("operation_id"):
        return RedirectResponse(f"/agents/{agent_id}/settings?{urlencode({'op': answer['operation_id']})}",
                                status_code=303)
    outcome = "unchanged" if answer and answer.get("unchanged") and answer.get("applied") == "nothing changed" \
        else "later"
    return RedirectResponse(f"/agents/{agent_id}/settings?saved={outcome}", status_code=303)


def cents(text: str) -> int | str:
    """Dollars as typed ("25", "$1,250.50") to cents, or the reason they are not a budget."""
    cleaned = text.strip().removeprefix("$").replace(",", "").strip()
    if not cleaned:
        return "Enter a budget in dollars, e.g. 10 or 12.50 (0 means no overage at all)."
    try:
        dollars = Decimal(cleaned)
    except InvalidOperation:
        return f"“{text.strip()[:40]}” is not an amount in dollars; write it like 10 or 12.50."
    if not dollars.is_finite():
        return f"“{text.strip()[:40]}” is not an amount in dollars; write it like 10 or 12.50."
    if dollars < 0:
        return "The budget cannot be negative; 0 means no overage at all."
    if dollars != dollars.quantize(Decimal("0.01")):
        return "Use at most two decimals (whole cents)."
    if dollars > MAX_BUDGET_DOLLARS:
        return f"The budget can be at most ${MAX_BUDGET_DOLLARS:,.0f} a month."
    return int(dollars * 100)


@router.post("/agents/{agent_id}/settings/budget")
async def save_budget(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    fields = await form(request)
    await agent_or_404(api, agent_id)
    typed = fields.get("budget_dollars", "")
    value = cents(typed)
    if isinstance(value, str):
        return await show(request, api, agent_id, 400, budget_typed=typed[:100], budget_error=value)
    try:
        await api.call("PUT", "/users/me/overage-budget", {"budget_cents": value})
    except ApiError as err:
        return await show(request, api, agent_id, page_status(err), budget_typed=typed[:100],
                          budget_error=explain(err))
    return RedirectResponse(f"/agents/{agent_id}/settings?saved=budget", status_code=303)
