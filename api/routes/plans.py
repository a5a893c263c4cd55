"""Plans and the VPS configs each allows: the frontend's key is enough (no `X-User-Id`), so a
landing page can show pricing to visitors who have no account yet.

Each plan lists only the configs this control plane can provision: those whose provider is
configured (`Settings.configured_providers`: a cloud with its token set; `local` in embedded mode or
with SLOPBOX_LOCAL_PROVIDER=1).
A config of another provider stays allowed by the plan in the database and shows up once its
provider is configured; provisioning it before then is refused with 409 provider-unavailable.
Plans and configs an admin deactivated are not offered (a user keeps a deactivated plan, and
`/users/me` still shows it).
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import APIRouter, Request
from sqlalchemy.orm import selectinload
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import Frontend, SessionDep
from api.schemas import PlanOut, VpsConfigOut
from db.models import Plan
from settings import Settings

router = APIRouter(prefix="/plans", tags=["plans"])


def plan_out(plan: Plan, providers: Collection[str]) -> PlanOut:
    """The plan with the configs of the configured `providers`."""
    configs = sorted((c for c in plan.vps_configs if c.provider in providers and c.deactivated_at is None),
                     key=lambda c: (c.provider, c.name))
    return PlanOut.model_validate(
        {**plan.model_dump(), "vps_configs": [VpsConfigOut.model_validate(c.model_dump()) for c in configs]}
    )


async def load_plan(session: AsyncSession, plan: Plan, settings: Settings) -> PlanOut:
    loaded = (
        await session.exec(select(Plan).where(Plan.id == plan.id).options(selectinload(Plan.vps_configs)))  # type: ignore[arg-type]
    ).one()
    return plan_out(loaded, settings.configured_providers())


@router.get("", response_model=list[PlanOut])
async def list_plans(request: Request, session: SessionDep, _key: Frontend) -> list[PlanOut]:
    settings: Settings = request.app.state.settings
    plans = (
        await session.exec(
            select(Plan).options(selectinload(Plan.vps_configs))  # type: ignore[arg-type]
            .where(col(Plan.deactivated_at).is_(None)).order_by(Plan.price_cents_per_month, Plan.name)
        )
    ).all()
    providers = settings.configured_providers()
    return [plan_out(p, providers) for p in plans]
