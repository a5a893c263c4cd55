"""The admin API: users, the whole fleet, plans and VPS configs, usage, and the audit log.

Same BFF authentication as every route, and the user named by X-User-Id must have the admin flag
(`api.deps.current_admin`: 403 otherwise). Admins are made with `slopbox user create --admin` (or
`slopbox user admin --email ...` for an existing user); no route grants the flag.

Every action that changes something writes one `admin_audit_log` row in the action's own
transaction: a plan edit and its audit row commit together or not at all. A force stop or
destroy goes through the same entity submit as the owner's own request (api/operations.py) and
is refused the same way (409 while another operation runs); its audit row is written with the
operation's row, carrying the operation id. Reads are not audited.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import delete, func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import CurrentAdmin, SessionDep, one_snapshot
from api.operations import WORKFLOW_NAME, active_operations, operation_id_for, operation_out, submit
from api.problems import Problem
from api.schemas import (
    AdminOperationAccepted,
    AdminPlanOut,
    AdminUserOut,
    AdminVpsConfigOut,
    AdminVpsOut,
    AggregateUsageOut,
    AuditEntryOut,
    OperationOut,
    Page,
    PlanIn,
    PlanPatch,
    PlanRef,
    ProviderName,
    ProviderUsage,
    UsageExemptIn,
    UsageTotals,
    UserPlanIn,
    VpsConfigIn,
    VpsConfigPatch,
    VpsDestroyed,
    VpsStateName,
    problem_responses,
)
from billing.plans import month_start
from db.models import (
    AdminAuditLog,
    Agent,
    Plan,
    PlanVpsConfig,
    User,
    Vps,
    VpsConfig,
    VpsOperation,
    VpsState,
    VpsUsagePeriod,
)
from notifications.store import notify_user
from workflows.contracts import OperationKind

router = APIRouter(prefix="/admin", tags=["admin"])

Limit = Annotated[int, Query(ge=1, le=200, description="Page size")]
Offset = Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip")]
USAGE_FIELDS = ("bandwidth_in_bytes", "bandwidth_out_bytes", "cpu_ms", "memory_mb_seconds", "storage_bytes")
PLAN_COUNTERS = ("price_cents_per_month", "max_agents", "max_vpses", "max_bandwidth_bytes", "max_storage_bytes",
                 "max_cpu_ms", "max_memory_mb_seconds", "overage_bandwidth_cost_per_gb_cents",
                 "overage_storage_cost_per_gb_cents", "overage_cpu_cost_per_hour_cents",
                 "overage_memory_cost_per_gb_hour_cents")
CONFIG_SIZES = ("cpu_millicores", "memory_mb", "disk_gb")


def audit(admin: User, action: str, target_type: str, target_id: Any, **details: Any) -> AdminAuditLog:
    """An audit row for the caller to add to the action's own transaction."""
    return AdminAuditLog(admin_user_id=admin.id, admin_email=admin.email, action=action, target_type=target_type,
                         target_id=str(target_id), details=details)


def not_found(kind: str, ident: Any) -> Problem:
    return Problem(404, "Not found", f"No {kind} {ident}.", type_="not-found")


def usage_sums() -> list[Any]:
    return [func.coalesce(func.sum(getattr(VpsUsagePeriod, f)), 0).label(f) for f in USAGE_FIELDS]


def totals(row: Any) -> UsageTotals:
    return UsageTotals(**{f: int(getattr(row, f) or 0) for f in USAGE_FIELDS})


# --- users ------------------------------------------------------------------------------------------------


