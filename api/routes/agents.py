"""Agents: create within the plan's limit, list, read, delete. Every query is scoped to the user."""

from __future__ import annotations

import secrets
import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import CurrentUser, SessionDep, one_snapshot
from api.operations import active_operations, cancel_operation, last_operations, operation_out
from api.problems import Problem
from api.schemas import (
    AgentCreate,
    AgentOut,
    CancelOut,
    OperationOut,
    Page,
    SettingsSync,
    VpsOut,
    problem_responses,
)
from billing.plans import effective_plan
from db.models import Agent, User, Vps, VpsOperation, VpsState

router = APIRouter(prefix="/agents", tags=["agents"])


async def agents_out(session: AsyncSession, pairs: list[tuple[Agent, Vps | None]]) -> list[AgentOut]:
    """Agents with their VPS, its operation in flight and its last outcome (two queries for any page)."""
    vps_ids = [vps.id for _, vps in pairs if vps is not None]
    active = await active_operations(session, vps_ids)
    last = await last_operations(session, vps_ids)
    out = []
    for agent, vps in pairs:
        vps_out = None
        if vps is not None:
            now, done = active.get(vps.id), last.get(vps.id)
            vps_out = VpsOut.model_validate({
                **vps.model_dump(), "operation_id": now.id if now else None, "step": now.step if now else None,
                "operation": operation_out(now) if now else None,
                "last_operation": operation_out(done) if done else None})
        applied = vps.applied_settings_version if vps is not None else None
        out.append(AgentOut(
            id=agent.id,  # type: ignore[arg-type]
            name=agent.name, model=agent.model, gateway_token_hint="…" + agent.gateway_token_last4, vps=vps_out,
            settings=SettingsSync(saved_version=agent.settings_version, applied_version=applied,
                                  in_sync=applied == agent.settings_version),
            created_at=agent.created_at,
        ))
    return out


async def owned_agent(session: AsyncSession, user: User, agent_id: uuid.UUID, *, lock: bool = False) -> Agent:
    """The user's agent or a 404 — another user's agent looks exactly like a missing one."""
    stmt = select(Agent).where(Agent.id == agent_id, Agent.user_id == user.id)
    if lock:
        stmt = stmt.with_for_update()
    agent = (await session.exec(stmt)).first()
    if agent is None:
        raise Problem(404, "Not found", f"No agent {agent_id}", type_="not-found")
    return agent


async def agent_vps(session: AsyncSession, agent: Agent) -> Vps | None:
    if agent.vps_id is None:
        return None
    return await session.get(Vps, agent.vps_id)


@router.post("", status_code=201, response_model=AgentOut, responses=problem_responses(403, 409))
async def create_agent(body: AgentCreate, session: SessionDep, user: CurrentUser, response: Response) -> AgentOut:
    # Lock the user row so two concurrent creates cannot both pass the limit check.
    await session.exec(select(User).where(User.id == user.id).with_for_update())
    plan = await effective_plan(session, user)
    count = (await session.exec(select(func.count()).select_from(Agent).where(Agent.user_id == user.id))).one()
    if count >= plan.max_agents:
        raise Problem(
            403, "Plan limit reached",
            f"Your plan '{plan.name}' allows {plan.max_agents} agent(s) (max_agents); you have {count}.",
            type_="plan-limit", limit="max_agents", max=plan.max_agents, current=count,
        )
    token = secrets.token_hex(32)
    agent = Agent(user_id=user.id, name=body.name, model=body.model,  # type: ignore[arg-type]
                  gateway_token=token, gateway_token_last4=token[-4:])
    session.add(agent)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise Problem(409, "Name taken", f"You already have an agent named '{body.name}'",
                      type_="conflict") from None
    await session.refresh(agent)
    response.headers["Location"] = f"/agents/{agent.id}"
    return (await agents_out(session, [(agent, None)]))[0]


