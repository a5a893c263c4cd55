"""Submitting operations to a VPS's entity workflow, and the operation records the API shows.

The API never decides what may run concurrently: it submits each operation to the VPS's entity
workflow (update-with-start), whose validator answers at once. Nothing is written until Temporal
has accepted the operation, so a refused or failed submit leaves no record of a run that never
started; the operation's row is written right after (and by the operation's first activity too,
so a request that dies between the two still leaves its run recorded).

With an `Idempotency-Key` the operation id is derived from the user and the key: a retry submits
the same id, which the entity (or, once finished, the operation's row) answers with the original.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy.dialects.postgresql import distinct_on, insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from api.problems import Problem
from db.models import AdminAuditLog, Agent, User, Vps, VpsOperation
from orchestration.search_attributes import run_attributes
from settings import Settings
from telemetry.metrics import OPERATIONS_SUBMITTED
from workflows.contracts import EntityInput, OperationKind, OperationRequest, Submitted, VpsRef
from workflows.entity import ENTITY_RUN_TIMEOUT, VpsEntity, entity_id

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)]
SUBMIT_TIMEOUT = timedelta(seconds=15)
RETRY_AFTER_S = 5
CONFLICT_SETTLE_TRIES = 15

WORKFLOW_NAME = {
    OperationKind.provision: "ProvisionVps", OperationKind.start: "StartVps", OperationKind.stop: "StopVps",
    OperationKind.destroy: "DestroyVps", OperationKind.settings: "PushConfig", OperationKind.restart: "RestartAgent",
    OperationKind.channel_connect: "ConnectChannel", OperationKind.channel_disconnect: "DisconnectChannel",
}


def operation_id_for(kind: str, vps_id: Any, user: User, key: str | None) -> str:
    suffix = hashlib.sha256(f"{user.id}:{key}".encode()).hexdigest()[:16] if key else uuid.uuid4().hex[:16]
    return f"{kind}-{vps_id}-{suffix}"


def accepted(agent_id: Any, vps_id: Any, operation_id: str, kind: OperationKind | str,
             status: str = "queued") -> JSONResponse:
    url = f"/agents/{agent_id}/operations/{operation_id}"
    return JSONResponse(status_code=202, headers={"Location": url},
                        content={"operation_id": operation_id, "operation": WORKFLOW_NAME[OperationKind(kind)],
                                 "vps_id": str(vps_id), "status": status, "status_url": url})


def unavailable(detail: str) -> Problem:
    return Problem(503, "Orchestrator unavailable", detail, type_="unavailable",
                   headers={"Retry-After": str(RETRY_AFTER_S)})


async def temporal(request: Request) -> Client:
    try:
        return await request.app.state.temporal()  # type: ignore[no-any-return]
    except Exception as err:  # noqa: BLE001  (connection errors come in many types)
        raise unavailable(f"Temporal is unreachable ({type(err).__name__}); nothing was changed, "
                          "try again shortly.") from None


async def replayed(session: AsyncSession, user: User, key: str | None, operation_id: str) -> VpsOperation | None:
    """The operation an earlier request with this Idempotency-Key made, if it is this same request."""
    if not key:
        return None
    row = (await session.exec(select(VpsOperation).where(VpsOperation.user_id == user.id,
                                                         VpsOperation.idempotency_key == key))).first()
    if row is not None and row.id != operation_id:
        raise Problem(409, "Idempotency-Key reused", "This Idempotency-Key was already used for a different "
                      f"request ({WORKFLOW_NAME[OperationKind(row.kind)]} {row.id}); send a new key for a new "
                      "request.", type_="conflict", operation_id=row.id)
    return row


def _blocking(err: WorkflowUpdateFailedError) -> str | None:
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type == "Conflict" and cause.details:
        return str(cause.details[0])
    return None


async def _finished(session: AsyncSession, operation_id: str | None) -> bool:
    if operation_id is None:
        return False
    status = (await session.exec(select(VpsOperation.status).where(VpsOperation.id == operation_id))).first()
    await session.commit()
    return status in ("succeeded", "failed", "cancelled")


def _conflict(err: WorkflowUpdateFailedError) -> Problem:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        details = list(cause.details)
        if cause.type == "Conflict":
            running = {"running_operation_id": details[0], "running_operation": WORKFLOW_NAME[OperationKind(
                details[1])]} if len(details) >= 2 else {}
            return Problem(409, "Operation in progress", f"{cause.message}; wait for it to finish.",
                           type_="operation-in-progress", **running)
        if cause.type == "QueueFull":
            return Problem(429, "Too many operations", f"{cause.message}; wait for some to finish.",
                           type_="rate-limited", headers={"Retry-After": "10"})
        if cause.type == "Closed":
            return Problem(409, "VPS destroyed", "The VPS is destroyed.", type_="invalid-state", vps_state="destroyed")
        if cause.type == "NotFound":  # a cancel that came after the end
            return Problem(409, "Operation finished", cause.message, type_="invalid-state")
        if cause.type == "NotCancellable":
            return Problem(409, "Not cancellable", cause.message, type_="conflict")
        return Problem(409, "Operation refused", cause.message, type_="conflict")
    return Problem(409, "Operation refused", str(err), type_="conflict")


async def submit(request: Request, session: AsyncSession, user: User, agent: Agent, vps: Vps,
                 kind: OperationKind, operation_id: str, key: str | None = None,
                 channel: str | None = None, audit: AdminAuditLog | None = None) -> Submitted:
    """Hand the operation to the VPS's entity workflow, then record it. 409/429/503 record nothing.

    `user` is the VPS's owner. `audit`: an admin's action, written with the operation's row in one
    transaction (it gets the operation id)."""
    settings: Settings = request.app.state.settings
    ref = VpsRef(vps_id=str(vps.id), agent_id=str(agent.id), user_id=str(user.id))
    req = OperationRequest(vps=ref, operation_id=operation_id, operation=kind, channel=channel,
                           timeouts=request.app.state.lifecycle_timeouts)
    await session.commit()  # hold no transaction (and no lock) across the RPC; reads stay loaded
    client = await temporal(request)

    def start() -> WithStartWorkflowOperation[Any, Any]:
        return WithStartWorkflowOperation(
            VpsEntity.run, EntityInput(vps=ref), id=entity_id(ref.vps_id), task_queue=settings.temporal_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING, run_timeout=ENTITY_RUN_TIMEOUT,
            search_attributes=run_attributes(user_id=ref.user_id, agent_id=ref.agent_id, vps_id=ref.vps_id))

    try:
        for attempt in range(CONFLICT_SETTLE_TRIES):
            try:
                submitted: Submitted = await client.execute_update_with_start_workflow(
                    VpsEntity.submit, req, start_workflow_operation=start(), rpc_timeout=SUBMIT_TIMEOUT)
                break
            except WorkflowUpdateFailedError as err:
                # The blocking operation may have recorded its end a moment before the entity moved on:
                # what the API showed as finished must not be answered with a 409.
                if attempt + 1 < CONFLICT_SETTLE_TRIES and await _finished(session, _blocking(err)):
                    await asyncio.sleep(0.2)
                    continue
                raise _conflict(err) from None
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise unavailable("Temporal did not confirm the operation in time (no worker took it). It may still run: "
                          f"GET /agents/{agent.id} shows it if it does; retry with the same Idempotency-Key "
                          "to be safe.") from None
    except RPCError as err:
        raise unavailable(f"Could not submit the operation: {err.message}; nothing was changed.") from None
    await record(session, submitted.operation_id, ref, submitted.operation, key if submitted.new else None,
                 {"channel": channel} if channel else {}, audit=audit)
    if submitted.new:
        OPERATIONS_SUBMITTED.labels(kind=str(submitted.operation)).inc()
    return submitted


async def record(session: AsyncSession, operation_id: str, ref: VpsRef, kind: OperationKind, key: str | None,
                 detail: dict[str, Any], audit: AdminAuditLog | None = None) -> None:
    """The operation's row, unless its first activity already wrote it (then only the key is added);
    with `audit`, the admin's audit row in the same transaction."""
    values: dict[str, Any] = {"id": operation_id, "vps_id": ref.vps_id, "user_id": ref.user_id, "kind": kind,
                              "status": "queued", "detail": detail, "idempotency_key": key}
    insert_row = insert(VpsOperation).values(**values)
    if key:
        stmt = insert_row.on_conflict_do_update(index_elements=["id"], set_={
            "idempotency_key": insert_row.excluded.idempotency_key, "detail": insert_row.excluded.detail})
    else:
        stmt = insert_row.on_conflict_do_nothing(index_elements=["id"])
    await session.exec(stmt)  # type: ignore[call-overload]
    if audit is not None:
        audit.operation_id = operation_id
        session.add(audit)
    await session.commit()


