"""An agent's settings (personality files, model) and restart."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StringConstraints, model_validator

from api.deps import CurrentUser, SessionDep
from api.problems import Problem
from api.routes.agents import owned_agent
from api.routes.vps import accepted, claim, locked_vps, operation_id_for, start_operation
from api.schemas import ModelId, OperationAccepted, SettingsSaved, problem_responses, settings_request
from db.models import Vps, VpsState
from workflows.agent_ops import PushConfig, RestartAgent

router = APIRouter(prefix="/agents/{agent_id}", tags=["agents"])
FileText = Annotated[str, StringConstraints(max_length=64 * 1024)]




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


@router.patch("/settings", response_model=SettingsSaved,
              responses={202: {"model": OperationAccepted, "description": "Saved; PushConfig started (agent running)"},
                         **problem_responses(404, 409)},
              openapi_extra=settings_request(("AGENTS.md", "SOUL.md", "IDENTITY.md"), 64 * 1024))
async def update_settings(agent_id: uuid.UUID, body: SettingsIn, request: Request, session: SessionDep,
                          user: CurrentUser) -> JSONResponse:
    """Saved at once; pushed to the gateway now if it runs, otherwise on its next start."""
    agent = await owned_agent(session, user, agent_id, lock=True)
    vps: Vps | None = None
    if agent.vps_id is not None:
        _, vps = await locked_vps(session, user, agent_id)
    operation_id = None
    if vps is not None and vps.state == VpsState.running:
        operation_id = operation_id_for("settings", vps.id, user, None)
        await claim(request, session, vps, operation_id)  # 409 while another operation runs
    if body.files:
        agent.personality = {**(agent.personality or {}), **body.files}
    if body.model:
        agent.model = body.model
    agent.updated_at = datetime.now(UTC)
    session.add(agent)
    await session.flush()
    if vps is not None and operation_id is not None:
        await start_operation(request, session, user, agent, vps, PushConfig, operation_id)
        return accepted(agent_id, vps.id, operation_id, "PushConfig")
    await session.commit()
    return JSONResponse({"saved": True, "applied": "on the next start of the agent's VPS"}, status_code=200)


@router.post("/restart", status_code=202, response_model=OperationAccepted, responses=problem_responses(404, 409))
async def restart(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser) -> JSONResponse:
    agent, vps = await locked_vps(session, user, agent_id)
    if vps.state != VpsState.running:
        raise Problem(409, "Agent is not running", f"The agent's VPS is {vps.state}; restart needs it running.",
                      type_="invalid-state", vps_state=vps.state)
    operation_id = operation_id_for("restart", vps.id, user, None)
    await claim(request, session, vps, operation_id)
    await start_operation(request, session, user, agent, vps, RestartAgent, operation_id)
    return accepted(agent_id, vps.id, operation_id, "RestartAgent")
