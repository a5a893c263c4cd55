"""VM lifecycle operations: provision, start, stop, destroy; and the Reconcile sweep.

Deterministic orchestration only: every side effect is an idempotent activity named in
`contracts.Act`. Each operation runs as a child of its VPS's entity workflow (workflows/entity.py),
which guarantees one at a time; an operation ends by recording its outcome on its row in
`vps_operations` and, for a lifecycle operation, by a compare-and-set of the VPS's state from the
states it expects, so a stale run can never overwrite what another wrote. The query `step` says
where a run is; the same step is on the operation's row for the API.

Timeouts: provider calls are single-shot and short; every wait is a heartbeating poll activity
(a dead worker is noticed within `heartbeat_s`, and cancellation reaches it); every retry policy
names the errors that retrying cannot fix.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

from workflows.contracts import (
    Act,
    FinishInput,
    OperationInput,
    OperationResult,
    OperationStatus,
    ReconcileInput,
    ReconcileReport,
    WaitInput,
)

# Errors no retry can fix: the activity raised them on purpose (see activities/vps.py `fail`).
DETERMINISTIC = ["VpsError", "StateChanged", "NotRunning", "LockdownViolation", "ValidationError",
                 "ProviderFatal", "VmNotFound", "CapacityUnavailable", "GatewayNotReady", "Timeout",
                 "GatewayPinError", "CertificatePinMismatch", "GatewayNotPinned"]
# Provider calls: 429/5xx/timeouts come back as retryable errors (honouring Retry-After) and are
# retried with backoff; invalid input, quota and auth errors fail fast.
PROVIDER_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                             maximum_interval=timedelta(seconds=30), maximum_attempts=8,
                             non_retryable_error_types=DETERMINISTIC)
DB_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=10),
                       maximum_attempts=20, non_retryable_error_types=DETERMINISTIC)
# A compensation that gives up leaves a VM billed to us; past this, `needs_cleanup` hands it to Reconcile.
CLEANUP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=30),
                            maximum_attempts=12, non_retryable_error_types=["VpsError", "ProviderFatal"])
# A poll is its own retry loop; another attempt only covers a lost worker.
POLL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=3,
                         non_retryable_error_types=DETERMINISTIC)

ANY_LIVE_STATE = ["provisioning", "running", "stopped", "error"]


def reason(err: BaseException) -> str:
    """The most useful human-readable message inside a (possibly nested) activity failure."""
    cause: BaseException | None = err
    message = str(err)
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.message:
            message = cause.message
        elif not isinstance(cause, ActivityError) and str(cause):
            message = str(cause)
        cause = cause.__cause__
    return message


def was_cancelled(err: BaseException) -> bool:
    """The run itself was cancelled (a destroy arrived, see workflows.entity, or an operator), not failed."""
    return isinstance(err, CancelledError | asyncio.CancelledError) or isinstance(err.__cause__, CancelledError)


def error_type(err: BaseException) -> str | None:
    """The ApplicationError type inside an activity failure (e.g. `NotRunning`)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return cause.type
        cause = cause.__cause__
    return None


