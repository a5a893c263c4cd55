"""The admin panel (/admin): users, the fleet with force stop/destroy, plans and VPS configs, usage, audit log.

Every page and form checks `user.is_admin` itself before calling the API (a non-admin gets the
"Admins only" page without the API being asked), and the API's `current_admin` refuses too, so a
stale flag in this process can never act. Everything goes through the control-plane admin API;
bad input re-renders its form with what was typed and the reason, and API conflicts (a plan in
use, an operation running) are shown as the API's own sentence, never as a trace.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from db.models import User
from web.api_client import ApiError, ControlPlane
from web.pages import PageError, form, render, require_user

router = APIRouter(prefix="/admin")

PAGE = 50
VPS_STATES = ("provisioning", "running", "stopped", "destroyed", "error")
PROVIDERS = ("local", "hetzner", "fly")
SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MONTH = re.compile(r"^[1-9]\d{3}-(0[1-9]|1[0-2])$")
INT32_MAX = 2**31 - 1
INT64_MAX = 2**53 - 1  # the API's JSON integer bound
# (field, label, upper bound): the plan's counters in the order the form shows them.
PLAN_NUMBERS = (
    ("price_cents_per_month", "Price (cents per month)", INT32_MAX),
    ("max_agents", "Max agents", INT32_MAX),
    ("max_vpses", "Max running VPSes", INT32_MAX),
    ("max_bandwidth_bytes", "Monthly bandwidth (bytes)", INT64_MAX),
    ("max_storage_bytes", "Storage (bytes)", INT64_MAX),
    ("max_cpu_ms", "Monthly CPU time (ms)", INT64_MAX),
    ("max_memory_mb_seconds", "Monthly memory (MB·seconds)", INT64_MAX),
    ("overage_bandwidth_cost_per_gb_cents", "Overage bandwidth (cents per GB)", INT32_MAX),
    ("overage_storage_cost_per_gb_cents", "Overage storage (cents per GB)", INT32_MAX),
    ("overage_cpu_cost_per_hour_cents", "Overage CPU (cents per hour)", INT32_MAX),
    ("overage_memory_cost_per_gb_hour_cents", "Overage memory (cents per GB·hour)", INT32_MAX),
)
CONFIG_NUMBERS = (("cpu_millicores", "CPU (millicores)"), ("memory_mb", "Memory (MB)"), ("disk_gb", "Disk (GB)"))


async def require_admin(request: Request) -> tuple[User, ControlPlane]:
    """The signed-in admin (not signed in: to /login; signed in without the flag: 403)."""
    user, api = await require_user(request)
    if not user.is_admin:
        raise PageError(403, "Admins only", "This page is for Slopbox administrators.")
    return user, api


def problem(err: ApiError) -> str:
    """The API's own sentence; a 409 adds that nothing was changed."""
    if err.status == 409:
        return f"{err.title}: {err.detail} Nothing was changed."
    if err.status == 422:
        return f"Check the form: {err.detail}"
    return f"{err.title}: {err.detail}"


def offset_of(raw: str) -> int:
    return int(raw) if raw.isdigit() and len(raw) < 8 else 0


def pager(base: str, params: dict[str, str], page: dict[str, Any]) -> dict[str, str | None]:
    """Links to the previous and next pages of an API `Page` (None at either end)."""
    offset, limit, total = page["offset"], page["limit"], page["total"]
    def link(at: int) -> str:
        return f"{base}?{urlencode({**{k: v for k, v in params.items() if v}, 'offset': at})}"
    return {"prev": link(max(0, offset - limit)) if offset > 0 else None,
            "next": link(offset + limit) if offset + limit < total else None,
            "range": f"{offset + 1}–{min(offset + limit, total)} of {total}" if total else "none"}


async def api_or_404(api: ControlPlane, path: str, what: str) -> Any:
    try:
        return await api.get(path)
    except ApiError as err:
        if err.status in (404, 422):
            raise PageError(404, f"{what} not found", f"There is no such {what.lower()}.") from None
        raise


