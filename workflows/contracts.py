"""The data workflows and activities exchange (pure pydantic; no secrets ever travel here).

Workflows call activities by these names, so `workflows/` never imports the I/O code in
`activities/`; the worker binds the names to implementations.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


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
    mark_state = "vps.mark_state"
    release_operation = "vps.release_operation"
    reconcile = "vps.reconcile"
    restart_gateway = "agent.restart_gateway"
    configure_channel = "agent.configure_channel"
    await_channel = "agent.await_channel"
    whatsapp_login = "agent.whatsapp_login"
    remove_channel = "agent.remove_channel"
    mark_channel = "agent.mark_channel"


class VpsRef(BaseModel):
    vps_id: str
    agent_id: str
    user_id: str


class LifecycleTimeouts(BaseModel):
    """Budgets, as inputs so tests can shorten them without touching workflow code."""

    vm_running_s: float = 300
    gateway_ready_s: float = Field(default=180, ge=1)
    poll_interval_s: float = 2.0
    provider_call_s: float = 180
    channel_status_s: float = 30
    """How long a new channel may take to report running before it is left as `configured`."""


class OperationInput(BaseModel):
    vps: VpsRef
    operation_id: str
    timeouts: LifecycleTimeouts = Field(default_factory=LifecycleTimeouts)
    step: str | None = None
    """The workflow step this activity call is; the activity records it on the VPS row."""


class MarkStateInput(BaseModel):
    vps_id: str
    state: str
    error: str | None = None


class WaitInput(BaseModel):
    vps_id: str
    timeout_s: float
    poll_interval_s: float
    want: str = "running"
    step: str | None = None


class ReleaseInput(BaseModel):
    vps_id: str
    operation_id: str


class ReconcileInput(BaseModel):
    orphan_grace_s: float = 900
    provisioning_deadline_s: float = 1800


class ReconcileReport(BaseModel):
    checked: int = 0
    drift_fixed: list[str] = Field(default_factory=list)
    orphans_destroyed: list[str] = Field(default_factory=list)
    stuck_failed: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


class OperationResult(BaseModel):
    vps_id: str
    state: str
    error: str | None = None


class ChannelInput(OperationInput):
    kind: str
    qr_timeout_s: float = 180


class ChannelStatusInput(BaseModel):
    agent_id: str
    kind: str
    status: str
    error: str | None = None