class _Operation:
    """What every operation shares: the step query, activity options, the outcome record."""

    def __init__(self) -> None:
        self._step = "queued"

    @workflow.query
    def step(self) -> str:
        return self._step

    async def _set_step(self, step: str | None) -> None:
        """Where the run is: for the query and the UI now, and on the operation's row when the next
        activity starts (it carries the step), so no extra round trip is spent on bookkeeping."""
        self._step = step or "done"
        workflow.set_current_details(f"**step:** {self._step}")

    async def _provider(self, act: Act, inp: OperationInput, *, timeout_s: float | None = None,
                        retry: RetryPolicy = PROVIDER_RETRY) -> Any:
        return await workflow.execute_activity(
            act, inp.model_copy(update={"step": self._step}),
            start_to_close_timeout=timedelta(seconds=timeout_s or inp.timeouts.provider_call_s),
            heartbeat_timeout=timedelta(seconds=inp.timeouts.heartbeat_s), retry_policy=retry,
        )

    async def _wait(self, act: Act, inp: OperationInput, timeout_s: float, want: str = "running") -> None:
        arg = WaitInput(vps_id=inp.vps.vps_id, operation_id=inp.operation_id, timeout_s=timeout_s,
                        poll_interval_s=inp.timeouts.poll_interval_s, want=want, step=self._step)
        await workflow.execute_activity(
            act, arg, start_to_close_timeout=timedelta(seconds=timeout_s + 30),
            heartbeat_timeout=timedelta(seconds=inp.timeouts.heartbeat_s), retry_policy=POLL_RETRY,
        )

    async def _contain(self, inp: OperationInput, err: BaseException) -> str:
        """A gateway whose lockdown could not be re-asserted must not go on running weakened: power
        the VM off (reconcile then sees it stopped, not running). Returns what to add to the error."""
        if error_type(err) != "LockdownViolation" or not workflow.patched("lockdown-violation-stops-vm"):
            return ""
        await self._set_step("stop_vm_weakened")
        try:
            await self._provider(Act.stop_vm, inp)
            await self._wait(Act.wait_vm_running, inp, inp.timeouts.vm_running_s, want="stopped")
        except ActivityError as stop:
            return f"; stopping the weakened VM failed too ({reason(stop)})"
        return "; the VM was stopped so it does not run with a weakened lockdown"

    async def _finish(self, inp: OperationInput, status: OperationStatus, *, state: str | None = None,
                      expect: list[str] | None = None, error: str | None = None,
                      needs_cleanup: bool | None = None) -> OperationResult:
        """Record the outcome (and the state, compare-and-set) in one activity; the result says what stuck."""
        finish = FinishInput(vps_id=inp.vps.vps_id, user_id=inp.vps.user_id, operation=inp.operation,
                             operation_id=inp.operation_id, status=status, error=error,
                             state=state, expect=expect or [], needs_cleanup=needs_cleanup,
                             last_error=error if state is not None else None)
        result: OperationResult = await workflow.execute_activity(
            Act.finish_operation, finish, start_to_close_timeout=timedelta(seconds=30), retry_policy=DB_RETRY,
            result_type=OperationResult)
        await self._set_step(None)
        return result


@workflow.defn(name="ProvisionVps")
class ProvisionVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        expect = ["provisioning"]
        try:
            await self._set_step("create_vm")
            await self._provider(Act.create_vm, inp)
            await self._set_step("wait_vm_running")
            await self._wait(Act.wait_vm_running, inp, inp.timeouts.vm_running_s)
            await self._set_step("wait_gateway_ready")
            await self._wait(Act.wait_gateway_ready, inp, inp.timeouts.gateway_ready_s)
            await self._set_step("pair_gateway")
            await self._provider(Act.pair_gateway, inp, timeout_s=inp.timeouts.pairing_s + 30)
            await self._set_step("push_config")
            await self._provider(Act.push_config, inp, timeout_s=2 * inp.timeouts.gateway_ready_s + 60)
            return await self._finish(inp, OperationStatus.succeeded, state="running", expect=expect)
        except (ActivityError, CancelledError, asyncio.CancelledError) as err:
            # From create_vm on a VM may exist at the provider even if the call failed locally.
            # Cancelled: a destroy arrived while it ran (workflows.entity), or an operator cancelled it.
            cancelled = was_cancelled(err)
            message = "provisioning was cancelled" if cancelled else f"provisioning failed: {reason(err)}"
            workflow.logger.warning("provisioning failed", extra={"vps_id": inp.vps.vps_id, "reason": message})
            await self._set_step("compensate_destroy_vm")
            cleanup_failed = False
            try:
                removal = asyncio.ensure_future(self._provider(Act.destroy_vm, inp, retry=CLEANUP_RETRY,
                                                               timeout_s=inp.timeouts.vm_gone_s + 30))
                await self._outlasting_cancel(removal)
            except ActivityError as cleanup:
                cleanup_failed = True
                message += f"; removing the VM failed too ({reason(cleanup)}), Reconcile will retry it"
            status = OperationStatus.cancelled if cancelled else OperationStatus.failed
            return await self._finish(inp, status, state="error", expect=expect, error=message,
                                      needs_cleanup=cleanup_failed)


    @staticmethod
    async def _outlasting_cancel(task: asyncio.Future[Any]) -> Any:
        """Await the VM's removal even if the run is cancelled meanwhile (a cancel or a destroy that
        arrives after a failure): stopping it would leave a VM billed until Reconcile finds it."""
        if not workflow.patched("provision-cleanup-outlasts-cancel"):
            return await task
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    return task.result()