async def users_out(session: AsyncSession, users: list[User]) -> list[AdminUserOut]:
    """Each user with plan, agent and VPS counts and this month's usage: three grouped queries per page."""
    ids = [u.id for u in users]
    period = month_start()
    plans = {p.id: p for p in (await session.exec(select(Plan))).all()}
    default = next((p for p in plans.values() if p.is_default), None)
    agents = dict((await session.exec(select(Agent.user_id, func.count()).where(col(Agent.user_id).in_(ids))
                                      .group_by(Agent.user_id))).all())
    vpses = dict((await session.exec(select(Vps.user_id, func.count()).where(
        col(Vps.user_id).in_(ids), Vps.state != VpsState.destroyed).group_by(Vps.user_id))).all())
    usage = {row.user_id: totals(row) for row in (await session.exec(
        select(Vps.user_id, *usage_sums()).join(VpsUsagePeriod, col(VpsUsagePeriod.vps_id) == col(Vps.id))
        .where(col(Vps.user_id).in_(ids), VpsUsagePeriod.period_start == period).group_by(Vps.user_id))).all()}
    out = []
    for user in users:
        plan = plans.get(user.plan_id) if user.plan_id else None
        effective = plan or default
        if effective is None:
            raise LookupError("no default plan: run `slopbox migrate` to seed plans")
        out.append(AdminUserOut(
            id=user.id, email=user.email, name=user.name, is_admin=user.is_admin,  # type: ignore[arg-type]
            usage_exempt=user.usage_exempt,
            plan=PlanRef(id=effective.id, name=effective.name, display_name=effective.display_name,  # type: ignore[arg-type]
                         active=effective.deactivated_at is None),
            plan_assigned=plan is not None, agent_count=agents.get(user.id, 0), vps_count=vpses.get(user.id, 0),
            period_start=period, usage=usage.get(user.id) or UsageTotals(**dict.fromkeys(USAGE_FIELDS, 0)),
            created_at=user.created_at))
    return out


@router.get("/users", response_model=Page[AdminUserOut])
async def list_users(session: SessionDep, _admin: CurrentAdmin, limit: Limit = 50, offset: Offset = 0,
                     email: Annotated[str | None, Query(min_length=1, max_length=255,
                                                        description="Substring of the email, any case")] = None,
                     ) -> Page[AdminUserOut]:
    where = []
    if email:
        escaped = email.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(col(User.email).ilike(f"%{escaped}%", escape="\\"))
    total = (await session.exec(select(func.count()).select_from(User).where(*where))).one()
    users = list((await session.exec(select(User).where(*where).order_by(col(User.created_at), col(User.id))
                                     .limit(limit).offset(offset))).all())
    return Page(items=await users_out(session, users), total=total, limit=limit, offset=offset)


async def get_user(session: AsyncSession, user_id: uuid.UUID, lock: bool = False) -> User:
    stmt = select(User).where(User.id == user_id)
    user = (await session.exec(stmt.with_for_update() if lock else stmt)).first()
    if user is None:
        raise not_found("user", user_id)
    return user


@router.get("/users/{user_id}", response_model=AdminUserOut, responses=problem_responses(404))
async def read_user(user_id: uuid.UUID, session: SessionDep, _admin: CurrentAdmin) -> AdminUserOut:
    return (await users_out(session, [await get_user(session, user_id)]))[0]


@router.put("/users/{user_id}/usage-exempt", response_model=AdminUserOut, responses=problem_responses(404))
async def put_usage_exempt(user_id: uuid.UUID, body: UsageExemptIn, session: SessionDep,
                           admin: CurrentAdmin) -> AdminUserOut:
    """Exempt a user from overage enforcement (true) or end the exemption (false)."""
    user = await get_user(session, user_id, lock=True)
    if user.usage_exempt != body.exempt:
        session.add(audit(admin, "user.usage_exempt", "user", user.id, before=user.usage_exempt, after=body.exempt))
        user.usage_exempt = body.exempt
        session.add(user)
        await session.commit()
    return (await users_out(session, [user]))[0]


@router.put("/users/{user_id}/plan", response_model=AdminUserOut, responses=problem_responses(404, 409))
async def put_user_plan(user_id: uuid.UUID, body: UserPlanIn, session: SessionDep,
                        admin: CurrentAdmin) -> AdminUserOut:
    """Assign a plan. Limits apply to what the user does next; nothing running is stopped here."""
    user = await get_user(session, user_id, lock=True)
    plan = await session.get(Plan, body.plan_id)
    if plan is None:
        raise not_found("plan", body.plan_id)
    if plan.deactivated_at is not None and user.plan_id != plan.id:
        raise Problem(409, "Plan deactivated", f"Plan '{plan.name}' is deactivated; activate it first "
                      f"(PATCH /admin/plans/{plan.id} with active: true).", type_="conflict", plan_id=str(plan.id))
    if user.plan_id != plan.id:
        session.add(audit(admin, "user.plan", "user", user.id,
                          before=str(user.plan_id) if user.plan_id else None, after=str(plan.id)))
        user.plan_id = plan.id
        session.add(user)
        await session.commit()
    return (await users_out(session, [user]))[0]


