"""An agent's VM: provision, start, stop, destroy. Each answers 202 with the operation id.

The API only records intent and starts a workflow; the workflow does the work. One lifecycle
operation per VPS at a time: the VPS row holds the running operation's id (taken under a row
lock), and a second request gets 409 naming it. A POST with an `Idempotency-Key` header maps to
a deterministic VPS / workflow id, so a retried request returns the same operation.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from api.deps import CurrentUser, SessionDep
from api.problems import Problem
from api.routes.agents import agent_vps, owned_agent
from api.schemas import OperationAccepted, VpsDestroyed, problem_responses
from billing.plans import effective_plan
from db.models import Agent, PlanVpsConfig, User, Vps, VpsConfig, VpsState
from orchestration.search_attributes import run_attributes
from settings import Settings
from workflows.contracts import OperationInput, VpsRef
from workflows.lifecycle import DestroyVps, ProvisionVps, StartVps, StopVps

router = APIRouter(prefix="/agents/{agent_id}/vps", tags=["vps"])
IDEMPOTENCY_NS = uuid.UUID("6f1c0a52-8f5e-4a8e-9b61-6d7e0d1c2a10")
LIVE_STATES = (VpsState.provisioning, VpsState.running, VpsState.stopped)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


class ProvisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vps_config_id: uuid.UUID


def accepted(agent_id: uuid.UUID, vps_id: Any, operation_id: str, operation: str) -> JSONResponse:
    return JSONResponse(status_code=202, headers={"Location": f"/agents/{agent_id}"},
                        content={"operation_id": operation_id, "operation": operation, "vps_id": str(vps_id),
                                 "status_url": f"/agents/{agent_id}"})


def operation_id_for(kind: str, vps_id: Any, user: User, key: str | None) -> str:
    suffix = (hashlib.sha256(f"{user.id}:{key}".encode()).hexdigest()[:16] if key else uuid.uuid4().hex[:16])
    return f"{kind}-{vps_id}-{suffix}"


async def temporal(request: Request) -> Client:
    try:
        return await request.app.state.temporal()  # type: ignore[no-any-return]
    except Exception as err:  # noqa: BLE001  (connection errors come in many types)
        raise Problem(503, "Orchestrator unavailable", f"Temporal is unreachable ({type(err).__name__}); "
                      "nothing was changed, try again shortly.", type_="unavailable") from None


async def operation_running(client: Client, operation_id: str) -> str | None:
    """The workflow type if `operation_id` is still running; None when it finished (or vanished)."""
    try:
        desc = await client.get_workflow_handle(operation_id).describe()
    except RPCError:
        return None
    return desc.workflow_type if desc.status == WorkflowExecutionStatus.RUNNING else None


async def start_operation(request: Request, session: AsyncSession, user: User, agent: Agent, vps: Vps,
                          workflow: Any, operation_id: str, input_type: type[OperationInput] = OperationInput,
                          **extra: Any) -> None:
    """Start the run while the row lock is held; if Temporal refuses, the transaction rolls back."""
    client = await temporal(request)
    settings: Settings = request.app.state.settings
    inp = input_type(vps=VpsRef(vps_id=str(vps.id), agent_id=str(agent.id), user_id=str(user.id)),
                     operation_id=operation_id, timeouts=request.app.state.lifecycle_timeouts, **extra)
    try:
        await client.start_workflow(
            workflow.run, inp, id=operation_id, task_queue=settings.temporal_task_queue,
            search_attributes=run_attributes(user_id=str(user.id), agent_id=str(agent.id), vps_id=str(vps.id)),
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except RPCError as err:
        await session.rollback()
        raise Problem(503, "Orchestrator unavailable", f"Could not start the operation: {err.message}",
                      type_="unavailable") from None
    await session.commit()


async def locked_vps(session: AsyncSession, user: User, agent_id: uuid.UUID) -> tuple[Agent, Vps]:
    agent = await owned_agent(session, user, agent_id)
    if agent.vps_id is None:
        raise Problem(404, "No VPS", f"Agent {agent_id} has no VPS; create one with POST /agents/{agent_id}/vps",
                      type_="not-found")
    vps = (await session.exec(select(Vps).where(Vps.id == agent.vps_id, Vps.user_id == user.id)
                              .with_for_update())).one()
    return agent, vps


async def claim(request: Request, session: AsyncSession, vps: Vps, operation_id: str) -> bool:
    """Take the VPS's operation slot; False when this exact operation already holds it (a retry)."""
    if vps.operation_id == operation_id:
        return False
    if vps.operation_id is not None:
        client = await temporal(request)
        running = await operation_running(client, vps.operation_id)
        if running:
            raise Problem(409, "Operation in progress",
                          f"{running} ({vps.operation_id}) is still running on this VPS"
                          f"{f' at step {vps.step}' if vps.step else ''}; wait for it to finish.",
                          type_="operation-in-progress", running_operation_id=vps.operation_id,
                          running_operation=running)
    vps.operation_id = operation_id
    vps.step = "queued"
    session.add(vps)
    await session.flush()
    return True


@router.post("", status_code=202, response_model=OperationAccepted,
             responses={202: {"description": "Provisioning started"}, **problem_responses(403, 404, 409)})
