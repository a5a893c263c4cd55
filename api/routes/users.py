"""The current user, their plan, and their monthly overage budget.

The plan is the user's own choice (PUT /users/me/plan): billing is not implemented yet (PRD §4.9),
so any active plan may be chosen, provided what the user has fits it: a plan with fewer agents or
VPSes than the user holds now is a 409 naming the excess, never a silent stop or delete.

Raising the budget is how a user stopped for overage gets going again: the start route allows a
start once the budget covers this month's overage cost (billing/overage.py), and the forward proxy
lets their tunnels through on its next check.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select

from api.deps import CurrentUser, SessionDep
from api.problems import Problem
from api.routes.plans import load_plan
from api.schemas import OverageBudgetIn, OverageBudgetOut, PlanChoiceIn, UserOut, problem_responses
from billing.overage import overage_verdict
from billing.plans import effective_plan, month_start
from billing.usage import load_snapshot
from db.models import Agent, OverageBudget, Plan, User, Vps, VpsState

router = APIRouter(prefix="/users/me", tags=["users"])


@router.get("", response_model=UserOut)
async def me(request: Request, session: SessionDep, user: CurrentUser) -> UserOut:
    plan = await effective_plan(session, user)
    return UserOut(id=user.id, email=user.email, name=user.name, image=user.image,  # type: ignore[arg-type]
                   email_verified=user.email_verified, is_admin=user.is_admin, usage_exempt=user.usage_exempt,
                   plan=await load_plan(session, plan, request.app.state.settings))


@router.put("/plan", response_model=UserOut, responses=problem_responses(404, 409))
async def choose_plan(body: PlanChoiceIn, request: Request, session: SessionDep, user: CurrentUser) -> UserOut:
    """Move to another active plan. 409 when the user's agents or VPSes (every VPS not destroyed, `error`
    included, as for provisioning) exceed its `max_agents` / `max_vpses`: delete or destroy some first.
    409 `usage-exceeds-plan` when this month's usage fits the current plan (and budget) but not the new
    one, so the move would get the user's VMs stopped by enforcement, unless `accept_overage_stop`."""
    # The same lock agent creation and provisioning take: no new agent or VPS slips past this check.
    await session.exec(select(User).where(User.id == user.id).with_for_update())
    plan = (await session.exec(select(Plan).where(Plan.id == body.plan_id,
                                                  col(Plan.deactivated_at).is_(None)))).first()
    if plan is None:
        raise Problem(404, "Plan not found", f"No plan {body.plan_id} is offered; GET /plans lists them.",
                      type_="not-found")
    agents = (await session.exec(select(func.count()).select_from(Agent).where(Agent.user_id == user.id))).one()
    vpses = (await session.exec(select(func.count()).select_from(Vps).where(
        Vps.user_id == user.id, Vps.state != VpsState.destroyed))).one()
    excess = [f"{n} {what} but it allows {cap} ({field})"
              for n, cap, what, field in ((agents, plan.max_agents, "agent(s)", "max_agents"),
                                          (vpses, plan.max_vpses, "VPS(es)", "max_vpses")) if n > cap]
    if excess:
        raise Problem(409, "Plan too small",
                      f"You cannot move to plan '{plan.name}': you have {'; and '.join(excess)}. "
                      "Delete agents or destroy VPSes first.", type_="conflict", plan_id=str(plan.id),
                      agents=agents, vpses=vpses, max_agents=plan.max_agents, max_vpses=plan.max_vpses)
    usage = await load_snapshot(session, user.id, user=user)
    after = overage_verdict(replace(usage, plan=plan))
    if not after.allowed and overage_verdict(usage).allowed and not body.accept_overage_stop:
        needed = after.required_budget_cents
        fix = (f"Raise your overage budget to at least ${needed / 100:,.2f} first, or" if needed is not None
               else "No overage budget covers that on this plan;")
        raise Problem(409, "Usage exceeds the new plan",
                      f"This month's usage is over plan '{plan.name}' ({after.reason}). Moving now would get "
                      f"your agents stopped. {fix} move at the start of next month.",
                      type_="usage-exceeds-plan", plan_id=str(plan.id), over=list(after.over),
                      overage_cents=after.overage_cents, budget_cents=after.budget_cents,
                      required_budget_cents=needed)
    user.plan_id = plan.id
    session.add(user)
    await session.commit()
    await session.refresh(user)
    return UserOut(id=user.id, email=user.email, name=user.name, image=user.image,  # type: ignore[arg-type]
                   email_verified=user.email_verified, is_admin=user.is_admin, usage_exempt=user.usage_exempt,
                   plan=await load_plan(session, plan, request.app.state.settings))


@router.get("/overage-budget", response_model=OverageBudgetOut)
async def get_budget(session: SessionDep, user: CurrentUser) -> OverageBudgetOut:
    period = month_start()
    row = (
        await session.exec(
            select(OverageBudget).where(OverageBudget.user_id == user.id, OverageBudget.period_start == period)
        )
    ).first()
    return OverageBudgetOut(budget_cents=row.budget_cents if row else 0, period_start=period)


@router.put("/overage-budget", response_model=OverageBudgetOut)
async def put_budget(body: OverageBudgetIn, session: SessionDep, user: CurrentUser) -> OverageBudgetOut:
    period = month_start()
    stmt = insert(OverageBudget).values(user_id=user.id, period_start=period, budget_cents=body.budget_cents)
    # Every change is a new revision: an automatic stop belongs to the revision it happened under, so a
    # user who raised the budget and goes over the new one is stopped again (activities/enforcement.py).
    stmt = stmt.on_conflict_do_update(
        constraint="uq_overage_budgets_user_month",
        set_={"budget_cents": body.budget_cents, "updated_at": stmt.excluded.updated_at,
              "revision": OverageBudget.revision + 1},  # type: ignore[operator]
    )
    await session.exec(stmt)  # type: ignore[call-overload]
    await session.commit()
    return OverageBudgetOut(budget_cents=body.budget_cents, period_start=period)
