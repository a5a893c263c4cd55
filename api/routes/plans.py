"""Plans and the VPS configs each allows (public to any authenticated frontend call)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import selectinload
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import CurrentUser, SessionDep
from api.schemas import PlanOut, VpsConfigOut
from db.models import Plan

router = APIRouter(prefix="/plans", tags=["plans"])


def plan_out(plan: Plan) -> PlanOut:
    configs = sorted(plan.vps_configs, key=lambda c: (c.provider, c.name))
    return PlanOut.model_validate(
        {**plan.model_dump(), "vps_configs": [VpsConfigOut.model_validate(c.model_dump()) for c in configs]}
    )


async def load_plan(session: AsyncSession, plan: Plan) -> PlanOut:
    loaded = (
        await session.exec(select(Plan).where(Plan.id == plan.id).options(selectinload(Plan.vps_configs)))  # type: ignore[arg-type]
    ).one()
    return plan_out(loaded)


@router.get("", response_model=list[PlanOut])
async def list_plans(session: SessionDep, _user: CurrentUser) -> list[PlanOut]:
    plans = (
        await session.exec(
            select(Plan).options(selectinload(Plan.vps_configs)).order_by(Plan.price_cents_per_month, Plan.name)  # type: ignore[arg-type]
        )
    ).all()
    return [plan_out(p) for p in plans]