# --- the fleet --------------------------------------------------------------------------------------------


@router.get("/vpses", response_model=Page[AdminVpsOut])
async def list_vpses(session: SessionDep, _admin: CurrentAdmin, limit: Limit = 50, offset: Offset = 0,
                     state: VpsStateName | None = None, provider: ProviderName | None = None,
                     user_id: uuid.UUID | None = None) -> Page[AdminVpsOut]:
    """Every user's VPSes, newest first, optionally filtered."""
    await one_snapshot(session)  # each VPS's state and its operation in flight as of one moment
    where = []
    if state is not None:
        where.append(Vps.state == state)
    if provider is not None:
        where.append(Vps.provider == provider)
    if user_id is not None:
        where.append(Vps.user_id == user_id)
    total = (await session.exec(select(func.count()).select_from(Vps).where(*where))).one()
    rows = (await session.exec(
        select(Vps, User.email, VpsConfig.name, Agent.id)
        .join(User, col(User.id) == col(Vps.user_id)).join(VpsConfig, col(VpsConfig.id) == col(Vps.vps_config_id))
        .outerjoin(Agent, col(Agent.vps_id) == col(Vps.id)).where(*where)
        .order_by(col(Vps.created_at).desc(), col(Vps.id)).limit(limit).offset(offset))).all()
    active = await active_operations(session, [vps.id for vps, *_ in rows])
    items = []
    for vps, email, config_name, agent_id in rows:
        busy = active.get(vps.id)
        items.append(AdminVpsOut(
            id=vps.id, user_id=vps.user_id, user_email=email, agent_id=agent_id,  # type: ignore[arg-type]
            provider=vps.provider, state=vps.state, vps_config_id=vps.vps_config_id, vps_config_name=config_name,
            region=vps.region, observed_state=vps.observed_state, needs_cleanup=vps.needs_cleanup,
            last_error=vps.last_error, operation_id=busy.id if busy else None, created_at=vps.created_at,
            state_changed_at=vps.state_changed_at, destroyed_at=vps.destroyed_at))
    return Page(items=items, total=total, limit=limit, offset=offset)


async def _force(request: Request, session: AsyncSession, admin: User, vps_id: uuid.UUID, kind: OperationKind,
                 allowed: tuple[str, ...]) -> JSONResponse:
    """Submit `kind` on the owner's behalf, through the owner's own path; the audit row goes with it."""
    vps = await session.get(Vps, vps_id)
    if vps is None:
        raise not_found("VPS", vps_id)
    owner = await get_user(session, vps.user_id)
    agent = (await session.exec(select(Agent).where(Agent.vps_id == vps.id))).first()
    if vps.state not in allowed:
        busy = (await active_operations(session, [vps.id])).get(vps.id)
        if busy is not None:
            name = WORKFLOW_NAME[OperationKind(busy.kind)]
            raise Problem(409, "Operation in progress", f"{name} ({busy.id}) is {busy.status} on this VPS; wait for "
                          "it to finish.", type_="operation-in-progress", running_operation_id=busy.id,
                          running_operation=name, vps_state=vps.state)
        raise Problem(409, f"Cannot {kind}", f"The VPS is {vps.state}; {kind} needs it to be {' or '.join(allowed)}.",
                      type_="invalid-state", vps_state=vps.state)
    if agent is None:
        raise Problem(409, "VPS without an agent", "No agent owns this VPS, so no operation can run on it; "
                      "Reconcile cleans such VMs up.", type_="conflict", vps_state=vps.state)
    entry = audit(admin, f"vps.{kind}", "vps", vps.id, user_id=str(owner.id), agent_id=str(agent.id),
                  state=vps.state)
    operation_id = operation_id_for(kind.value, vps.id, admin, None)
    done = await submit(request, session, owner, agent, vps, kind, operation_id, audit=entry)
    if done.new:  # the owner is told, in the app and by email: an agent that stops by itself is a support ticket
        stopped = kind == OperationKind.stop
        await notify_user(
            session, owner.id, kind="info", severity="warning",  # type: ignore[arg-type]
            title=f"An administrator {'stopped' if stopped else 'destroyed'} your agent {agent.name}",
            body=("You can start it again from its page." if stopped else
                  "Its VM and the data on it are deleted; the agent itself is kept, and you can create a new VPS "
                  "for it from its page."),
            dedupe_key=f"admin-{kind.value}:{done.operation_id}",
            data={"agent_id": str(agent.id), "vps_id": str(vps.id), "operation_id": done.operation_id})
        await session.commit()
    url = f"/admin/operations/{done.operation_id}"
    name = WORKFLOW_NAME[OperationKind(done.operation)]
    body = AdminOperationAccepted(operation_id=done.operation_id, operation=name,
                                  vps_id=vps.id, status="queued", status_url=url,  # type: ignore[arg-type]
                                  audit_id=entry.id or 0)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": url})