async def cancel_pairing(request: Request, vps: Vps) -> str | None:
    """Cancel the WhatsApp pairing the entity runs, if any; its operation id, or None."""
    client = await temporal(request)
    try:
        result: str | None = await client.get_workflow_handle(entity_id(str(vps.id))).execute_update(
            VpsEntity.cancel_pairing, rpc_timeout=SUBMIT_TIMEOUT)
    except RPCError as err:
        if err.status.name == "NOT_FOUND":
            return None  # no entity running: nothing is pairing
        raise unavailable(f"Could not cancel the pairing: {err.message}") from None
    except (WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError) as err:
        raise unavailable(f"Could not cancel the pairing: {err}") from None
    return result


CANCELLABLE = ("provision", "start")


async def cancel_operation(request: Request, row: VpsOperation) -> str:
    """Ask the VPS's entity to cancel a provision or start: `cancelled` (it was queued) or `cancelling`
    (it runs, and removes what it made before it records `cancelled`). 409 when it cannot be."""
    if row.status not in ("queued", "running"):
        raise Problem(409, "Operation finished", f"The operation already ended ({row.status}).",
                      type_="invalid-state", operation_status=row.status)
    if row.kind not in CANCELLABLE:
        raise Problem(409, "Not cancellable", f"A {WORKFLOW_NAME[OperationKind(row.kind)]} runs to its end (at most a "
                      "gateway start's budget); only a provision or a start can be cancelled.", type_="conflict")
    client = await temporal(request)
    try:
        outcome: str = await client.get_workflow_handle(entity_id(str(row.vps_id))).execute_update(
            VpsEntity.cancel, row.id, rpc_timeout=SUBMIT_TIMEOUT)
    except RPCError as err:
        if err.status.name == "NOT_FOUND":  # no entity: the operation ended while the row caught up
            raise Problem(409, "Operation finished", "The operation is no longer running.",
                          type_="invalid-state") from None
        raise unavailable(f"Could not cancel the operation: {err.message}") from None
    except WorkflowUpdateFailedError as err:
        raise _conflict(err) from None
    except WorkflowUpdateRPCTimeoutOrCancelledError as err:
        raise unavailable(f"Could not cancel the operation: {err}") from None
    return outcome


