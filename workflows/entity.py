"""One entity workflow per VPS (id `vps-<vps id>`): Temporal, not a database slot, decides what runs.

The API submits every operation as an update (update-with-start, so the entity starts on demand;
a provision starts it with the operation in its input). The validator answers at once: a start or
stop while another lifecycle operation is queued or running is rejected (the API maps it to 409);
everything else queues. The run loop executes the queue in order, each operation as a child
workflow whose id is the operation id, so every operation is its own run in the Temporal UI.

A WhatsApp pairing (minutes of waiting for a scan) runs beside the queue rather than in it: other
channels, settings and restarts go on, and a stop or destroy cancels the pairing before it runs.
A destroy also cancels a provision or a start still running, and the `cancel` update cancels one
on its own: whoever gives up on a VPS being set up or started (its provider failing, its gateway
never ready) should not wait minutes for that to give up. A provision removes what it made; either
ends `cancelled` and leaves the VPS in `error`.
The entity ends when a destroy succeeded, or after `idle_exit_s` with nothing to do; it continues
as new when its history grows, after every handler has finished (the safe-message-handlers pattern).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError, CancelledError, ChildWorkflowError, WorkflowAlreadyStartedError

from orchestration.search_attributes import run_attributes
from workflows.agent_ops import ConnectChannel, DisconnectChannel, PushConfig, RestartAgent
from workflows.contracts import (
    LIFECYCLE_OPERATIONS,
    Act,
    EntityInput,
    EntityStatus,
    FinishInput,
    OperationKind,
    OperationRequest,
    OperationStatus,
    Submitted,
)
from workflows.lifecycle import ANY_LIVE_STATE, DB_RETRY, DestroyVps, ProvisionVps, StartVps, StopVps, reason

CHILD: dict[OperationKind, Any] = {
    OperationKind.provision: ProvisionVps, OperationKind.start: StartVps, OperationKind.stop: StopVps,
    OperationKind.destroy: DestroyVps, OperationKind.settings: PushConfig, OperationKind.restart: RestartAgent,
    OperationKind.channel_connect: ConnectChannel, OperationKind.channel_disconnect: DisconnectChannel,
}
MAX_QUEUED = 20
CANCELLABLE = (OperationKind.provision, OperationKind.start)
"""What a destroy or the `cancel` update stops; the others are bounded by a gateway start's budget."""
RECENT_KEPT = 50
OPERATIONS_PER_RUN = 100


ENTITY_RUN_TIMEOUT = timedelta(days=7)
"""A safety net only: an entity idles out after an hour and continues as new every 100 operations."""


def entity_id(vps_id: str) -> str:
    return f"vps-{vps_id}"


def _is_pairing(req: OperationRequest) -> bool:
    return req.operation == OperationKind.channel_connect and req.channel == "whatsapp"


