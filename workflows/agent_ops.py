"""Operations on a running agent's gateway: settings push, restart, channel connect/disconnect.

They run as children of the VPS's entity workflow, queued behind whatever runs, and never change
the VPS's lifecycle state: a failed push leaves a running VM running, and its failure is recorded
on the operation's row for the API. An operation that finds the agent not running (it was stopped
while this one waited in the queue) ends with that reason; saved settings are applied at the next
start. Channel credentials never pass through here; activities read them from the database.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError

from workflows.contracts import (
    Act,
    ChannelInput,
    ChannelStatusInput,
    OperationInput,
    OperationResult,
    OperationStatus,
)
from workflows.lifecycle import DB_RETRY, DETERMINISTIC, _Operation, error_type, reason

# The activities already wait for a gateway that is restarting (connect) and for a config write the
# gateway applies by reloading (`write_config`), each up to a gateway start; a few attempts on top
# cover a lost worker or a dropped session.
GATEWAY_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                            maximum_interval=timedelta(seconds=15), maximum_attempts=3,
                            non_retryable_error_types=[*DETERMINISTIC, "ChannelRejected", "ChannelError"])


class _AgentOperation(_Operation):
    async def _gateway(self, act: Act, inp: OperationInput, work_s: float = 30) -> None:
        """`work_s`: the activity's own work, on top of waiting for a gateway that is restarting (connect)
        and for a config write the gateway applies by reloading (each up to a gateway start)."""
        timeout = timedelta(seconds=work_s + 2 * inp.timeouts.gateway_ready_s + 60)
        await workflow.execute_activity(
            act, inp.model_copy(update={"step": self._step}), start_to_close_timeout=timeout,
            heartbeat_timeout=timedelta(seconds=inp.timeouts.heartbeat_s), retry_policy=GATEWAY_RETRY)

    async def _mark_channel(self, inp: ChannelInput, status: str, error: str | None = None) -> None:
        await workflow.execute_activity(
            Act.mark_channel, ChannelStatusInput(agent_id=inp.vps.agent_id, kind=inp.kind, status=status, error=error),
            start_to_close_timeout=timedelta(seconds=30), retry_policy=DB_RETRY)


@workflow.defn(name="PushConfig")
class PushConfig(_AgentOperation):
    """Apply the agent's settings (personality files, model) and re-assert the lockdown."""

    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        try:
            await self._set_step("push_config")
            await self._gateway(Act.push_config, inp)
            return await self._finish(inp, OperationStatus.succeeded)
        except ActivityError as err:
            if error_type(err) == "NotRunning":
                # Saved already; StartVps pushes the settings when the agent next starts.
                return await self._finish(inp, OperationStatus.succeeded,
                                          error=f"{reason(err)}; the settings are applied at the next start")
            contained = await self._contain(inp, err)
            if contained:  # the agent is off now: its lifecycle state says so
                return await self._finish(inp, OperationStatus.failed, state="error", expect=["running"],
                                          error=f"settings not applied: {reason(err)}{contained}")
            return await self._finish(inp, OperationStatus.failed, error=f"settings not applied: {reason(err)}")


@workflow.defn(name="RestartAgent")
class RestartAgent(_AgentOperation):
    @workflow.run
    async def run(self, inp: OperationInput) -> OperationResult:
        try:
            await self._set_step("restart_gateway")
            await self._gateway(Act.restart_gateway, inp)
            await self._set_step("wait_gateway_ready")
            await self._wait(Act.wait_gateway_ready, inp, inp.timeouts.gateway_ready_s)
            return await self._finish(inp, OperationStatus.succeeded)
        except ActivityError as err:
            return await self._finish(inp, OperationStatus.failed, error=f"restart failed: {reason(err)}")


@workflow.defn(name="ConnectChannel")
class ConnectChannel(_AgentOperation):
    """Token channels: write the config, then report the live status. WhatsApp: QR login loop."""

    @workflow.run
    async def run(self, inp: ChannelInput) -> OperationResult:
        try:
            if inp.kind == "whatsapp":
                await self._set_step("whatsapp_login")
                await self._gateway(Act.whatsapp_login, inp, work_s=inp.qr_timeout_s)
            else:
                await self._set_step("configure_channel")
                await self._gateway(Act.configure_channel, inp)
                await self._set_step("await_channel")
                await self._gateway(Act.await_channel, inp, work_s=inp.timeouts.channel_status_s)
            return await self._finish(inp, OperationStatus.succeeded)
        except (asyncio.CancelledError, CancelledError, ActivityError) as err:
            if not isinstance(err, ActivityError) or isinstance(err.cause, CancelledError):
                # DELETE during a WhatsApp pairing, or the agent is being stopped: nothing to undo.
                await self._mark_channel(inp, "cancelled", "pairing cancelled")
                return await self._finish(inp, OperationStatus.cancelled, error="pairing cancelled")
            message = reason(err)
            await self._mark_channel(inp, "error", message)
            return await self._finish(inp, OperationStatus.failed, error=f"{inp.kind} not connected: {message}")


@workflow.defn(name="DisconnectChannel")
class DisconnectChannel(_AgentOperation):
    @workflow.run
    async def run(self, inp: ChannelInput) -> OperationResult:
        try:
            await self._set_step("remove_channel")
            await self._gateway(Act.remove_channel, inp)
            return await self._finish(inp, OperationStatus.succeeded)
        except ActivityError as err:
            return await self._finish(inp, OperationStatus.failed, error=f"{inp.kind} not removed: {reason(err)}")