@router.post("/vpses/{vps_id}/stop", status_code=202, response_model=AdminOperationAccepted,
             responses=problem_responses(404, 409, 429))
async def force_stop(vps_id: uuid.UUID, request: Request, session: SessionDep, admin: CurrentAdmin) -> JSONResponse:
    """Stop any user's VPS (running or error), e.g. on overage; the user can start it again."""
    return await _force(request, session, admin, vps_id, OperationKind.stop, (VpsState.running, VpsState.error))


@router.delete("/vpses/{vps_id}", status_code=202, response_model=AdminOperationAccepted,
               responses={200: {"model": VpsDestroyed, "description": "Already destroyed"},
                          **problem_responses(404, 409, 429)})
async def force_destroy(vps_id: uuid.UUID, request: Request, session: SessionDep,
                        admin: CurrentAdmin) -> JSONResponse:
    """Destroy any user's VPS and its VM (queued behind whatever runs on it)."""
    vps = await session.get(Vps, vps_id)
    if vps is not None and vps.state == VpsState.destroyed:
        return JSONResponse({"vps_id": str(vps.id), "state": "destroyed", "operation_id": None}, status_code=200)
    return await _force(request, session, admin, vps_id, OperationKind.destroy,
                        (VpsState.provisioning, VpsState.running, VpsState.stopped, VpsState.error))


@router.get("/operations/{operation_id}", response_model=OperationOut, responses=problem_responses(404))
async def read_operation(operation_id: Annotated[str, Path(max_length=255)], session: SessionDep,
                         _admin: CurrentAdmin) -> OperationOut:
    """Any user's operation (the owner's own URL is scoped to the owner)."""
    row = await session.get(VpsOperation, operation_id)
    if row is None:
        raise not_found("operation", operation_id)
    return OperationOut.model_validate(operation_out(row))


# --- what plans and VPS configs share ---------------------------------------------------------------------

Catalogue = Plan | VpsConfig


async def locked(session: AsyncSession, model: type[Catalogue], ident: uuid.UUID, kind: str) -> Any:
    """The plan or config, locked for the change at hand; 404 when there is none."""
    row = (await session.exec(select(model).where(model.id == ident).with_for_update())).first()  # type: ignore[arg-type]
    if row is None:
        raise not_found(kind, ident)
    return row


async def found(session: AsyncSession, model: type[Catalogue], ident: uuid.UUID, kind: str) -> Any:
    row = await session.get(model, ident)
    if row is None:
        raise not_found(kind, ident)
    return row


def name_taken(kind: str, name: str) -> Problem:
    return Problem(409, "Name taken", f"A {kind} named '{name}' already exists.", type_="conflict", name=name)