@router.get("", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    await require_admin(request)
    return RedirectResponse("/admin/users", status_code=303)


# --- users ------------------------------------------------------------------------------------------------


@router.get("/users", response_class=HTMLResponse)
async def users(request: Request, email: str = "", offset: str = "0") -> Response:
    _admin, api = await require_admin(request)
    email = email.strip()[:255]
    query = {"limit": PAGE, "offset": offset_of(offset), **({"email": email} if email else {})}
    page = await api.get(f"/admin/users?{urlencode(query)}")
    return render(request, "admin_users.html", section="users", page=page, email=email,
                  pages=pager("/admin/users", {"email": email}, page))


async def show_user(request: Request, api: ControlPlane, user_id: uuid.UUID, status: int = 200,
                    error: str | None = None, notice: str | None = None) -> Response:
    target = await api_or_404(api, f"/admin/users/{user_id}", "User")
    plans = await api.get("/admin/plans")
    vpses = await api.get(f"/admin/vpses?{urlencode({'user_id': str(user_id), 'limit': 200})}")
    return render(request, "admin_user.html", status, section="users", target=target, plans=plans,
                  vpses=vpses["items"], error=error, notice=notice)


@router.get("/users/{user_id}", response_class=HTMLResponse)
async def user_detail(request: Request, user_id: uuid.UUID, notice: str = "") -> Response:
    _admin, api = await require_admin(request)
    return await show_user(request, api, user_id, notice=notice[:200] or None)


@router.post("/users/{user_id}/plan")
async def change_plan(request: Request, user_id: uuid.UUID) -> Response:
    _admin, api = await require_admin(request)
    fields = await form(request)
    try:
        plan_id = uuid.UUID(fields.get("plan_id", ""))
    except ValueError:
        return await show_user(request, api, user_id, 400, error="Choose a plan from the list.")
    try:
        await api.call("PUT", f"/admin/users/{user_id}/plan", {"plan_id": str(plan_id)})
    except ApiError as err:
        if err.status == 404 and "user" in err.detail.lower():
            raise PageError(404, "User not found", "There is no such user.") from None
        return await show_user(request, api, user_id, err.status, error=problem(err))
    return RedirectResponse(f"/admin/users/{user_id}?notice=Plan+changed.", status_code=303)


@router.post("/users/{user_id}/exempt")
async def set_exempt(request: Request, user_id: uuid.UUID) -> Response:
    _admin, api = await require_admin(request)
    fields = await form(request)
    if fields.get("exempt") not in ("true", "false"):
        return await show_user(request, api, user_id, 400, error="Choose whether the user is exempt.")
    exempt = fields["exempt"] == "true"
    try:
        await api.call("PUT", f"/admin/users/{user_id}/usage-exempt", {"exempt": exempt})
    except ApiError as err:
        if err.status == 404:
            raise PageError(404, "User not found", "There is no such user.") from None
        return await show_user(request, api, user_id, err.status, error=problem(err))
    notice = "Exempt from overage enforcement." if exempt else "Overage enforcement applies again."
    return RedirectResponse(f"/admin/users/{user_id}?{urlencode({'notice': notice})}", status_code=303)


# --- the fleet --------------------------------------------------------------------------------------------


@router.get("/vms", response_class=HTMLResponse)
async def vms(request: Request, state: str = "", provider: str = "", offset: str = "0") -> Response:
    _admin, api = await require_admin(request)
    state = state if state in VPS_STATES else ""
    provider = provider if provider in PROVIDERS else ""
    filters = {"state": state, "provider": provider}
    query = {"limit": PAGE, "offset": offset_of(offset), **{k: v for k, v in filters.items() if v}}
    page = await api.get(f"/admin/vpses?{urlencode(query)}")
    return render(request, "admin_vms.html", section="vms", page=page, state=state, provider=provider,
                  states=VPS_STATES, providers=PROVIDERS, pages=pager("/admin/vms", filters, page))


async def find_vps(api: ControlPlane, vps_id: uuid.UUID, owner: str) -> dict[str, Any] | None:
    """The VPS row for the confirmation page, looked up among its owner's (the API lists by user)."""
    try:
        owner_id = uuid.UUID(owner)
    except ValueError:
        return None
    page = await api.get(f"/admin/vpses?{urlencode({'user_id': str(owner_id), 'limit': 200})}")
    return next((v for v in page["items"] if v["id"] == str(vps_id)), None)


ACTIONS = {"stop": ("Force stop", "POST", "/stop"), "destroy": ("Force destroy", "DELETE", "")}


@router.get("/vms/{vps_id}/{action}", response_class=HTMLResponse)
async def confirm(request: Request, vps_id: uuid.UUID, action: str, owner: str = "") -> Response:
    _admin, api = await require_admin(request)
    if action not in ACTIONS:
        raise PageError(404, "Page not found", "")
    vps = await find_vps(api, vps_id, owner)
    return render(request, "admin_vm_confirm.html", section="vms", vps=vps, vps_id=vps_id, action=action,
                  label=ACTIONS[action][0], owner=owner)


@router.post("/vms/{vps_id}/{action}")
async def force(request: Request, vps_id: uuid.UUID, action: str) -> Response:
    _admin, api = await require_admin(request)
    fields = await form(request)
    if action not in ACTIONS:
        raise PageError(404, "Page not found", "")
    label, method, suffix = ACTIONS[action]
    try:
        done = await api.call(method, f"/admin/vpses/{vps_id}{suffix}")
    except ApiError as err:
        if err.status == 404:
            raise PageError(404, "VPS not found", "There is no such VPS.") from None
        vps = await find_vps(api, vps_id, fields.get("owner", ""))
        return render(request, "admin_vm_confirm.html", err.status, section="vms", vps=vps, vps_id=vps_id,
                      action=action, label=label, owner=fields.get("owner", ""), error=problem(err))
    if not done.get("operation_id"):  # destroy of an already destroyed VPS: nothing to follow
        return RedirectResponse("/admin/vms?state=destroyed", status_code=303)
    return RedirectResponse(f"/admin/operations/{quote(done['operation_id'], safe='')}", status_code=303)


@router.get("/operations/{operation_id}", response_class=HTMLResponse)
async def operation(request: Request, operation_id: str) -> Response:
    _admin, api = await require_admin(request)
    if len(operation_id) > 255:
        raise PageError(404, "Operation not found", "There is no such operation.")
    op = await api_or_404(api, f"/admin/operations/{quote(operation_id, safe='')}", "Operation")
    return render(request, "admin_operation.html", section="vms", op=op,
                  busy=op["status"] in ("queued", "running"))


# --- plans and VPS configs --------------------------------------------------------------------------------


@router.get("/plans", response_class=HTMLResponse)
async def plans(request: Request, notice: str = "") -> Response:
    _admin, api = await require_admin(request)
    return await show_plans(request, api, notice=notice[:200] or None)


async def show_plans(request: Request, api: ControlPlane, status: int = 200, error: str | None = None,
                     notice: str | None = None) -> Response:
    configs = await api.get("/admin/vps-configs")
    return render(request, "admin_plans.html", status, section="plans", plans=await api.get("/admin/plans"),
                  configs=configs, names={c["id"]: c["name"] for c in configs}, error=error, notice=notice)


async def saved(api: ControlPlane, method: str, path: str, body: dict[str, Any], errors: list[str],
                again: Callable[[int, str], Response], notice: Callable[[dict[str, Any]], str]) -> Response:
    """The end of a plan or VPS config form: what is wrong with it (400) or the API's refusal shows the form
    again with what was typed (`again`); once saved, the plans page says `notice` of the saved row."""
    if errors:
        return again(400, " ".join(errors))
    try:
        row = await api.call(method, path, body)
    except ApiError as err:
        return again(err.status, problem(err))
    return RedirectResponse(f"/admin/plans?{urlencode({'notice': notice(row)})}", status_code=303)


async def confirm_delete(request: Request, path: str, kind: str, title: str, name: str) -> Response:
    """The confirmation page before deleting the plan or VPS config at `path` (the API's and this app's)."""
    _admin, api = await require_admin(request)
    row = await api_or_404(api, path, title)
    return render(request, "admin_delete.html", section="plans", kind=kind, target_name=row[name],
                  action=f"{path}/delete")


async def delete(request: Request, path: str, kind: str, title: str) -> Response:
    """Delete the plan or VPS config at `path`; the API's refusal (in use) is said on the plans page."""
    _admin, api = await require_admin(request)
    await form(request)
    try:
        await api.call("DELETE", path)
    except ApiError as err:
        if err.status == 404:
            raise PageError(404, f"{title} not found", f"There is no such {kind}.") from None
        return await show_plans(request, api, err.status, error=problem(err))
    return RedirectResponse(f"/admin/plans?{urlencode({'notice': f'{title} deleted.'})}", status_code=303)


def plan_body(fields: dict[str, str], configs: list[dict[str, Any]], new: bool) -> tuple[dict[str, Any], list[str]]:
    """The API body from the form, and what is wrong with it (checked here so the reasons name the labels)."""
    body: dict[str, Any] = {}
    errors = []
    if new:
        name = fields.get("name", "").strip()
        if not SLUG.match(name):
            errors.append("Name: 1 to 64 lower-case letters, digits, '-' or '_', starting with a letter or digit.")
        body["name"] = name
    display = fields.get("display_name", "").strip()
    if not display or len(display) > 128:
        errors.append("Display name: 1 to 128 characters.")
    body["display_name"] = display
    for field, label, top in PLAN_NUMBERS:
        raw = fields.get(field, "").strip().replace("_", "")
        if not raw.isdigit() or int(raw) > top:
            errors.append(f"{label}: a whole number from 0 to {top}.")
        else:
            body[field] = int(raw)
    body["vps_config_ids"] = [c["id"] for c in configs if fields.get(f"config_{c['id']}") == "on"]
    if fields.get("is_default") == "on":
        body["is_default"] = True
    if not new:
        body["active"] = fields.get("active") == "on"
    return body, errors


def plan_form(request: Request, status: int, plan: dict[str, Any] | None, values: dict[str, Any],
              configs: list[dict[str, Any]], error: str | None = None) -> Response:
    return render(request, "admin_plan_form.html", status, section="plans", plan=plan, values=values,
                  configs=configs, numbers=PLAN_NUMBERS, error=error)


@router.get("/plans/new", response_class=HTMLResponse)
async def new_plan(request: Request) -> Response:
    _admin, api = await require_admin(request)
    configs = await api.get("/admin/vps-configs")
    return plan_form(request, 200, None, {"active": True, "vps_config_ids": []}, configs)


@router.post("/plans", response_class=HTMLResponse)
async def create_plan(request: Request) -> Response:
    _admin, api = await require_admin(request)
    fields = await form(request)
    configs = await api.get("/admin/vps-configs")
    body, errors = plan_body(fields, configs, new=True)
    typed = {**fields, "vps_config_ids": body["vps_config_ids"], "is_default": "is_default" in body}
    return await saved(api, "POST", "/admin/plans", body, errors,
                       lambda status, error: plan_form(request, status, None, typed, configs, error),
                       lambda plan: f"Plan '{plan['name']}' created.")


@router.get("/plans/{plan_id}/edit", response_class=HTMLResponse)
async def edit_plan(request: Request, plan_id: uuid.UUID) -> Response:
    _admin, api = await require_admin(request)
    plan = await api_or_404(api, f"/admin/plans/{plan_id}", "Plan")
    return plan_form(request, 200, plan, plan, await api.get("/admin/vps-configs"))


@router.post("/plans/{plan_id}", response_class=HTMLResponse)
async def update_plan(request: Request, plan_id: uuid.UUID) -> Response:
    _admin, api = await require_admin(request)
    fields = await form(request)
    plan = await api_or_404(api, f"/admin/plans/{plan_id}", "Plan")
    configs = await api.get("/admin/vps-configs")
    body, errors = plan_body(fields, configs, new=False)
    typed = {**fields, "vps_config_ids": body["vps_config_ids"], "is_default": "is_default" in body,
             "active": body["active"]}
    return await saved(api, "PATCH", f"/admin/plans/{plan_id}", body, errors,
                       lambda status, error: plan_form(request, status, plan, typed, configs, error),
                       lambda _: f"Plan '{plan['name']}' saved.")


@router.get("/plans/{plan_id}/delete", response_class=HTMLResponse)
async def confirm_delete_plan(request: Request, plan_id: uuid.UUID) -> Response:
    return await confirm_delete(request, f"/admin/plans/{plan_id}", "plan", "Plan", "display_name")


@router.post("/plans/{plan_id}/delete", response_class=HTMLResponse)
async def delete_plan(request: Request, plan_id: uuid.UUID) -> Response:
    return await delete(request, f"/admin/plans/{plan_id}", "plan", "Plan")


def config_body(fields: dict[str, str], new: bool) -> tuple[dict[str, Any], list[str]]:
    body: dict[str, Any] = {}
    errors = []
    if new:
        name = fields.get("name", "").strip()
        if not SLUG.match(name):
            errors.append("Name: 1 to 64 lower-case letters, digits, '-' or '_', starting with a letter or digit.")
        body["name"] = name
        provider = fields.get("provider", "")
        if provider not in PROVIDERS:
            errors.append(f"Provider: one of {', '.join(PROVIDERS)}.")
        body["provider"] = provider
    for field, label in CONFIG_NUMBERS:
        raw = fields.get(field, "").strip()
        if not raw.isdigit() or not 1 <= int(raw) <= INT32_MAX:
            errors.append(f"{label}: a whole number of at least 1.")
        else:
            body[field] = int(raw)
    image = fields.get("image", "").strip()
    if not image or len(image) > 255 or any(not 0x21 <= ord(c) <= 0x7e for c in image):
        errors.append("Image: 1 to 255 printable characters without spaces.")
    body["image"] = image
    server_type = fields.get("server_type", "").strip()
    if server_type:
        body["server_type"] = server_type
    locations = [loc.strip() for loc in fields.get("locations", "").split(",") if loc.strip()]
    if not locations:
        errors.append("Locations: at least one, separated by commas.")
    body["locations"] = locations
    if not new:
        body["active"] = fields.get("active") == "on"
    return body, errors


def config_form(request: Request, status: int, config: dict[str, Any] | None, values: dict[str, Any],
                error: str | None = None) -> Response:
    shown = dict(values)
    if isinstance(shown.get("locations"), list):
        shown["locations"] = ", ".join(shown["locations"])
    return render(request, "admin_config_form.html", status, section="plans", config=config, values=shown,
                  numbers=CONFIG_NUMBERS, providers=PROVIDERS, error=error)


@router.get("/vps-configs/new", response_class=HTMLResponse)
async def new_config(request: Request) -> Response:
    await require_admin(request)
    return config_form(request, 200, None, {"provider": "local", "active": True})


@router.post("/vps-configs", response_class=HTMLResponse)
async def create_config(request: Request) -> Response:
    _admin, api = await require_admin(request)
    fields = await form(request)
    body, errors = config_body(fields, new=True)
    return await saved(api, "POST", "/admin/vps-configs", body, errors,
                       lambda status, error: config_form(request, status, None, fields, error),
                       lambda config: f"VPS config '{config['name']}' created; allow it on plans by editing them.")


@router.get("/vps-configs/{config_id}/edit", response_class=HTMLResponse)
async def edit_config(request: Request, config_id: uuid.UUID) -> Response:
    _admin, api = await require_admin(request)
    config = await api_or_404(api, f"/admin/vps-configs/{config_id}", "VPS config")
    return config_form(request, 200, config, config)


@router.post("/vps-configs/{config_id}", response_class=HTMLResponse)
async def update_config(request: Request, config_id: uuid.UUID) -> Response:
    _admin, api = await require_admin(request)
    fields = await form(request)
    config = await api_or_404(api, f"/admin/vps-configs/{config_id}", "VPS config")
    body, errors = config_body(fields, new=False)
    typed = {**fields, "active": body["active"]}
    return await saved(api, "PATCH", f"/admin/vps-configs/{config_id}", body, errors,
                       lambda status, error: config_form(request, status, config, typed, error),
                       lambda _: f"VPS config '{config['name']}' saved.")


@router.get("/vps-configs/{config_id}/delete", response_class=HTMLResponse)
async def confirm_delete_config(request: Request, config_id: uuid.UUID) -> Response:
    return await confirm_delete(request, f"/admin/vps-configs/{config_id}", "VPS config", "VPS config", "name")


@router.post("/vps-configs/{config_id}/delete", response_class=HTMLResponse)
async def delete_config(request: Request, config_id: uuid.UUID) -> Response:
    return await delete(request, f"/admin/vps-configs/{config_id}", "VPS config", "VPS config")


# --- usage and the audit log ------------------------------------------------------------------------------


@router.get("/usage", response_class=HTMLResponse)
async def usage(request: Request, month: str = "") -> Response:
    _admin, api = await require_admin(request)
    error = None
    if month and not MONTH.match(month):
        error, month = "Month: write it as YYYY-MM, e.g. 2026-01. Showing this month.", ""
    data = await api.get("/admin/usage" + (f"?{urlencode({'month': month})}" if month else ""))
    return render(request, "admin_usage.html", 400 if error else 200, section="usage", data=data, month=month,
                  error=error)


@router.get("/audit", response_class=HTMLResponse)
async def audit(request: Request, action: str = "", offset: str = "0") -> Response:
    _admin, api = await require_admin(request)
    action = action.strip()[:64]
    query = {"limit": PAGE, "offset": offset_of(offset), **({"action": action} if action else {})}
    page = await api.get(f"/admin/audit-log?{urlencode(query)}")
    for entry in page["items"]:
        text = json.dumps(entry["details"], sort_keys=True)
        entry["details_text"] = text if len(text) <= 300 else text[:300] + "…"
    return render(request, "admin_audit.html", section="audit", page=page, action=action,
                  pages=pager("/admin/audit", {"action": action}, page))