@workflow.defn(name="Vps")
class VpsEntity:
    @workflow.init
    def __init__(self, inp: EntityInput) -> None:
        self._vps = inp.vps
        self._queue: list[OperationRequest] = list(inp.queue)
        self._recent: list[str] = list(inp.recent)
        self._current: OperationRequest | None = None
        self._pairing: OperationRequest | None = None
        self._pairing_task: asyncio.Task[None] | None = None
        self._current_task: asyncio.Task[OperationStatus] | None = None
        self._closed = False

    # --- messages ------------------------------------------------------------------------------

    @workflow.query
    def status(self) -> EntityStatus:
        return EntityStatus(current=self._current.operation_id if self._current else None,
                            pairing=self._pairing.operation_id if self._pairing else None,
                            queued=[r.operation_id for r in self._queue], closed=self._closed)

    def _pending(self) -> list[OperationRequest]:
        return [r for r in (self._current, self._pairing, *self._queue) if r is not None]

    def _known(self, operation_id: str) -> OperationRequest | None:
        return next((r for r in self._pending() if r.operation_id == operation_id), None)

    @workflow.update
    async def submit(self, req: OperationRequest) -> Submitted:
        known = self._known(req.operation_id)
        if known is not None or req.operation_id in self._recent:
            return Submitted(operation_id=req.operation_id, operation=req.operation, new=False,
                             position=self._position(req.operation_id))
        if req.operation == OperationKind.destroy:
            queued = next((r for r in self._pending() if r.operation == OperationKind.destroy), None)
            if queued is not None:  # one destroy is enough: answer with the one on its way
                return Submitted(operation_id=queued.operation_id, operation=queued.operation, new=False,
                                 position=self._position(queued.operation_id))
        self._queue.append(req)
        if req.operation == OperationKind.destroy:
            self._cancel_setup()
        return Submitted(operation_id=req.operation_id, operation=req.operation, new=True,
                         position=self._position(req.operation_id))

    def _cancel_setup(self) -> None:
        """A destroy or a `cancel` arrived while the VPS is still being provisioned or started: stop that."""
        task, current = self._current_task, self._current
        if task is None or task.done() or current is None or current.operation not in CANCELLABLE:
            return
        if workflow.patched("destroy-cancels-setup"):
            task.cancel("a destroy was requested")

    @submit.validator
    def _validate_submit(self, req: OperationRequest) -> None:
        if self._known(req.operation_id) is not None or req.operation_id in self._recent:
            return
        if self._closed:
            raise ApplicationError("the VPS is destroyed", type="Closed")
        if req.operation in (OperationKind.provision, OperationKind.start, OperationKind.stop):
            busy = next((r for r in self._pending() if r.operation in LIFECYCLE_OPERATIONS), None)
            if busy is not None:
                raise ApplicationError(f"{busy.operation} ({busy.operation_id}) is queued or running on this VPS",
                                       busy.operation_id, busy.operation.value, type="Conflict")
        if _is_pairing(req):
            busy = next((r for r in self._pending() if _is_pairing(r)), None)
            if busy is not None:
                raise ApplicationError(f"a WhatsApp pairing ({busy.operation_id}) is already in progress",
                                       busy.operation_id, busy.operation.value, type="Conflict")
        if len(self._queue) >= MAX_QUEUED:
            raise ApplicationError(f"{MAX_QUEUED} operations are already queued on this VPS", type="QueueFull")

    @workflow.update
    async def cancel_pairing(self) -> str | None:
        """Cancel a WhatsApp pairing in progress (or queued); None when there is none."""
        queued = next((r for r in self._queue if _is_pairing(r)), None)
        if queued is not None:
            self._queue.remove(queued)
            await self._record(queued, OperationStatus.cancelled, "pairing cancelled before it started")
            return queued.operation_id
        if self._pairing is None or self._pairing_task is None:
            return None
        self._pairing_task.cancel()
        return self._pairing.operation_id

    @workflow.update
    async def cancel(self, operation_id: str) -> str:
        """Cancel a provision or a start: `cancelled` for a queued one (recorded here, it never runs),
        `cancelling` for the running one (it removes what it made and records `cancelled` itself)."""
        queued = next((r for r in self._queue if r.operation_id == operation_id), None)
        if queued is not None:
            self._queue.remove(queued)
            await self._record(queued, OperationStatus.cancelled, f"{queued.operation} cancelled before it started")
            return "cancelled"
        self._cancel_setup()
        return "cancelling"

    @cancel.validator
    def _validate_cancel(self, operation_id: str) -> None:
        req = self._known(operation_id)
        if req is None:
            raise ApplicationError(f"operation {operation_id} is not queued or running", type="NotFound")
        if req.operation not in CANCELLABLE:
            raise ApplicationError(f"a {req.operation} cannot be cancelled: only a provision or a start can",
                                   req.operation.value, type="NotCancellable")

    def _position(self, operation_id: str) -> int:
        ids = [r.operation_id for r in self._queue]
        return ids.index(operation_id) + (1 if self._current else 0) if operation_id in ids else 0

    # --- the run loop ----------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: EntityInput) -> None:
        ran = 0
        while True:
            try:
                await workflow.wait_condition(lambda: bool(self._queue), timeout=timedelta(seconds=inp.idle_exit_s))
            except TimeoutError:
                if self._pairing is None:
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    if not self._queue:
                        return
                continue
            req = self._queue.pop(0)
            self._current = req
            try:
                status = await self._run(req)
            finally:
                self._current = None
            self._remember(req.operation_id)
            ran += 1
            if req.operation == OperationKind.destroy and status == OperationStatus.succeeded:
                self._closed = True
                await self._stop_pairing()
                await workflow.wait_condition(workflow.all_handlers_finished)
                for left in self._queue:  # queued behind the destroy: nothing to run them on
                    await self._record(left, OperationStatus.cancelled, "the VPS was destroyed")
                return
            if (ran >= OPERATIONS_PER_RUN or workflow.info().is_continue_as_new_suggested()) and not self._pairing:
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(inp.model_copy(update={"queue": self._queue, "recent": self._recent}))

    def _remember(self, operation_id: str) -> None:
        self._recent = [*self._recent[-(RECENT_KEPT - 1):], operation_id]

    async def _run(self, req: OperationRequest) -> OperationStatus:
        if req.operation in (OperationKind.stop, OperationKind.destroy):
            await self._stop_pairing()
        if _is_pairing(req):
            self._pairing = req
            self._pairing_task = asyncio.create_task(self._pair(req))
            return OperationStatus.running
        # A task, so that a destroy can cancel a provision or a start (`_cancel_setup`); the child run
        # handles the cancellation and reports its outcome, which the await below returns.
        self._current_task = asyncio.create_task(self._child(req))
        try:
            return await self._current_task
        finally:
            self._current_task = None

    async def _child(self, req: OperationRequest) -> OperationStatus:
        try:
            result = await workflow.execute_child_workflow(
                CHILD[req.operation].run, req.child_input(), id=req.operation_id,
                execution_timeout=timedelta(seconds=req.timeouts.operation_s),
                search_attributes=run_attributes(user_id=req.vps.user_id, agent_id=req.vps.agent_id,
                                                 vps_id=req.vps.vps_id))
            return OperationStatus(result.status)
        except WorkflowAlreadyStartedError:
            return OperationStatus.succeeded  # an earlier run of this entity started it: it records itself
        except ChildWorkflowError as err:
            if isinstance(err.cause, CancelledError):
                return OperationStatus.cancelled  # it recorded its own end
            # Timed out or terminated: the operation's own bookkeeping never ran, so it is done here.
            await self._record(req, OperationStatus.failed, f"{req.operation} did not finish: {reason(err)}")
            return OperationStatus.failed

    async def _pair(self, req: OperationRequest) -> None:
        try:
            await self._child(req)
        except asyncio.CancelledError:
            # The child saw the cancellation too and records `cancelled` itself.
            pass
        finally:
            self._pairing, self._pairing_task = None, None
            self._remember(req.operation_id)

    async def _stop_pairing(self) -> None:
        task = self._pairing_task
        if task is not None:
            task.cancel()
            await workflow.wait_condition(lambda: self._pairing_task is None)

    async def _record(self, req: OperationRequest, status: OperationStatus, error: str) -> None:
        """An outcome the operation could not record itself; lifecycle ones leave the VPS in `error`,
        flagged for cleanup, so Reconcile converges it from what the provider reports."""
        lifecycle = req.operation in LIFECYCLE_OPERATIONS and status == OperationStatus.failed
        finish = FinishInput(vps_id=req.vps.vps_id, user_id=req.vps.user_id, operation=req.operation,
                             operation_id=req.operation_id, status=status, error=error,
                             state="error" if lifecycle else None, expect=ANY_LIVE_STATE if lifecycle else [],
                             needs_cleanup=True if lifecycle else None, last_error=error if lifecycle else None)
        await workflow.execute_activity(Act.finish_operation, finish, start_to_close_timeout=timedelta(seconds=30),
                                        retry_policy=DB_RETRY)