async def add_named(session: AsyncSession, row: Catalogue, kind: str) -> None:
    """Insert a plan or config under a name no other has: 409 when taken (looked up first for the usual
    case; the unique index decides a race)."""
    model = type(row)
    if (await session.exec(select(model.id).where(model.name == row.name))).first() is not None:
        raise name_taken(kind, row.name)
    session.add(row)
    try:
        await session.flush()
    except IntegrityError:
        raise name_taken(kind, row.name) from None


def audit_changes(session: AsyncSession, admin: User, row: Catalogue, target_type: str,
                  changes: dict[str, Any]) -> None:
    """An edit that changed something: the row and its `<target_type>.update` audit entry."""
    if changes:
        session.add(row)
        session.add(audit(admin, f"{target_type}.update", target_type, row.id, name=row.name, changes=changes))


async def delete_audited(session: AsyncSession, admin: User, row: Catalogue, target_type: str,
                         in_use: str, detail: str) -> Response:
    """Delete with its audit entry; a reference that appeared since the caller's check (the foreign
    key refuses) is the same 409 `in_use` the check gives."""
    session.add(audit(admin, f"{target_type}.delete", target_type, row.id, name=row.name))
    await session.delete(row)
    try:
        await session.commit()
    except IntegrityError:
        raise Problem(409, in_use, detail, type_="in-use") from None
    return Response(status_code=204)


# --- plans ------------------------------------------------------------------------------------------------


async def plan_users(session: AsyncSession, plan_ids: list[Any]) -> dict[Any, int]:
    return dict((await session.exec(select(User.plan_id, func.count()).where(col(User.plan_id).in_(plan_ids))
                                    .group_by(User.plan_id))).all())  # type: ignore[arg-type]


async def plans_out(session: AsyncSession, plans: list[Plan]) -> list[AdminPlanOut]:
    ids = [p.id for p in plans]
    links: dict[Any, list[uuid.UUID]] = {}
    for plan_id, config_id in (await session.exec(select(PlanVpsConfig.plan_id, PlanVpsConfig.vps_config_id)
                                                  .where(col(PlanVpsConfig.plan_id).in_(ids)))).all():
        links.setdefault(plan_id, []).append(config_id)
    users = await plan_users(session, ids)
    return [AdminPlanOut(**{f: getattr(p, f) for f in ("id", "name", "display_name", "is_default", "deactivated_at",
                                                      "created_at", *PLAN_COUNTERS)},
                         active=p.deactivated_at is None, vps_config_ids=sorted(links.get(p.id, []), key=str),
                         user_count=users.get(p.id, 0)) for p in plans]


async def lock_default(session: AsyncSession) -> None:
    """Serialize changes of which plan is the default (there is always exactly one)."""
    await session.exec(select(Plan.id).where(Plan.is_default == True).with_for_update())  # noqa: E712


async def check_configs(session: AsyncSession, ids: list[uuid.UUID]) -> list[uuid.UUID]:
    unique = list(dict.fromkeys(ids))
    found = set((await session.exec(select(VpsConfig.id).where(col(VpsConfig.id).in_(unique)))).all())
    missing = [str(i) for i in unique if i not in found]
    if missing:
        raise Problem(409, "Unknown VPS config", f"vps_config_ids: no VPS config {', '.join(missing[:5])}; "
                      "GET /admin/vps-configs lists them.", type_="unknown-vps-config", missing=missing[:20])
    return unique


async def set_links(session: AsyncSession, plan_id: uuid.UUID, config_ids: list[uuid.UUID]) -> None:
    await session.exec(delete(PlanVpsConfig).where(col(PlanVpsConfig.plan_id) == plan_id))  # type: ignore[call-overload]
    if config_ids:
        await session.exec(insert(PlanVpsConfig).values(  # type: ignore[call-overload]
            [{"plan_id": plan_id, "vps_config_id": c} for c in config_ids]))


@router.get("/plans", response_model=list[AdminPlanOut])
async def list_plans(session: SessionDep, _admin: CurrentAdmin) -> list[AdminPlanOut]:
    """Every plan, deactivated ones included, with every config it allows."""
    plans = list((await session.exec(select(Plan).order_by(Plan.price_cents_per_month, Plan.name))).all())
    return await plans_out(session, plans)


