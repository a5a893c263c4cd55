"""The data workflows and activities exchange (pure pydantic; no secrets ever travel here).

Workflows call activities by these names, so `workflows/` never imports the I/O code in
`activities/`; the worker binds the names to implementations.
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum

from pydantic import BaseModel, Field, field_validator


class OperationKind(StrEnum):
    provision = "provision"
    start = "start"
    stop = "stop"
    destroy = "destroy"
    settings = "settings"
    restart = "restart"
    channel_connect = "channel_connect"
    channel_disconnect = "channel_disconnect"


LIFECYCLE_OPERATIONS = frozenset({OperationKind.provision, OperationKind.start, OperationKind.stop,
                                  OperationKind.destroy})
"""Operations that change the VPS's lifecycle state; the others need a running agent."""


class OperationStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINAL_STATUSES = frozenset({OperationStatus.succeeded, OperationStatus.failed, OperationStatus.cancelled})


class Act(StrEnum):
    create_vm = "vps.create_vm"
    wait_vm_running = "vps.wait_vm_running"
    wait_gateway_ready = "vps.wait_gateway_ready"
    pair_gateway = "vps.pair_gateway"
    push_config = "vps.push_config"
    start_vm = "vps.start_vm"
    stop_vm = "vps.stop_vm"
    destroy_vm = "vps.destroy_vm"
    record_storage_usage = "vps.record_storage_usage"
    finish_operation = "vps.finish_operation"
    reconcile = "vps.reconcile"
    restart_gateway = "agent.restart_gateway"
    configure_channel = "agent.configure_channel"
    await_channel = "agent.await_channel"
    whatsapp_login = "agent.whatsapp_login"
    remove_channel = "agent.remove_channel"
    mark_channel = "agent.mark_channel"
    evaluate_usage = "enforcement.evaluate_usage"
    stop_for_overage = "enforcement.stop_for_overage"
    pending_emails = "notifications.pending_emails"
    send_email = "notifications.send_email"


class VpsRef(BaseModel):
    vps_id: str
    agent_id: str
    user_id: str


class LifecycleTimeouts(BaseModel):
    """Budgets, as inputs so tests can shorten them without touching workflow code.

    Provider calls are single-shot (submit and return), so `provider_call_s` bounds one call and
    every wait is a heartbeating poll activity with its own budget.
    """

    vm_running_s: float = 300
    gateway_ready_s: float = Field(default=180, ge=1)
    poll_interval_s: float = 2.0
    provider_call_s: float = 60
    vm_gone_s: float = 300
    """How long a destroyed VM may take to disappear at the provider."""
    pairing_s: float = 90
    channel_status_s: float = 30
    """How long a new channel may take to report running before it is left as `configured`."""
    heartbeat_s: float = 15
    """An activity that stops heartbeating this long is retried elsewhere (its worker is gone)."""
    operation_s: float = 3600
    """Execution timeout of one operation's workflow run: nothing runs forever."""


class OperationInput(BaseModel):
    vps: VpsRef
    operation_id: str
    operation: OperationKind
    timeouts: LifecycleTimeouts = Field(default_factory=LifecycleTimeouts)
    step: str | None = None
    """The workflow step this activity call is; the activity records it on the operation's row."""


class OperationRequest(BaseModel):
    """What the API submits to a VPS's entity workflow."""

    vps: VpsRef
    operation_id: str
    operation: OperationKind
    channel: str | None = None
    """The channel kind, for channel_connect / channel_disconnect."""
    timeouts: LifecycleTimeouts = Field(default_factory=LifecycleTimeouts)

    def child_input(self) -> OperationInput:
        base = {"vps": self.vps, "operation_id": self.operation_id, "operation": self.operation,
                "timeouts": self.timeouts}
        if self.channel is not None:
            return ChannelInput(**base, kind=self.channel)
        return OperationInput(**base)


class Submitted(BaseModel):
    operation_id: str
    operation: OperationKind
    new: bool
    """False when the entity already knew this operation (a retried request)."""
    position: int
    """0: runs now (or in the background, for a WhatsApp pairing); n: n operations ahead of it."""


class EntityInput(BaseModel):
    """A VPS's entity workflow, started on its first operation; carried over continue-as-new."""

    vps: VpsRef
    queue: list[OperationRequest] = Field(default_factory=list)
    recent: list[str] = Field(default_factory=list)
    """Recently finished operation ids, so a retried submit is answered, not run twice."""
    idle_exit_s: float = 3600
    """An idle entity ends; the next operation starts a new run."""


