"""An agent's VM: provision, start, stop, destroy. Each answers 202 with the operation id.

The API records intent and submits the operation to the VPS's entity workflow (api/operations.py),
which runs one operation at a time: a start or stop while another lifecycle operation is queued or
running is a 409 naming it; a destroy queues behind whatever runs. Start works from `stopped` and
`error`, stop from `running` and `error`, destroy from any state.

A VPS that may own a VM (every state but `destroyed`, `error` included) counts against `max_vpses`
and blocks a new VPS for its agent: destroy it first, so no VM outlives the knowledge of it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.deps import CurrentUser, SessionDep
from api.operations import (
    WORKFLOW_NAME,
    IdempotencyKey,
    accepted,
    active_operations,
    operation_id_for,
    record,
    replayed,
    submit,
    temporal,
    unavailable,
)
from api.problems import Problem
from api.routes.agents import agent_vps, owned_agent
from api.schemas import OperationAccepted, VpsDestroyed, problem_responses
from billing.plans import effective_plan
from billing.usage import current_verdict
from db.models import Agent, PlanVpsConfig, User, Vps, VpsConfig, VpsOperation, VpsState
from orchestration.search_attributes import run_attributes
from settings import Settings
from telemetry.metrics import OPERATIONS_SUBMITTED
from workflows.contracts import EntityInput, OperationKind, OperationRequest, VpsRef
from workflows.entity import ENTITY_RUN_TIMEOUT, VpsEntity, entity_id

router = APIRouter(prefix="/agents/{agent_id}/vps", tags=["vps"])
IDEMPOTENCY_NS = uuid.UUID("6f1c0a52-8f5e-4a8e-9b61-6d7e0d1c2a10")


class ProvisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vps_config_id: uuid.UUID


async def agent_and_vps(session: AsyncSession, user: User, agent_id: uuid.UUID) -> tuple[Agent, Vps]:
    agent = await owned_agent(session, user, agent_id)
    vps = await agent_vps(session, agent)
    if vps is None:
        raise Problem(404, "No VPS", f"Agent {agent_id} has no VPS; create one with POST /agents/{agent_id}/vps",
                      type_="not-found")
    return agent, vps


@router.post("", status_code=202, response_model=OperationAccepted,
             responses={202: {"description": "Provisioning started"}, **problem_responses(402, 403, 404, 409)})
async def provision(agent_id: uuid.UUID, body: ProvisionIn, request: Request, session: SessionDep,
                    user: CurrentUser, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    settings: Settings = request.app.state.settings
    await session.exec(select(User).where(User.id == user.id).with_for_update())  # serialize the limit check
    agent = await owned_agent(session, user, agent_id, lock=True)
    vps_id = uuid.uuid5(IDEMPOTENCY_NS, f"{user.id}:{agent.id}:{idempotency_key}") if idempotency_key else uuid.uuid4()
    operation_id = f"provision-{vps_id}"
    earlier = await replayed(session, user, idempotency_key, operation_id)
    if earlier is not None:
        return accepted(agent_id, vps_id, operation_id, OperationKind.provision, earlier.status)
    current = await agent_vps(session, agent)
    if current is not None and current.state != VpsState.destroyed:
        raise Problem(409, "Agent already has a VPS",
                      f"Agent {agent_id} already has a VPS ({current.state}); destroy it first "
                      f"(DELETE /agents/{agent_id}/vps).", type_="conflict", vps_id=str(current.id),
                      vps_state=current.state)
    plan = await effective_plan(session, user)
    config = (await session.exec(
        select(VpsConfig).join(PlanVpsConfig, col(PlanVpsConfig.vps_config_id) == col(VpsConfig.id))
        .where(VpsConfig.id == body.vps_config_id, PlanVpsConfig.plan_id == plan.id,
               col(VpsConfig.deactivated_at).is_(None)))).first()
    if config is None:
        raise Problem(403, "VPS config not allowed",
                      f"VPS config {body.vps_config_id} is not available on plan '{plan.name}'; "
                      "GET /plans lists the configs each plan allows.", type_="plan-limit", limit="vps_config")
    if config.provider not in settings.configured_providers():
        raise Problem(409, "Provider not configured",
                      f"The {config.provider} provider is not configured on this control plane.",
                      type_="provider-unavailable", provider=config.provider)
    await refuse_over_budget(session, user, "provision")
    # Every VPS that may own a VM counts, `error` included: its VM may still be billed.
    owned = (await session.exec(select(func.count()).select_from(Vps).where(
        Vps.user_id == user.id, Vps.state != VpsState.destroyed))).one()
    if owned >= plan.max_vpses:
        raise Problem(403, "Plan limit reached",
                      f"Your plan '{plan.name}' allows {plan.max_vpses} VPS(es) (max_vpses); you have {owned} "
                      "(VPSes in error count until destroyed).",
                      type_="plan-limit", limit="max_vpses", max=plan.max_vpses, current=owned)
    previous = agent.vps_id
    vps = Vps(id=vps_id, user_id=user.id, vps_config_id=config.id, provider=config.provider,  # type: ignore[arg-type]
              state=VpsState.provisioning)
    session.add(vps)
    await session.flush()
    agent.vps_id = vps_id
    agent.updated_at = datetime.now(UTC)
    session.add(agent)
    ref = VpsRef(vps_id=str(vps_id), agent_id=str(agent.id), user_id=str(user.id))
    # The VPS row must exist before its workflow runs, so here the row comes first and is taken back
    # if Temporal does not accept the run.
    await record(session, operation_id, ref, OperationKind.provision, idempotency_key, {})
    try:
        await start_entity(request, ref, operation_id)
    except Problem:
        await session.exec(update(Agent).where(col(Agent.id) == agent.id, col(Agent.vps_id) == vps_id)  # type: ignore[call-overload]
                           .values(vps_id=previous))
        await session.exec(delete(VpsOperation).where(col(VpsOperation.id) == operation_id))  # type: ignore[call-overload]
        await session.exec(delete(Vps).where(col(Vps.id) == vps_id))  # type: ignore[call-overload]
        await session.commit()
        raise
    OPERATIONS_SUBMITTED.labels(kind=OperationKind.provision.value).inc()
    return accepted(agent_id, vps_id, operation_id, OperationKind.provision)


async def start_entity(request: Request, ref: VpsRef, operation_id: str) -> None:
    """A new VPS's entity, started with the provision in its input: durable without a worker."""
    settings: Settings = request.app.state.settings
    client = await temporal(request)
    req = OperationRequest(vps=ref, operation_id=operation_id, operation=OperationKind.provision,
                           timeouts=request.app.state.lifecycle_timeouts)
    try:
        await client.start_workflow(
            VpsEntity.run, EntityInput(vps=ref, queue=[req]), id=entity_id(ref.vps_id),
            task_queue=settings.temporal_task_queue, run_timeout=ENTITY_RUN_TIMEOUT,
            search_attributes=run_attributes(user_id=ref.user_id, agent_id=ref.agent_id, vps_id=ref.vps_id),
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL, id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE)
    except WorkflowAlreadyStartedError:
        return  # an earlier attempt of this very request started it
    except RPCError as err:
        raise unavailable(f"Could not start provisioning: {err.message}; nothing was changed.") from None


