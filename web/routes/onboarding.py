"""The onboarding wizard (PRD §3): name and personality → plan → provisioning with live progress →
connect channels or skip → done.

The wizard keeps no state of its own: after step 1 every URL names the agent, and each step reads
where the agent is from the API (no VPS yet: choose a plan; an operation in flight or a failure:
the progress page; running: channels, then done). A reload, a second tab or a return days later
resumes at the right place, and the server holds nothing in memory between requests.

Live progress is the API's `vps.step`, polled through the small JSON endpoint `/status` by a few
lines of vanilla JavaScript; without JavaScript the page refreshes itself every two seconds.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from web.api_client import ApiError, ControlPlane
from web.pages import form, log, readable, render, require_user, retrying_text, unread
from web.presets import PRESETS
from web.routes.agents import agent_or_404, channels_of, chat_url, provision

router = APIRouter(prefix="/onboarding")

# ProvisionVps's steps in order (workflows/lifecycle.py), as a person reads them.
PROVISION_STEPS: tuple[tuple[str, str], ...] = (
    ("queued", "Waiting for a worker"),
    ("create_vm", "Creating the virtual machine"),
    ("wait_vm_running", "Booting the machine"),
    ("wait_gateway_ready", "Starting the OpenClaw gateway"),
    ("pair_gateway", "Pairing the control plane with the gateway"),
    ("push_config", "Writing your agent's configuration"),
)
OTHER_STEPS = {"compensate_destroy_vm": "Cleaning up after a failure", "destroy_vm": "Removing the failed machine",
               "wait_vm_gone": "Removing the failed machine", "record_storage_usage": "Removing the failed machine"}
MAX_CUSTOM = 8000


def progress(agent: dict[str, Any]) -> dict[str, Any]:
    """Where provisioning is, for the page and the JSON poll: phase `working`, `ready`, `failed`,
    `none` (no VPS to show: choose a plan or try again) or `other` (stopped: the overview handles it)."""
    vps = agent.get("vps")
    op = (vps or {}).get("operation")
    state = (vps or {}).get("state")
    step = (vps or {}).get("step") or (op or {}).get("step")
    if op and not step and op.get("operation") == "ProvisionVps":
        step = "queued"  # the operation's row learns its step when its first activity starts
    error = None
    if op:
        phase = "working"
    elif state == "running":
        phase = "ready"
    elif state == "error":
        phase = "failed"
        last = (vps or {}).get("last_operation") or {}
        error = (vps or {}).get("last_error") or last.get("error") or "The agent's machine is in error."
    elif vps is None or state == "destroyed":
        phase = "none"
    else:
        phase = "other"
    keys = [k for k, _ in PROVISION_STEPS]
    at = keys.index(step) if step in keys else -1
    steps = []
    for i, (key, label) in enumerate(PROVISION_STEPS):
        if phase == "ready" or (phase == "working" and i < at):
            status = "done"
        elif phase == "working" and i == at:
            status = "current"
        else:
            status = "todo"
        steps.append({"key": key, "label": label, "status": status})
    operation = (op or {}).get("operation")
    extra = OTHER_STEPS.get(step or "") if phase == "working" and at < 0 else None
    if phase == "working" and at < 0 and not extra:
        extra = f"{operation or 'An operation'} is running" + (f" (step {step})" if step else "")
    return {"phase": phase, "state": state, "step": step, "operation": operation, "error": error,
            "other_step": extra, "steps": steps, "retrying": retrying_text(op) if phase == "working" else None,
            "operation_id": (op or {}).get("id")}


def target(agent_id: str, phase: str, *, again: bool = False) -> str:
    """The step of the wizard an agent in this phase belongs on. `again`: a "Try again" is under way
    (the failed VPS is being destroyed), so an agent without a VPS stays on the progress page, which
    provisions the new one."""
    provision = f"/onboarding/{agent_id}/provision"
    if again and phase in ("working", "none"):
        return provision + "?again=1"
    return {"none": f"/onboarding/{agent_id}/plan", "ready": f"/onboarding/{agent_id}/channels",
            "other": f"/agents/{agent_id}"}.get(phase, provision)


@router.get("", response_class=HTMLResponse)
async def step_name(request: Request) -> Response:
    _user, api = await require_user(request)
    return render(request, "onboarding_name.html", presets=PRESETS, preset="helpful", unread=await unread(api))


@router.post("")
async def create(request: Request) -> Response:
    """Step 1: the agent and its SOUL.md (a preset or the person's own text)."""
    _user, api = await require_user(request)
    fields = await form(request)
    name, preset, custom = fields.get("name", ""), fields.get("preset", "helpful"), fields.get("custom", "").strip()

    async def again(status: int, error: str) -> Response:
        return render(request, "onboarding_name.html", status, presets=PRESETS, preset=preset, agent_name=name,
                      custom=custom, error=error, plan_limit=status == 403, unread=await unread(api))

    if preset == "custom":
        if not custom:
            return await again(400, "Describe the personality you want, or pick one of the presets.")
        if len(custom) > MAX_CUSTOM:
            return await again(400, f"The personality may be at most {MAX_CUSTOM} characters.")
        soul = custom if custom.startswith("#") else f"# Soul\n\n{custom}\n"
    elif preset in PRESETS:
        soul = PRESETS[preset][1]
    else:
        return await again(400, "Pick one of the personalities.")
    try:
        agent = await api.post("/agents", {"name": name})
    except ApiError as err:
        if err.status == 403:  # the plan's max_agents: say so, and offer a larger plan
            return await again(403, f"{readable(err)} A larger plan has room for it.")
        return await again(400 if err.status == 422 else err.status, readable(err))
    try:
        await api.call("PATCH", f"/agents/{agent['id']}/settings", {"files": {"SOUL.md": soul}})
    except ApiError as err:  # the agent exists: go on, and say its personality is to be set later
        log.warning("personality not saved for a new agent: %s", err)
        return RedirectResponse(f"/onboarding/{agent['id']}/plan?notice=personality", status_code=303)
    return RedirectResponse(f"/onboarding/{agent['id']}/plan", status_code=303)


@router.get("/plan", response_class=HTMLResponse)
async def plan_only(request: Request) -> Response:
    """The plan step without an agent: for a user whose plan has no room for another one."""
    _user, api = await require_user(request)
    return await plan_page(request, api, None)


@router.post("/plan")
async def choose_plan_only(request: Request) -> Response:
    _user, api = await require_user(request)
    fields = await form(request)
    error = await change_plan(api, fields.get("plan_id", ""))
    if error:
        return await plan_page(request, api, None, error[0], error=error[1])
    return RedirectResponse("/onboarding", status_code=303)


async def change_plan(api: ControlPlane, chosen: str) -> tuple[int, str] | None:
    """PUT /users/me/plan when `chosen` is not the current plan; (status, message) when refused."""
    try:
        uuid.UUID(chosen)
    except ValueError:
        return 400, "Pick one of the plans."
    me = await api.get("/users/me")
    if chosen == me["plan"]["id"]:
        return None
    try:
        await api.call("PUT", "/users/me/plan", {"plan_id": chosen})
    except ApiError as err:
        return (err.status if err.status >= 400 else 400), f"{err.title}: {err.detail}"
    return None


@router.get("/{agent_id}")
async def resume(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    return RedirectResponse(target(str(agent_id), progress(agent)["phase"]), status_code=303)


async def plan_page(request: Request, api: ControlPlane, agent: dict[str, Any] | None, status: int = 200,
                    error: str | None = None, notice: str | None = None) -> Response:
    plans = await api.get("/plans")
    me = await api.get("/users/me")
    return render(request, "onboarding_plan.html", status, agent=agent, plans=plans, current=me["plan"]["id"],
                  error=error, notice=notice, unread=await unread(api))


@router.get("/{agent_id}/plan", response_class=HTMLResponse)
async def step_plan(request: Request, agent_id: uuid.UUID, notice: str = "") -> Response:
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    phase = progress(agent)["phase"]
    if phase != "none":  # it has a VPS already: the plan was chosen
        return RedirectResponse(target(str(agent_id), phase), status_code=303)
    return await plan_page(request, api, agent, notice="The agent was created, but its personality could not be "
                           "saved; set it later in the Settings tab." if notice == "personality" else None)


@router.post("/{agent_id}/plan")
async def choose_plan(request: Request, agent_id: uuid.UUID) -> Response:
    """Step 2: the plan (PUT /users/me/plan when it changes), then provisioning on it."""
    _user, api = await require_user(request)
    fields = await form(request)
    agent = await agent_or_404(api, agent_id)
    phase = progress(agent)["phase"]
    if phase != "none":
        return RedirectResponse(target(str(agent_id), phase), status_code=303)
    error = await change_plan(api, fields.get("plan_id", ""))
    if error:
        return await plan_page(request, api, agent, error[0], error=error[1])
    reason = await provision(api, str(agent_id))
    if reason:
        return await plan_page(request, api, agent, 409, error=reason)
    return RedirectResponse(f"/onboarding/{agent_id}/provision", status_code=303)


@router.get("/{agent_id}/provision", response_class=HTMLResponse)
async def step_provision(request: Request, agent_id: uuid.UUID, notice: str = "", again: str = "") -> Response:
    """Step 3: live progress; a failure with its reason and "Try again"."""
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    now = progress(agent)
    if now["phase"] in ("ready", "other"):
        return RedirectResponse(target(str(agent_id), now["phase"]), status_code=303)
    again_on = bool(again) and now["phase"] in ("working", "none")
    if again_on and not notice:
        notice = ("The failed machine is being removed; a new one is set up right after." if now["phase"] == "working"
                  else "The failed machine was removed. Setting up a new one…")
    return render(request, "onboarding_progress.html", agent=agent, progress=now, notice=notice[:500] or None,
                  again=again_on, unread=await unread(api))


@router.get("/{agent_id}/status")
async def status(request: Request, agent_id: uuid.UUID, again: str = "") -> Response:
    """The progress page's poll: phase, step and the step list as JSON (no secrets: the user's own agent)."""
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    now = progress(agent)
    return JSONResponse({**now, "next": target(str(agent_id), now["phase"], again=bool(again))},
                        headers={"Cache-Control": "no-store"})


@router.post("/{agent_id}/retry")
async def retry(request: Request, agent_id: uuid.UUID) -> Response:
    """"Try again": a failed VPS (state `error`) is destroyed first, since the API allows one VPS per
    agent and its VM may linger; the progress page follows the destroy (`again`) and, once the VPS is
    gone, posts here once more, which provisions a new one as step 2 did. No request waits on a VM."""
    _user, api = await require_user(request)
    await form(request)
    agent = await agent_or_404(api, agent_id)
    page = f"/onboarding/{agent_id}/provision"
    phase = progress(agent)["phase"]
    if phase in ("working", "ready", "other"):  # nothing to retry (a double click, another tab)
        return RedirectResponse(target(str(agent_id), phase, again=phase == "working"), status_code=303)
    if phase == "failed":
        try:
            await api.call("DELETE", f"/agents/{agent_id}/vps")
        except ApiError as err:
            return render(request, "onboarding_progress.html", err.status if err.status >= 400 else 400,
                          agent=agent, progress=progress(agent), notice=readable(err), unread=await unread(api))
        return RedirectResponse(f"{page}?again=1", status_code=303)
    reason = await provision(api, str(agent_id))
    if reason:
        agent = await agent_or_404(api, agent_id)
        return render(request, "onboarding_progress.html", 409, agent=agent, progress=progress(agent),
                      notice=reason, unread=await unread(api))
    return RedirectResponse(page, status_code=303)


@router.get("/{agent_id}/channels", response_class=HTMLResponse)
async def step_channels(request: Request, agent_id: uuid.UUID) -> Response:
    """Step 4: connect a channel in the Channels tab, or skip."""
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    phase = progress(agent)["phase"]
    if phase != "ready":
        return RedirectResponse(target(str(agent_id), phase), status_code=303)
    return render(request, "onboarding_channels.html", agent=agent, channels=await channels_of(api, agent_id),
                  unread=await unread(api))


@router.get("/{agent_id}/done", response_class=HTMLResponse)
async def step_done(request: Request, agent_id: uuid.UUID) -> Response:
    _user, api = await require_user(request)
    agent = await agent_or_404(api, agent_id)
    return render(request, "onboarding_done.html", agent=agent, running=progress(agent)["phase"] == "ready",
                  chat_url=chat_url(request, agent_id), unread=await unread(api))