class EntityStatus(BaseModel):
    current: str | None
    pairing: str | None
    queued: list[str]
    closed: bool


class FinishInput(BaseModel):
    """The end of an operation: its row, and for lifecycle operations a compare-and-set of the state."""

    vps_id: str
    user_id: str
    operation: OperationKind
    operation_id: str
    status: OperationStatus
    error: str | None = None
    state: str | None = None
    expect: list[str] = Field(default_factory=list)
    """The states the VPS may be in for `state` to be written; anything else is reported, not overwritten."""
    needs_cleanup: bool | None = None
    last_error: str | None = None
    """What the VPS row says; None clears it (set with `state`)."""


class WaitInput(BaseModel):
    vps_id: str
    operation_id: str
    timeout_s: float
    poll_interval_s: float
    want: str = "running"
    step: str | None = None


class ReconcileInput(BaseModel):
    orphan_grace_s: float = 900
    """A VM nobody owns is destroyed once it is this old (a provision may not have saved its ref yet)."""
    provisioning_deadline_s: float = 300
    """A VPS still `provisioning` with no operation queued or running, this long after it was made, failed."""
    operation_deadline_s: float = 4200
    """An operation still queued or running this long after it was requested is dead (runs time out at
    `LifecycleTimeouts.operation_s`); it is marked failed so nothing waits on it forever."""


class ReconcileReport(BaseModel):
    checked: int = 0
    drift_fixed: list[str] = Field(default_factory=list)
    orphans_destroyed: list[str] = Field(default_factory=list)
    cleaned_up: list[str] = Field(default_factory=list)
    stuck_failed: list[str] = Field(default_factory=list)
    operations_expired: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


class OperationResult(BaseModel):
    vps_id: str
    operation_id: str = ""
    status: OperationStatus = OperationStatus.succeeded
    state: str | None = None
    """The VPS's lifecycle state after the operation, when it changed it."""
    error: str | None = None


class ChannelInput(OperationInput):
    kind: str
    qr_timeout_s: float = 180


class ChannelStatusInput(BaseModel):
    agent_id: str
    kind: str
    status: str
    error: str | None = None


# --- usage enforcement and notifications --------------------------------------------------------


class EnforceUsageInput(BaseModel):
    """The `EnforceUsage` workflow's input; `MeteringCycle` starts it as a child after each collection."""

    period_start: date
    """The calendar month (UTC) the usage belongs to: its first day."""
    user_ids: list[str] = Field(default_factory=list)
    """The users to judge; empty = every user with usage this period."""

    @field_validator("period_start")
    @classmethod
    def _first_of_month(cls, v: date) -> date:
        if v.day != 1:
            raise ValueError("period_start must be the first day of a month")
        return v


class EvaluateInput(BaseModel):
    period_start: date
    user_ids: list[str] = Field(default_factory=list)


class OverageStop(BaseModel):
    """One VPS to stop: the operation id is derived from user, period, budget revision and VPS."""

    vps: VpsRef
    operation_id: str


class UserDecision(BaseModel):
    user_id: str
    decision: str
    """`ok`, `stop`, `exempt` (over, but exempt) or `past-period` (over in a month already gone: no stop)."""
    overage_cents: int = 0
    budget_cents: int = 0
    warnings: int = 0
    """New threshold warnings written this run."""
    stops: list[OverageStop] = Field(default_factory=list)


class EvaluateResult(BaseModel):
    decisions: list[UserDecision] = Field(default_factory=list)


class StopOutcome(BaseModel):
    operation_id: str
    outcome: str
    """`submitted` (the entity queued it now), `known` (it already had it, or it ran before: nothing sent
    again), `gone` (the VPS was destroyed) or `busy` (another lifecycle operation runs; the next cycle retries)."""


class EmailOutcome(BaseModel):
    notification_id: str
    outcome: str
    """`sent`, `already` (sent before: not sent again), `skipped` (no address / no SMTP configured)."""


class EnforceUsageResult(BaseModel):
    decisions: list[UserDecision] = Field(default_factory=list)
    stops: list[StopOutcome] = Field(default_factory=list)
    emails: list[EmailOutcome] = Field(default_factory=list)
    email_failures: int = 0
    """Emails whose sending gave up this run; they stay in the outbox for the next run."""