async def _lifecycle(agent_id: uuid.UUID, request: Request, session: AsyncSession, user: User, key: str | None,
                     kind: OperationKind, allowed: tuple[str, ...]) -> JSONResponse:
    agent, vps = await agent_and_vps(session, user, agent_id)
    operation_id = operation_id_for(kind.value, vps.id, user, key)
    earlier = await replayed(session, user, key, operation_id)
    if earlier is not None:
        return accepted(agent_id, vps.id, operation_id, kind, earlier.status)
    if vps.state not in allowed:
        busy = (await active_operations(session, [vps.id])).get(vps.id)
        if busy is not None:
            name = WORKFLOW_NAME[OperationKind(busy.kind)]
            raise Problem(409, "Operation in progress", f"{name} ({busy.id}) is {busy.status} on this VPS"
                          f"{f' at step {busy.step}' if busy.step else ''}; wait for it to finish.",
                          type_="operation-in-progress", running_operation_id=busy.id, running_operation=name,
                          vps_state=vps.state)
        raise Problem(409, f"Cannot {kind}", f"The VPS is {vps.state}; {kind} needs it to be {' or '.join(allowed)}.",
                      type_="invalid-state", vps_state=vps.state)
    if kind == OperationKind.start:
        await refuse_over_budget(session, user)
    done = await submit(request, session, user, agent, vps, kind, operation_id, key)
    return accepted(agent_id, vps.id, done.operation_id, done.operation)


async def refuse_over_budget(session: AsyncSession, user: User, action: str = "start") -> None:
    """402 when this month's usage is over the plan and the overage budget (the decision the automatic
    stop and the forward proxy use, exemption included): a started or new VPS would only be stopped again."""
    verdict = await current_verdict(session, user)
    if verdict.allowed:
        return
    if verdict.budget_can_fix:
        fix = (f"Raise this month's overage budget to at least {verdict.overage_cents} cents "
               f"(PUT /users/me/overage-budget with {{\"budget_cents\": {verdict.overage_cents}}}), "
               f"then {action} again.")
    else:
        fix = "No overage budget covers it: move to a plan with a larger limit, or wait for next month."
    raise Problem(402, "Over plan limits and overage budget", f"Cannot {action}: {verdict.reason}. {fix}",
                  type_="overage-budget-exceeded", overage_cents=verdict.overage_cents,
                  budget_cents=verdict.budget_cents, required_budget_cents=verdict.required_budget_cents,
                  over=list(verdict.over))


@router.post("/start", status_code=202, response_model=OperationAccepted, responses=problem_responses(402, 404, 409))
async def start(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    return await _lifecycle(agent_id, request, session, user, idempotency_key, OperationKind.start,
                            (VpsState.stopped, VpsState.error))


@router.post("/stop", status_code=202, response_model=OperationAccepted, responses=problem_responses(404, 409))
async def stop(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser,
               idempotency_key: IdempotencyKey = None) -> JSONResponse:
    return await _lifecycle(agent_id, request, session, user, idempotency_key, OperationKind.stop,
                            (VpsState.running, VpsState.error))


@router.delete("", status_code=202, response_model=OperationAccepted,
               responses={200: {"model": VpsDestroyed, "description": "Already destroyed"},
                          **problem_responses(404, 409)})
async def destroy(agent_id: uuid.UUID, request: Request, session: SessionDep, user: CurrentUser,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    _, vps = await agent_and_vps(session, user, agent_id)
    if vps.state == VpsState.destroyed:
        body: dict[str, Any] = {"vps_id": str(vps.id), "state": "destroyed", "operation_id": None}
        return JSONResponse(body, status_code=200)
    return await _lifecycle(agent_id, request, session, user, idempotency_key, OperationKind.destroy,
                            (VpsState.provisioning, VpsState.running, VpsState.stopped, VpsState.error))
