"""Request and response bodies. Secrets never appear in a response model."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

T = TypeVar("T")

MAX_BUDGET_CENTS = 10_000_000  # $100,000 a month: anything above is a typo, not a budget


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class VpsConfigOut(BaseModel):
    id: uuid.UUID
    name: str
    provider: str
    cpu_millicores: int
    memory_mb: int
    disk_gb: int
    locations: list[str]


class PlanOut(BaseModel):
    id: uuid.UUID
    name: str
    display_name: str
    is_default: bool
    price_cents_per_month: int
    max_agents: int
    max_vpses: int
    max_bandwidth_bytes: int
    max_storage_bytes: int
    max_cpu_ms: int
    max_memory_mb_seconds: int
    overage_bandwidth_cost_per_gb_cents: int
    overage_storage_cost_per_gb_cents: int
    overage_cpu_cost_per_hour_cents: int
    overage_memory_cost_per_gb_hour_cents: int
    vps_configs: list[VpsConfigOut]


class UserOut(BaseModel):
    id: uuid.UUID
    email: str | None
    name: str | None
    image: str | None
    email_verified: datetime | None
    is_admin: bool
    plan: PlanOut


class OverageBudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget_cents: Annotated[StrictInt, Field(ge=0, le=MAX_BUDGET_CENTS,
                                             description="Monthly overage cap in US cents")]


class OverageBudgetOut(BaseModel):
    budget_cents: int
    period_start: date
    currency: str = "USD"


AgentName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64,
                                             pattern=r"^[^\x00-\x1f\x7f]+$")]
ModelId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=128,
                                           pattern=r"^[a-z0-9][a-z0-9._-]*/[A-Za-z0-9._:-]+$")]


class AgentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: AgentName
    model: ModelId | None = None


class OperationOut(BaseModel):
    id: str
    operation: str = Field(description="The workflow type, e.g. StartVps")
    kind: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    step: str | None
    error: str | None = Field(description="Why it failed (or a note on a success)")
    detail: dict[str, Any]
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class VpsOut(BaseModel):
    id: uuid.UUID
    state: str = Field(description="Lifecycle state: provisioning, running, stopped, destroyed or error")
    provider: str
    vps_config_id: uuid.UUID
    operation_id: str | None = Field(description="The oldest operation queued or running on this VPS; null when idle")
    step: str | None = Field(description="Where that operation is")
    operation: OperationOut | None
    last_operation: OperationOut | None = Field(description="The most recently finished operation, failed or not")
    last_error: str | None
    observed_state: str | None = Field(description="What the provider last reported about the VM")
    observed_at: datetime | None
    needs_cleanup: bool = Field(description="A VM may be left that Reconcile will remove")
    region: str | None
    created_at: datetime | None
    state_changed_at: datetime | None


class SettingsSync(BaseModel):
    saved_version: int = Field(description="Bumped on every saved settings change")
    applied_version: int | None = Field(description="The version the agent's gateway last confirmed holding")
    in_sync: bool


class AgentOut(BaseModel):
    id: uuid.UUID
    name: str
    model: str | None
    gateway_token_hint: str = Field(description="Last 4 characters only; the token is never returned")
    vps: VpsOut | None
    settings: SettingsSync
    created_at: datetime | None