async def active_operations(session: AsyncSession, vps_ids: list[Any]) -> dict[Any, VpsOperation]:
    """The oldest queued or running operation of each VPS (what `vps.operation_id` shows)."""
    if not vps_ids:
        return {}
    rows = (await session.exec(select(VpsOperation).where(
        col(VpsOperation.vps_id).in_(vps_ids), col(VpsOperation.status).in_(("queued", "running")))
        .order_by(col(VpsOperation.created_at)))).all()
    out: dict[Any, VpsOperation] = {}
    for row in rows:
        out.setdefault(row.vps_id, row)
    return out


async def last_operations(session: AsyncSession, vps_ids: list[Any]) -> dict[Any, VpsOperation]:
    """The most recently finished operation of each VPS, so a failure stays visible after the run."""
    if not vps_ids:
        return {}
    rows = (await session.exec(select(VpsOperation).ext(distinct_on(col(VpsOperation.vps_id))).where(
        col(VpsOperation.vps_id).in_(vps_ids), col(VpsOperation.finished_at).is_not(None))
        .order_by(col(VpsOperation.vps_id), col(VpsOperation.finished_at).desc()))).all()
    return {row.vps_id: row for row in rows}


def operation_out(row: VpsOperation) -> dict[str, Any]:
    return {"id": row.id, "operation": WORKFLOW_NAME[OperationKind(row.kind)], "kind": row.kind,
            "status": row.status, "step": row.step, "error": row.error, "detail": row.detail,
            "retrying": retrying(row),
            "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at}


def retrying(row: VpsOperation) -> dict[str, Any] | None:
    """The failed attempt of the step the operation is on, while Temporal retries it; a note left by
    an earlier step (or on a finished operation) is not shown."""
    note = row.retrying
    if row.status != "running" or not note or note.get("step") != row.step:
        return None
    return note
