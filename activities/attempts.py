"""Failed attempts of an operation's step, on the operation's row while Temporal retries the step.

Temporal retries a failed activity by itself (a provider's 503, a gateway that timed out, a worker
killed mid-step), which is the point; but the workflow only hears of the last attempt. Without
this, a provision whose provider answers 503 for ten minutes shows `running`, step `create_vm`,
and nothing else until the retries run out. So every attempt that fails and will be retried is
written on its operation's row (`vps_operations.retrying`): the step, the attempt's number, the
reason, when the next attempt is due. An attempt that never reported (its worker was killed, or it
ran past its time limit) is written by the next attempt when it starts. A step that then succeeds
clears it; the API shows it only on a running operation whose current step it names.

A worker interceptor, so it covers every operation activity without one line in each, and a
database write only when an attempt fails or follows a failure: the happy path costs nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlmodel import col
from temporalio import activity
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from activities.vps import VpsActivities
from db.models import ACTIVE_OPERATION, VpsOperation

log = logging.getLogger(__name__)

ERROR_MAX = 500
LOST = ("attempt {n} stopped without an answer: its worker was lost or it ran past its time limit")


def will_retry(err: BaseException, info: activity.Info) -> bool:
    """What Temporal will do with this failure, from the same facts it decides on."""
    if isinstance(err, ApplicationError) and err.non_retryable:
        return False
    policy = info.retry_policy
    if policy is None:
        return True
    if policy.maximum_attempts and info.attempt >= policy.maximum_attempts:
        return False
    kind = err.type if isinstance(err, ApplicationError) else type(err).__name__
    return kind not in (policy.non_retryable_error_types or ())


def retry_delay(err: BaseException, attempt: int, policy: RetryPolicy | None) -> timedelta:
    """Temporal's backoff after `attempt` failed: the error's own delay (a provider's Retry-After),
    else initial * coefficient^(attempt-1), capped at the maximum (default 100x the initial)."""
    if isinstance(err, ApplicationError) and err.next_retry_delay is not None:
        return err.next_retry_delay
    policy = policy or RetryPolicy()
    delay = policy.initial_interval * policy.backoff_coefficient ** (attempt - 1)
    return min(delay, policy.maximum_interval or policy.initial_interval * 100)


def message(err: BaseException) -> str:
    text = err.message if isinstance(err, ApplicationError) else str(err)
    return (text or type(err).__name__)[:ERROR_MAX]


class _RecordAttempts(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        owner = getattr(input.fn, "__self__", None)
        arg = input.args[0] if input.args else None
        operation_id, step = getattr(arg, "operation_id", None), getattr(arg, "step", None)
        if not isinstance(owner, VpsActivities) or not operation_id or not step:
            return await self.next.execute_activity(input)
        info = activity.info()
        retrying = col(VpsOperation.retrying)
        if info.attempt > 1:  # the one before failed; if it wrote nothing, its worker died with it
            lost = info.attempt - 1
            await _note(owner, operation_id, _failed(step, lost, LOST.format(n=lost), timedelta()),
                        or_(retrying.is_(None), retrying["step"].astext != step,
                            retrying["attempt"].astext != str(lost)))
        try:
            result = await self.next.execute_activity(input)
        except Exception as err:
            if will_retry(err, info):
                await _note(owner, operation_id, _failed(step, info.attempt, message(err),
                                                         retry_delay(err, info.attempt, info.retry_policy)))
            raise
        if info.attempt > 1:  # done after all: the step's note goes
            await _note(owner, operation_id, None, retrying["step"].astext == step)
        return result


def _failed(step: str, attempt: int, error: str, delay: timedelta) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"step": step, "attempt": attempt, "error": error, "failed_at": now.isoformat(),
            "next_attempt_at": (now + delay).isoformat()}


async def _note(owner: VpsActivities, operation_id: str, value: dict[str, Any] | None, *where: Any) -> None:
    """Set the running operation's note (when `where` holds). Best effort: a database that cannot take
    it must not change the attempt's outcome."""
    try:
        async with owner.sessions() as s, s.begin():
            await s.exec(update(VpsOperation).where(  # type: ignore[call-overload]
                col(VpsOperation.id) == operation_id, col(VpsOperation.status).in_(ACTIVE_OPERATION), *where)
                .values(retrying=value))
    except Exception as err:  # noqa: BLE001
        log.warning("could not record the attempt on the operation", extra={
            "operation_id": operation_id, "error": type(err).__name__})


class OperationAttempts(Interceptor):
    """`Worker(interceptors=[OperationAttempts()])`: see the module's docstring."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _RecordAttempts(next)