@router.post("/plans", status_code=201, response_model=AdminPlanOut, responses=problem_responses(409))
async def create_plan(body: PlanIn, session: SessionDep, admin: CurrentAdmin) -> AdminPlanOut:
    if body.is_default:
        await lock_default(session)
    plan = Plan(**body.model_dump(exclude={"vps_config_ids"}))
    await add_named(session, plan, "plan")
    configs = await check_configs(session, body.vps_config_ids)
    if body.is_default:
        await session.exec(update(Plan).where(col(Plan.is_default), col(Plan.id) != plan.id)  # type: ignore[call-overload]
                           .values(is_default=False))
    await set_links(session, plan.id, configs)  # type: ignore[arg-type]
    session.add(audit(admin, "plan.create", "plan", plan.id, **body.model_dump(mode="json")))
    await session.commit()
    return (await plans_out(session, [plan]))[0]


@router.get("/plans/{plan_id}", response_model=AdminPlanOut, responses=problem_responses(404))
async def read_plan(plan_id: uuid.UUID, session: SessionDep, _admin: CurrentAdmin) -> AdminPlanOut:
    return (await plans_out(session, [await found(session, Plan, plan_id, "plan")]))[0]


@router.patch("/plans/{plan_id}", response_model=AdminPlanOut, responses=problem_responses(404, 409))
async def update_plan(plan_id: uuid.UUID, body: PlanPatch, session: SessionDep, admin: CurrentAdmin) -> AdminPlanOut:
    """Change limits and rates (they apply from now on), the allowed configs, default, active."""
    await lock_default(session)
    plan: Plan = await locked(session, Plan, plan_id, "plan")
    changes = {k: v for k, v in body.model_dump(mode="json").items() if v is not None}
    active = plan.deactivated_at is None if body.active is None else body.active
    default = plan.is_default if body.is_default is None else body.is_default
    if plan.is_default and not default:
        raise Problem(409, "Default plan", f"'{plan.name}' is the default plan (users without a plan are on it); make "
                      "another plan the default instead (PATCH it with is_default: true).", type_="conflict")
    if default and not active:
        detail = ("The default plan cannot be deactivated; make another plan the default first." if plan.is_default
                  else f"'{plan.name}' is deactivated; a deactivated plan cannot be the default (send active: true "
                  "with it).")
        raise Problem(409, "Default plan", detail, type_="conflict")
    if body.vps_config_ids is not None:
        await set_links(session, plan.id, await check_configs(session, body.vps_config_ids))  # type: ignore[arg-type]
    if default and not plan.is_default:
        await session.exec(update(Plan).where(col(Plan.is_default), col(Plan.id) != plan.id)  # type: ignore[call-overload]
                           .values(is_default=False))
        plan.is_default = True
    if active != (plan.deactivated_at is None):
        plan.deactivated_at = None if active else datetime.now(UTC)
    for field in PLAN_COUNTERS + ("display_name",):
        value = getattr(body, field)
        if value is not None:
            setattr(plan, field, value)
    audit_changes(session, admin, plan, "plan", changes)
    await session.commit()
    return (await plans_out(session, [plan]))[0]


@router.delete("/plans/{plan_id}", status_code=204, responses=problem_responses(404, 409))
async def delete_plan(plan_id: uuid.UUID, session: SessionDep, admin: CurrentAdmin) -> Response:
    """Only a plan no user is on and that is not the default; a plan in use is deactivated instead."""
    await lock_default(session)
    plan: Plan = await locked(session, Plan, plan_id, "plan")
    await session.exec(select(User.id).where(User.plan_id == plan.id).with_for_update())  # no user joins meanwhile
    users = (await plan_users(session, [plan.id])).get(plan.id, 0)
    if plan.is_default or users:
        why = "it is the default plan (users without a plan are on it)" if plan.is_default else \
            f"{users} user(s) are on it"
        raise Problem(409, "Plan in use", f"Plan '{plan.name}' cannot be deleted: {why}. Deactivate it instead "
                      f"(PATCH /admin/plans/{plan.id} with active: false): it is no longer offered and its users "
                      "keep it.", type_="in-use", users=users, is_default=plan.is_default)
    return await delete_audited(session, admin, plan, "plan", "Plan in use",
                                f"Plan '{plan.name}' is still referenced; deactivate it instead.")


