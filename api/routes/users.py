"""The current user, their plan, and their monthly overage budget.

Raising the budget is how a user stopped for overage gets going again: the start route allows a
start once the budget covers this month's overage cost (billing/overage.py), and the forward proxy
lets their tunnels through on its next check.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import select

from api.deps import CurrentUser, SessionDep
from api.routes.plans import load_plan
from api.schemas import OverageBudgetIn, OverageBudgetOut, UserOut
from billing.plans import effective_plan, month_start
from db.models import OverageBudget

router = APIRouter(prefix="/users/me", tags=["users"])


@router.get("", response_model=UserOut)
async def me(request: Request, session: SessionDep, user: CurrentUser) -> UserOut:
    plan = await effective_plan(session, user)
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