@workflow.defn(name="StartVps")
class StartVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        expect = ["stopped", "error", "running"]
        try:
            await self._set_step("start_vm")
            await self._provider(Act.start_vm, inp)
            await self._set_step("wait_vm_running")
            await self._wait(Act.wait_vm_running, inp, inp.timeouts.vm_running_s)
            await self._set_step("wait_gateway_ready")
            await self._wait(Act.wait_gateway_ready, inp, inp.timeouts.gateway_ready_s)
            # Whatever changed on the VM's disk while it was off, the lockdown is re-asserted.
            await self._set_step("push_config")
            await self._provider(Act.push_config, inp, timeout_s=2 * inp.timeouts.gateway_ready_s + 60)
            return await self._finish(inp, OperationStatus.succeeded, state="running", expect=expect)
        except (ActivityError, CancelledError, asyncio.CancelledError) as err:
            if was_cancelled(err):  # the VM may be half up: `error` until the destroy or a new start
                return await self._finish(inp, OperationStatus.cancelled, state="error", expect=expect,
                                          error="the start was cancelled")
            contained = await self._contain(inp, err)
            return await self._finish(inp, OperationStatus.failed, state="error", expect=expect,
                                      error=f"start failed: {reason(err)}{contained}")


@workflow.defn(name="StopVps")
class StopVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        expect = ["running", "error", "stopped"]
        try:
            await self._set_step("stop_vm")
            await self._provider(Act.stop_vm, inp)
            await self._set_step("wait_vm_stopped")
            await self._wait(Act.wait_vm_running, inp, inp.timeouts.vm_running_s, want="stopped")
            return await self._finish(inp, OperationStatus.succeeded, state="stopped", expect=expect)
        except ActivityError as err:
            return await self._finish(inp, OperationStatus.failed, state="error", expect=expect,
                                      error=f"stop failed: {reason(err)}")


@workflow.defn(name="DestroyVps")
class DestroyVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        try:
            await self._set_step("record_storage_usage")
            try:
                await self._provider(Act.record_storage_usage, inp, retry=RetryPolicy(
                    maximum_attempts=3, non_retryable_error_types=DETERMINISTIC))
            except ActivityError as err:
                # Losing a usage row is better than keeping a billed VM alive.
                workflow.logger.warning("storage usage not recorded", extra={"reason": reason(err)})
            await self._set_step("destroy_vm")
            await self._provider(Act.destroy_vm, inp, timeout_s=inp.timeouts.vm_gone_s + 30, retry=CLEANUP_RETRY)
            return await self._finish(inp, OperationStatus.succeeded, state="destroyed", expect=ANY_LIVE_STATE,
                                      needs_cleanup=False)
        except ActivityError as err:
            return await self._finish(inp, OperationStatus.failed, state="error", expect=ANY_LIVE_STATE,
                                      error=f"destroy failed: {reason(err)}; Reconcile will retry removing the VM",
                                      needs_cleanup=True)


@workflow.defn(name="Reconcile")
class Reconcile:
    """Run by a Temporal Schedule: repairs drift, removes orphans, converges `error`, expires stuck runs."""

    @workflow.run
    async def run(self, inp: ReconcileInput) -> ReconcileReport:
        report: ReconcileReport = await workflow.execute_activity(
            Act.reconcile, inp, start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=DETERMINISTIC),
            result_type=ReconcileReport,
        )
        return report