@router.get("", response_model=Page[AgentOut])
async def list_agents(
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Page[AgentOut]:
    await one_snapshot(session)
    total = (await session.exec(select(func.count()).select_from(Agent).where(Agent.user_id == user.id))).one()
    rows = (
        await session.exec(
            select(Agent, Vps)
            .join(Vps, col(Agent.vps_id) == col(Vps.id), isouter=True)
            .where(Agent.user_id == user.id)
            .order_by(col(Agent.created_at), col(Agent.id))
            .limit(limit)
            .offset(offset)
        )
    ).all()
    return Page(items=await agents_out(session, [(a, v) for a, v in rows]), total=total, limit=limit, offset=offset)


@router.get("/{agent_id}", response_model=AgentOut, responses=problem_responses(404))
async def get_agent(agent_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> AgentOut:
    await one_snapshot(session)
    agent = await owned_agent(session, user, agent_id)
    return (await agents_out(session, [(agent, await agent_vps(session, agent))]))[0]


@router.get("/{agent_id}/operations", response_model=Page[OperationOut], responses=problem_responses(404))
async def list_operations(
    agent_id: uuid.UUID, session: SessionDep, user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20, offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Page[OperationOut]:
    """Every operation on the agent's VPSes, newest first, with its outcome."""
    agent = await owned_agent(session, user, agent_id)
    scope = select(VpsOperation).join(Agent, col(Agent.vps_id) == col(VpsOperation.vps_id)).where(
        Agent.id == agent.id, VpsOperation.user_id == user.id)
    total = (await session.exec(select(func.count()).select_from(scope.subquery()))).one()
    rows = (await session.exec(scope.order_by(col(VpsOperation.created_at).desc()).limit(limit).offset(offset))).all()
    return Page(items=[OperationOut.model_validate(operation_out(r)) for r in rows], total=total, limit=limit,
                offset=offset)


async def owned_operation(session: AsyncSession, user: User, agent_id: uuid.UUID, operation_id: str) -> VpsOperation:
    await owned_agent(session, user, agent_id)
    row = (await session.exec(select(VpsOperation).join(Agent, col(Agent.vps_id) == col(VpsOperation.vps_id)).where(
        VpsOperation.id == operation_id, VpsOperation.user_id == user.id, Agent.id == agent_id))).first()
    if row is None:
        raise Problem(404, "Not found", f"No operation {operation_id} on agent {agent_id}", type_="not-found")
    return row


@router.get("/{agent_id}/operations/{operation_id}", response_model=OperationOut,
             responses=problem_responses(404))
async def get_operation(agent_id: uuid.UUID, operation_id: Annotated[str, Path(max_length=255)],
                        session: SessionDep, user: CurrentUser) -> OperationOut:
    return OperationOut.model_validate(operation_out(await owned_operation(session, user, agent_id, operation_id)))


@router.post("/{agent_id}/operations/{operation_id}/cancel", status_code=202, response_model=CancelOut,
             responses=problem_responses(404, 409, 503))
async def cancel(request: Request, agent_id: uuid.UUID, operation_id: Annotated[str, Path(max_length=255)],
                 session: SessionDep, user: CurrentUser) -> CancelOut:
    """Cancel a provision or a start, queued or running. A running one stops at its current step,
    removes what it made (a provision's VM) and ends `cancelled`; the VPS is then in `error`."""
    row = await owned_operation(session, user, agent_id, operation_id)
    await session.commit()  # no transaction held open across the call to Temporal
    outcome = await cancel_operation(request, row)
    return CancelOut(operation_id=row.id, status=outcome,
                     status_url=f"/agents/{agent_id}/operations/{row.id}")


@router.delete("/{agent_id}", status_code=204, responses=problem_responses(404, 409))
async def delete_agent(agent_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> Response:
    agent = await owned_agent(session, user, agent_id, lock=True)
    vps = await agent_vps(session, agent)
    if vps is not None and vps.state != VpsState.destroyed:
        raise Problem(409, "Agent has a VPS",
                      f"Destroy the agent's VPS first (DELETE /agents/{agent_id}/vps); it is {vps.state}.",
                      type_="conflict", vps_state=vps.state)
    await session.delete(agent)
    await session.commit()
    return Response(status_code=204)