# --- VPS configs ------------------------------------------------------------------------------------------


async def configs_out(session: AsyncSession, configs: list[VpsConfig]) -> list[AdminVpsConfigOut]:
    ids = [c.id for c in configs]
    counts = dict((await session.exec(select(Vps.vps_config_id, func.count()).where(
        col(Vps.vps_config_id).in_(ids), Vps.state != VpsState.destroyed).group_by(Vps.vps_config_id))).all())
    links: dict[Any, list[uuid.UUID]] = {}
    for plan_id, config_id in (await session.exec(select(PlanVpsConfig.plan_id, PlanVpsConfig.vps_config_id)
                                                  .where(col(PlanVpsConfig.vps_config_id).in_(ids)))).all():
        links.setdefault(config_id, []).append(plan_id)
    return [AdminVpsConfigOut(**{f: getattr(c, f) for f in ("id", "name", "provider", "image", "server_type",
                                                           "locations", "deactivated_at", "created_at",
                                                           *CONFIG_SIZES)},
                              active=c.deactivated_at is None, vps_count=counts.get(c.id, 0),
                              plan_ids=sorted(links.get(c.id, []), key=str)) for c in configs]


@router.get("/vps-configs", response_model=list[AdminVpsConfigOut])
async def list_configs(session: SessionDep, _admin: CurrentAdmin) -> list[AdminVpsConfigOut]:
    configs = list((await session.exec(select(VpsConfig).order_by(VpsConfig.provider, VpsConfig.name))).all())
    return await configs_out(session, configs)


@router.post("/vps-configs", status_code=201, response_model=AdminVpsConfigOut, responses=problem_responses(409))
async def create_config(body: VpsConfigIn, session: SessionDep, admin: CurrentAdmin) -> AdminVpsConfigOut:
    """A new VM tier; allow it on plans with PATCH /admin/plans/{id} (vps_config_ids)."""
    config = VpsConfig(**body.model_dump())
    await add_named(session, config, "VPS config")
    session.add(audit(admin, "vps_config.create", "vps_config", config.id, **body.model_dump(mode="json")))
    await session.commit()
    return (await configs_out(session, [config]))[0]


@router.get("/vps-configs/{config_id}", response_model=AdminVpsConfigOut, responses=problem_responses(404))
async def read_config(config_id: uuid.UUID, session: SessionDep, _admin: CurrentAdmin) -> AdminVpsConfigOut:
    return (await configs_out(session, [await found(session, VpsConfig, config_id, "VPS config")]))[0]


async def vps_count(session: AsyncSession, config_id: Any, live_only: bool) -> int:
    stmt = select(func.count()).select_from(Vps).where(Vps.vps_config_id == config_id)
    if live_only:
        stmt = stmt.where(Vps.state != VpsState.destroyed)
    return int((await session.exec(stmt)).one())


@router.patch("/vps-configs/{config_id}", response_model=AdminVpsConfigOut, responses=problem_responses(404, 409))
async def update_config(config_id: uuid.UUID, body: VpsConfigPatch, session: SessionDep,
                        admin: CurrentAdmin) -> AdminVpsConfigOut:
    """Image, server type, locations and active always; sizes only while no live VPS uses it (storage is
    metered from the config's allocation, so a live VPS's config must keep saying what it has)."""
    config: VpsConfig = await locked(session, VpsConfig, config_id, "VPS config")
    changes = {k: v for k, v in body.model_dump(mode="json").items() if v is not None}
    resized = [f for f in CONFIG_SIZES if f in changes and changes[f] != getattr(config, f)]
    if resized:
        live = await vps_count(session, config.id, live_only=True)
        if live:
            raise Problem(409, "Config in use", f"{live} VPS(es) use '{config.name}'; its sizes ({', '.join(resized)}) "
                          "cannot change under them. Create a new config and deactivate this one.",
                          type_="in-use", vpses=live)
    for field in (*CONFIG_SIZES, "image", "server_type", "locations"):
        value = getattr(body, field)
        if value is not None:
            setattr(config, field, value)
    if body.active is not None and body.active != (config.deactivated_at is None):
        config.deactivated_at = None if body.active else datetime.now(UTC)
    audit_changes(session, admin, config, "vps_config", changes)
    await session.commit()
    return (await configs_out(session, [config]))[0]


