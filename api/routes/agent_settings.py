"""An agent's settings (personality files, model) and restart."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

from api.deps import CurrentUser, SessionDep
from api.operations import IdempotencyKey, accepted, operation_id_for, replayed, submit
from api.problems import Problem
from api.routes.agents import agent_vps, owned_agent
from api.routes.vps import agent_and_vps
from api.schemas import (
    AgentSettingsOut,
    ModelId,
    OperationAccepted,
    SettingsSaved,
    problem_responses,
    settings_request,
)
from db.models import VpsState
from openclaw.agent_env import DEFAULT_MODEL
from workflows.contracts import OperationKind

router = APIRouter(prefix="/agents/{agent_id}", tags=["agents"])
FileText = Annotated[str, StringConstraints(max_length=64 * 1024)]
FILES = ("AGENTS.md", "SOUL.md", "IDENTITY.md")


class SettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    files: dict[str, FileText] | None = None
    model: ModelId | None = None

    @model_validator(mode="after")
    def _check(self) -> SettingsIn:
        if self.files is None and self.model is None:
            raise ValueError("send at least one of files, model")
        unknown = set(self.files or {}) - {"AGENTS.md", "SOUL.md", "IDENTITY.md"}
        if unknown:
            raise ValueError(f"files may only be AGENTS.md, SOUL.md, IDENTITY.md (not {', '.join(sorted(unknown))})")
        for name, text in (self.files or {}).items():
            if "\x00" in text:
                raise ValueError(f"files.{name} contains a NUL byte")
        return self


@router.get("/settings", response_model=AgentSettingsOut, responses=problem_responses(404))
async def get_settings(agent_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> AgentSettingsOut:
    """The saved settings, so an editor starts from them rather than from a blank page."""
    agent = await owned_agent(session, user, agent_id)
    saved = agent.personality or {}
    return AgentSettingsOut(files={name: str(saved.get(name) or "") for name in FILES}, model=agent.model,
                            default_model=DEFAULT_MODEL, settings_version=agent.settings_version)


@router.patch("/settings", response_model=SettingsSaved,
              responses={202: {"model": OperationAccepted, "description": "Saved; PushConfig started (agent running)"},
                         **problem_responses(404, 409)},
              openapi_extra=settings_request(("AGENTS.md", "SOUL.md", "IDENTITY.md"), 64 * 1024))
async def update_settings(agent_id: uuid.UUID, body: SettingsIn, request: Request, session: SessionDep,
                          user: CurrentUser, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Saved at once; pushed to the gateway if it runs (queued behind any running operation),
    otherwise applied at its next start. `GET /agents/{id}` says whether the gateway holds them."""
    agent = await owned_agent(session, user, agent_id, lock=True)
    vps = await agent_vps(session, agent)
    operation_id = operation_id_for("settings", vps.id, user, idempotency_key) if vps is not None else None
    if vps is not None and operation_id is not None:
        earlier = await replayed(session, user, idempotency_key, operation_id)
        if earlier is not None:
            return accepted(agent_id, vps.id, operation_id, OperationKind.settings, earlier.status)
    personality = {**(agent.personality or {}), **(body.files or {})}
    model = body.model or agent.model
    in_sync = vps is not None and vps.applied_settings_version == agent.settings_version
    if personality == (agent.personality or {}) and model == agent.model:
        # A form saved as it was loaded: no new version, and no push (a gateway restart) unless the
        # gateway does not hold these settings yet (a push that failed is retried this way).
        if in_sync or vps is None or vps.state not in (VpsState.running, VpsState.provisioning):
            return JSONResponse({"saved": True, "unchanged": True, "settings_version": agent.settings_version,
                                 "applied": "nothing changed" if in_sync else "on the next start of the agent's VPS"},
                                status_code=200)
    else:
        agent.personality = personality
        agent.model = model
        agent.settings_version += 1
        agent.updated_at = datetime.now(UTC)
        session.add(agent)
        await session.commit()
    if vps is None or operation_id is None or vps.state not in (VpsState.running, VpsState.provisioning):
        return JSONResponse({"saved": True, "applied": "on the next start of the agent's VPS",
                             "settings_version": agent.settings_version, "unchanged": False}, status_code=200)
    try:
        done = await submit(request, session, user, agent, vps, OperationKind.settings, operation_id, idempotency_key)
    except Problem as problem:
        problem.detail = f"The settings were saved, but pushing them to the agent failed: {problem.detail}"
        raise
    return accepted(agent_id, vps.id, done.operation_id, done.operation)


@router.post("/restart", status_code=202, response_model=OperationAccepted,
             responses=problem_responses(404, 409, 429))
async def restart(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    agent, vps = await agent_and_vps(session, user, agent_id)
    operation_id = operation_id_for("restart", vps.id, user, idempotency_key)
    earlier = await replayed(session, user, idempotency_key, operation_id)
    if earlier is not None:
        return accepted(agent_id, vps.id, operation_id, OperationKind.restart, earlier.status)
    if vps.state != VpsState.running:
        raise Problem(409, "Agent is not running", f"The agent's VPS is {vps.state}; restart needs it running.",
                      type_="invalid-state", vps_state=vps.state)
    done = await submit(request, session, user, agent, vps, OperationKind.restart, operation_id, idempotency_key)
    return accepted(agent_id, vps.id, done.operation_id, done.operation)