async def provision(agent_id: uuid.UUID, body: ProvisionIn, request: Request, session: SessionDep,
                    user: CurrentUser, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    settings: Settings = request.app.state.settings
    await session.exec(select(User).where(User.id == user.id).with_for_update())  # serialize the limit check
    agent = await owned_agent(session, user, agent_id, lock=True)
    vps_id = uuid.uuid5(IDEMPOTENCY_NS, f"{user.id}:{agent.id}:{idempotency_key}") if idempotency_key else uuid.uuid4()
    current = await agent_vps(session, agent)
    if current is not None and current.id == vps_id:
        return accepted(agent_id, vps_id, f"provision-{vps_id}", "ProvisionVps")  # a retried request
    if idempotency_key and await session.get(Vps, vps_id) is not None:
        raise Problem(409, "Idempotency-Key reused", "This Idempotency-Key was already used for an earlier VPS "
                      "of this agent; send a new key for a new request.", type_="conflict")
    if current is not None and current.state in LIVE_STATES:
        raise Problem(409, "Agent already has a VPS", f"Agent {agent_id} already has a VPS ({current.state}).",
                      type_="conflict", vps_id=str(current.id), vps_state=current.state)
    plan = await effective_plan(session, user)
    config = (await session.exec(
        select(VpsConfig).join(PlanVpsConfig, col(PlanVpsConfig.vps_config_id) == col(VpsConfig.id))
        .where(VpsConfig.id == body.vps_config_id, PlanVpsConfig.plan_id == plan.id))).first()
    if config is None:
        raise Problem(403, "VPS config not allowed",
                      f"VPS config {body.vps_config_id} is not available on plan '{plan.name}'; "
                      "GET /plans lists the configs each plan allows.", type_="plan-limit", limit="vps_config")
    if config.provider not in settings.configured_providers():
        raise Problem(409, "Provider not configured",
                      f"The {config.provider} provider is not configured on this control plane.",
                      type_="provider-unavailable", provider=config.provider)
    live = (await session.exec(select(func.count()).select_from(Vps).where(
        Vps.user_id == user.id, col(Vps.state).in_(LIVE_STATES)))).one()
    if live >= plan.max_vpses:
        raise Problem(403, "Plan limit reached",
                      f"Your plan '{plan.name}' allows {plan.max_vpses} VPS(es) (max_vpses); you have {live}.",
                      type_="plan-limit", limit="max_vpses", max=plan.max_vpses, current=live)
    operation_id = f"provision-{vps_id}"
    vps = Vps(id=vps_id, user_id=user.id, vps_config_id=config.id, provider=config.provider,  # type: ignore[arg-type]
              state=VpsState.provisioning, step="queued", operation_id=operation_id)
    session.add(vps)
    await session.flush()
    agent.vps_id = vps_id
    agent.updated_at = datetime.now(UTC)
    session.add(agent)
    await session.flush()
    await start_operation(request, session, user, agent, vps, ProvisionVps, operation_id)
    return accepted(agent_id, vps_id, operation_id, "ProvisionVps")


async def _transition(agent: Agent, vps: Vps, request: Request, session: AsyncSession, user: User,
                      key: str | None, *, kind: str, workflow: Any, allowed: tuple[str, ...]) -> JSONResponse:
    agent_id: uuid.UUID = agent.id  # type: ignore[assignment]
    operation_id = operation_id_for(kind, vps.id, user, key)
    if vps.operation_id == operation_id:
        return accepted(agent_id, vps.id, operation_id, workflow.__name__)
    if vps.state not in allowed and vps.operation_id is None:
        raise Problem(409, f"Cannot {kind}", f"The VPS is {vps.state}; {kind} needs it to be {' or '.join(allowed)}.",
                      type_="invalid-state", vps_state=vps.state)
    await claim(request, session, vps, operation_id)
    if vps.state not in allowed:
        raise Problem(409, f"Cannot {kind}", f"The VPS is {vps.state}; {kind} needs it to be {' or '.join(allowed)}.",
                      type_="invalid-state", vps_state=vps.state)
    await start_operation(request, session, user, agent, vps, workflow, operation_id)
    return accepted(agent_id, vps.id, operation_id, workflow.__name__)


@router.post("/start", status_code=202, response_model=OperationAccepted, responses=problem_responses(404, 409))
async def start(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    agent, vps = await locked_vps(session, user, agent_id)
    return await _transition(agent, vps, request, session, user, idempotency_key, kind="start", workflow=StartVps,
                             allowed=(VpsState.stopped,))


@router.post("/stop", status_code=202, response_model=OperationAccepted, responses=problem_responses(404, 409))
async def stop(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser,
               idempotency_key: IdempotencyKey = None) -> JSONResponse:
    agent, vps = await locked_vps(session, user, agent_id)
    return await _transition(agent, vps, request, session, user, idempotency_key, kind="stop", workflow=StopVps,
                             allowed=(VpsState.running,))


@router.delete("", status_code=202, response_model=OperationAccepted,
               responses={200: {"model": VpsDestroyed, "description": "Already destroyed"},
                          **problem_responses(404, 409)})
async def destroy(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    agent, vps = await locked_vps(session, user, agent_id)
    if vps.state == VpsState.destroyed and vps.operation_id is None:
        return JSONResponse({"vps_id": str(vps.id), "state": "destroyed", "operation_id": None}, status_code=200)
    return await _transition(agent, vps, request, session, user, idempotency_key, kind="destroy",
                             workflow=DestroyVps, allowed=(VpsState.running, VpsState.stopped, VpsState.error,
                                                           VpsState.provisioning))
