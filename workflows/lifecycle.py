"""VM lifecycle workflows: provision, start, stop, destroy, reconcile.

Deterministic orchestration only: every side effect is an idempotent activity named in
`contracts.Act`. Each operation holds the VPS's operation slot (set by the API when it starts
the run) and always releases it, whatever happens, so a crashed or failed run never blocks the
next request. The query `step` says where a run is; the same step is written to the VPS row
for the API.
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
    MarkStateInput,
    OperationInput,
    OperationResult,
    ReconcileInput,
    ReconcileReport,
    ReleaseInput,
    WaitInput,
)

# Provider calls: 429/5xx/timeouts come back as retryable errors and are retried with backoff;
# invalid input, quota and auth errors are raised non-retryable and fail fast.
PROVIDER_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                             maximum_interval=timedelta(seconds=30), maximum_attempts=8)
DB_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=10))
# A compensation that gives up leaves a VM billed to us: retry it for much longer.
CLEANUP_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_interval=timedelta(seconds=60),
                            maximum_attempts=30)


PROVISIONING_FAILED = "provisioning failed:"


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


class _Operation:
    """What every lifecycle run shares: the step query, DB bookkeeping, the slot release."""

    def __init__(self) -> None:
        self._step = "queued"
        self._inp: OperationInput | None = None

    @workflow.query
    def step(self) -> str:
        return self._step

    async def _db(self, act: Act, arg: Any) -> None:
        await workflow.execute_activity(act, arg, start_to_close_timeout=timedelta(seconds=30),
                                        retry_policy=DB_RETRY)

    async def _set_step(self, step: str | None) -> None:
        """Where the run is: for the query and the UI now, and on the VPS row when the next activity
        starts (it carries the step), so no extra activity round trip is spent on bookkeeping."""
        self._step = step or "done"
        workflow.set_current_details(f"**step:** {self._step}")

    async def _provider(self, act: Act, inp: OperationInput, *, heartbeat: bool = False,
                        timeout_s: float | None = None, retry: RetryPolicy = PROVIDER_RETRY) -> Any:
        budget = timedelta(seconds=timeout_s or inp.timeouts.provider_call_s)
        return await workflow.execute_activity(
            act, inp.model_copy(update={"step": self._step}), start_to_close_timeout=budget, retry_policy=retry,
            heartbeat_timeout=timedelta(seconds=max(10, inp.timeouts.poll_interval_s * 5)) if heartbeat else None,
        )

    async def _wait(self, act: Act, inp: OperationInput, timeout_s: float, want: str = "running") -> None:
        arg = WaitInput(vps_id=inp.vps.vps_id, timeout_s=timeout_s, poll_interval_s=inp.timeouts.poll_interval_s,
                        want=want, step=self._step)
        await workflow.execute_activity(
            act, arg,
            start_to_close_timeout=timedelta(seconds=timeout_s + 30),
            heartbeat_timeout=timedelta(seconds=max(10, inp.timeouts.poll_interval_s * 5)),
            # The poll itself is the retry loop; a second attempt only covers a lost worker.
            retry_policy=RetryPolicy(maximum_attempts=3, initial_interval=timedelta(seconds=1)),
        )

    async def _finish(self, inp: OperationInput, state: str, error: str | None = None) -> OperationResult:
        await self._db(Act.mark_state, MarkStateInput(vps_id=inp.vps.vps_id, state=state, error=error))
        await self._set_step(None)
        return OperationResult(vps_id=inp.vps.vps_id, state=state, error=error)

    async def _release(self, inp: OperationInput) -> None:
        await workflow.execute_activity(
            Act.release_operation, ReleaseInput(vps_id=inp.vps.vps_id, operation_id=inp.operation_id),
            start_to_close_timeout=timedelta(seconds=30), retry_policy=DB_RETRY)


@workflow.defn(name="ProvisionVps")
class ProvisionVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        self._inp = inp
        vm_may_exist = False
        try:
            try:
                await self._set_step("create_vm")
                # From here on a VM may exist at the provider even if the call fails locally.
                vm_may_exist = True
                await self._provider(Act.create_vm, inp)
                await self._set_step("wait_vm_running")
                await self._wait(Act.wait_vm_running, inp, inp.timeouts.vm_running_s)
                await self._set_step("wait_gateway_ready")
                await self._wait(Act.wait_gateway_ready, inp, inp.timeouts.gateway_ready_s)
                await self._set_step("pair_gateway")
                await self._provider(Act.pair_gateway, inp, timeout_s=60)
                await self._set_step("push_config")
                await self._provider(Act.push_config, inp, timeout_s=90)
                return await self._finish(inp, "running")
            except (ActivityError, CancelledError, asyncio.CancelledError) as err:
                message = reason(err)
                workflow.logger.warning("provisioning failed", extra={"vps_id": inp.vps.vps_id, "reason": message})
                if vm_may_exist:
                    await self._set_step("compensate_destroy_vm")
                    try:
                        await self._provider(Act.destroy_vm, inp, retry=CLEANUP_RETRY)
                    except ActivityError as cleanup:
                        # The VPS is marked failed either way; Reconcile removes what is left.
                        message += f"; removing the VM failed too ({reason(cleanup)}), it will be retried"
                return await self._finish(inp, "error", f"{PROVISIONING_FAILED} {message}")
        finally:
            await self._release(inp)


@workflow.defn(name="StartVps")
class StartVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        self._inp = inp
        try:
            await self._set_step("start_vm")
            await self._provider(Act.start_vm, inp)
            await self._set_step("wait_vm_running")
            await self._wait(Act.wait_vm_running, inp, inp.timeouts.vm_running_s)
            await self._set_step("wait_gateway_ready")
            await self._wait(Act.wait_gateway_ready, inp, inp.timeouts.gateway_ready_s)
            # Whatever changed on the VM's disk while it was off, the lockdown is re-asserted.
            await self._set_step("push_config")
            await self._provider(Act.push_config, inp, timeout_s=90)
            return await self._finish(inp, "running")
        except ActivityError as err:
            return await self._finish(inp, "error", f"start failed: {reason(err)}")
        finally:
            await self._release(inp)


@workflow.defn(name="StopVps")
class StopVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        self._inp = inp
        try:
            await self._set_step("stop_vm")
            await self._provider(Act.stop_vm, inp)
            await self._set_step("wait_vm_stopped")
            await self._wait(Act.wait_vm_running, inp, inp.timeouts.vm_running_s, want="stopped")
            return await self._finish(inp, "stopped")
        except ActivityError as err:
            return await self._finish(inp, "error", f"stop failed: {reason(err)}")
        finally:
            await self._release(inp)


@workflow.defn(name="DestroyVps")
class DestroyVps(_Operation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        self._inp = inp
        try:
            await self._set_step("record_storage_usage")
            try:
                await self._provider(Act.record_storage_usage, inp, timeout_s=60,
                                     retry=RetryPolicy(maximum_attempts=3))
            except ActivityError as err:
                # Losing a usage row is better than keeping a billed VM alive.
                workflow.logger.warning("storage usage not recorded", extra={"reason": reason(err)})
            await self._set_step("destroy_vm")
            await self._provider(Act.destroy_vm, inp, retry=CLEANUP_RETRY)
            return await self._finish(inp, "destroyed")
        except ActivityError as err:
            return await self._finish(inp, "error", f"destroy failed: {reason(err)}")
        finally:
            await self._release(inp)


@workflow.defn(name="Reconcile")
class Reconcile:
    """Run by a Temporal Schedule: repairs drift, removes orphans, fails stuck provisioning."""

    @workflow.run
    async def run(self, inp: ReconcileInput) -> ReconcileReport:
        report: ReconcileReport = await workflow.execute_activity(
            Act.reconcile, inp, start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=timedelta(seconds=60), retry_policy=RetryPolicy(maximum_attempts=3),
            result_type=ReconcileReport,
        )
        return report