@router.delete("/vps-configs/{config_id}", status_code=204, responses=problem_responses(404, 409))
async def delete_config(config_id: uuid.UUID, session: SessionDep, admin: CurrentAdmin) -> Response:
    """Only a config no VPS row refers to (destroyed ones included: they keep their history)."""
    config: VpsConfig = await locked(session, VpsConfig, config_id, "VPS config")
    used = await vps_count(session, config.id, live_only=False)
    if used:
        raise Problem(409, "Config in use", f"'{config.name}' is used by {used} VPS row(s) (destroyed ones keep their "
                      f"history); deactivate it instead (PATCH /admin/vps-configs/{config.id} with active: false).",
                      type_="in-use", vpses=used)
    return await delete_audited(session, admin, config, "vps_config", "Config in use",
                                f"'{config.name}' is now in use; deactivate it instead.")


# --- usage and the audit log ---------------------------------------------------------------------------


@router.get("/usage", response_model=AggregateUsageOut)
async def aggregate_usage(session: SessionDep, _admin: CurrentAdmin,
                          month: Annotated[str | None, Query(pattern=r"^[1-9]\d{3}-(0[1-9]|1[0-2])$",
                                                             description="YYYY-MM (UTC); default: this month")] = None,
                          ) -> AggregateUsageOut:
    """Usage of every VPS for one calendar month, in total and by provider."""
    period = date(int(month[:4]), int(month[5:7]), 1) if month else month_start()
    base = (select(Vps.provider, func.count(func.distinct(Vps.id)).label("vpses"),
                   func.count(func.distinct(Vps.user_id)).label("users"), *usage_sums())
            .join(VpsUsagePeriod, col(VpsUsagePeriod.vps_id) == col(Vps.id))
            .where(VpsUsagePeriod.period_start == period))
    by_provider = (await session.exec(base.group_by(Vps.provider).order_by(Vps.provider))).all()
    overall = (await session.exec(base.with_only_columns(
        func.count(func.distinct(Vps.id)).label("vpses"),
        func.count(func.distinct(Vps.user_id)).label("users"), *usage_sums()))).one()
    return AggregateUsageOut(period_start=period, users=int(overall.users), vpses=int(overall.vpses),
                             usage=totals(overall),
                             by_provider=[ProviderUsage(provider=r.provider, vpses=int(r.vpses), usage=totals(r))
                                          for r in by_provider])


@router.get("/audit-log", response_model=Page[AuditEntryOut])
async def audit_log(session: SessionDep, _admin: CurrentAdmin, limit: Limit = 50, offset: Offset = 0,
                    action: Annotated[str | None, Query(max_length=64)] = None,
                    target_type: Annotated[str | None, Query(max_length=32)] = None,
                    target_id: Annotated[str | None, Query(max_length=255)] = None,
                    admin_user_id: uuid.UUID | None = None) -> Page[AuditEntryOut]:
    """Newest first."""
    where = []
    for column, value in ((AdminAuditLog.action, action), (AdminAuditLog.target_type, target_type),
                          (AdminAuditLog.target_id, target_id), (AdminAuditLog.admin_user_id, admin_user_id)):
        if value is not None:
            where.append(column == value)
    total = (await session.exec(select(func.count()).select_from(AdminAuditLog).where(*where))).one()
    rows = (await session.exec(select(AdminAuditLog).where(*where).order_by(
        col(AdminAuditLog.created_at).desc(), col(AdminAuditLog.id).desc()).limit(limit).offset(offset))).all()
    return Page(items=[AuditEntryOut.model_validate(r.model_dump()) for r in rows], total=total, limit=limit,
                offset=offset)
