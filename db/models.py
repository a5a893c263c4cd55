"""The twelve tables of PRD §5.

`users`, `accounts`, `sessions` and `verification_token` follow the @auth/pg-adapter shape
(quoted camelCase columns, singular `verification_token`) so an Auth.js frontend using that
adapter works against this database unchanged; ids are UUIDs with server defaults because the
adapter never sends an id on insert. The Alembic migrations own the DDL (constraints, checks);
these classes mirror them for queries.
"""


import enum
import uuid
from datetime import date, datetime
from typing import Any, Optional

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlmodel import Field, Relationship, SQLModel

from db.encryption import EncryptedText


def _uuid_pk() -> Column:  # type: ignore[type-arg]
    return Column(UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()"))


def _created() -> Column:  # type: ignore[type-arg]
    return Column(DateTime(timezone=True), nullable=False, server_default=func.now())


class VpsState(enum.StrEnum):
    provisioning = "provisioning"
    running = "running"
    stopped = "stopped"
    destroyed = "destroyed"
    error = "error"


class ProviderKind(enum.StrEnum):
    hetzner = "hetzner"
    fly = "fly"
    local = "local"


class ChannelKind(enum.StrEnum):
    whatsapp = "whatsapp"
    telegram = "telegram"
    discord = "discord"
    slack = "slack"
    signal = "signal"


# --- plans and VM tiers ---------------------------------------------------------------------


class PlanVpsConfig(SQLModel, table=True):
    __tablename__ = "plan_vps_configs"
    plan_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("plans.id", ondelete="CASCADE"), primary_key=True)
    )
    vps_config_id: uuid.UUID = Field(
        sa_column=Column(
            UUID(as_uuid=True), ForeignKey("vps_configs.id", ondelete="CASCADE"), primary_key=True
        )
    )


class Plan(SQLModel, table=True):
    __tablename__ = "plans"
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    name: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    display_name: str = Field(sa_column=Column(String(128), nullable=False))
    is_default: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default="false"))
    price_cents_per_month: int = Field(sa_column=Column(Integer, nullable=False, server_default="0"))
    max_agents: int = Field(sa_column=Column(Integer, nullable=False))
    max_vpses: int = Field(sa_column=Column(Integer, nullable=False))
    max_bandwidth_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    max_storage_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    max_cpu_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    max_memory_mb_seconds: int = Field(sa_column=Column(BigInteger, nullable=False))
    overage_bandwidth_cost_per_gb_cents: int = Field(sa_column=Column(Integer, nullable=False))
    overage_storage_cost_per_gb_cents: int = Field(sa_column=Column(Integer, nullable=False))
    overage_cpu_cost_per_hour_cents: int = Field(sa_column=Column(Integer, nullable=False))
    overage_memory_cost_per_gb_hour_cents: int = Field(sa_column=Column(Integer, nullable=False))
    deactivated_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    """Set by an admin: no longer offered to new users; its users keep it (a plan in use is never deleted)."""
    created_at: datetime | None = Field(default=None, sa_column=_created())

    vps_configs: list["VpsConfig"] = Relationship(back_populates="plans", link_model=PlanVpsConfig)


class VpsConfig(SQLModel, table=True):
    __tablename__ = "vps_configs"
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    name: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    provider: str = Field(sa_column=Column(String(16), nullable=False))
    cpu_millicores: int = Field(sa_column=Column(Integer, nullable=False))
    memory_mb: int = Field(sa_column=Column(Integer, nullable=False))
    disk_gb: int = Field(sa_column=Column(Integer, nullable=False))
    image: str = Field(sa_column=Column(String(255), nullable=False))
    server_type: str | None = Field(default=None, sa_column=Column(String(64)))
    locations: list[str] = Field(default_factory=list, sa_column=Column(JSONB, nullable=False))
    deactivated_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    """Set by an admin: no new VPS uses it; existing VPSes keep it (a config in use is never deleted)."""
    created_at: datetime | None = Field(default=None, sa_column=_created())

    plans: list["Plan"] = Relationship(back_populates="vps_configs", link_model=PlanVpsConfig)


# --- Auth.js tables (pg-adapter shape) --------------------------------------------------------


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    name: str | None = Field(default=None, sa_column=Column(String(255)))
    email: str | None = Field(default=None, sa_column=Column(String(255), unique=True))
    email_verified: datetime | None = Field(default=None, sa_column=Column("emailVerified", DateTime(timezone=True)))
    image: str | None = Field(default=None, sa_column=Column(Text))
    # Slopbox's own columns; the adapter never writes them, so each has a server default.
    plan_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(UUID(as_uuid=True), ForeignKey("plans.id", ondelete="SET NULL"))
    )
    is_admin: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default="false"))
    usage_exempt: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default="false"))
    """Set by an admin: never stopped or cut off for usage (billing/overage.py)."""
    password_hash: str | None = Field(default=None, sa_column=Column(Text), repr=False)
    """argon2 hash written by the web app's sign-up (web/auth.py); NULL = no password sign-in."""
    created_at: datetime | None = Field(default=None, sa_column=_created())

    plan: Optional["Plan"] = Relationship()


class Account(SQLModel, table=True):
    __tablename__ = "accounts"
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column("userId", UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    )
    type: str = Field(sa_column=Column(String(255), nullable=False))
    provider: str = Field(sa_column=Column(String(255), nullable=False))
    provider_account_id: str = Field(sa_column=Column("providerAccountId", String(255), nullable=False))
    refresh_token: str | None = Field(default=None, sa_column=Column(Text))
    access_token: str | None = Field(default=None, sa_column=Column(Text))
    expires_at: int | None = Field(default=None, sa_column=Column(BigInteger))
    id_token: str | None = Field(default=None, sa_column=Column(Text))
    scope: str | None = Field(default=None, sa_column=Column(Text))
    session_state: str | None = Field(default=None, sa_column=Column(Text))
    token_type: str | None = Field(default=None, sa_column=Column(Text))


class AuthSession(SQLModel, table=True):
    __tablename__ = "sessions"
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column("userId", UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    )
    expires: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    session_token: str = Field(sa_column=Column("sessionToken", String(255), nullable=False, unique=True))


class VerificationToken(SQLModel, table=True):
    __tablename__ = "verification_token"
    identifier: str = Field(sa_column=Column(Text, primary_key=True))
    token: str = Field(sa_column=Column(Text, primary_key=True))
    expires: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


# --- agents and their VMs ----------------------------------------------------------------------


class Vps(SQLModel, table=True):
    __tablename__ = "vpses"
    __table_args__ = (UniqueConstraint("provider", "provider_ref", name="uq_vpses_provider_ref"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    vps_config_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("vps_configs.id", ondelete="RESTRICT"), nullable=False)
    )
    provider: str = Field(sa_column=Column(String(16), nullable=False))
    provider_ref: str | None = Field(default=None, sa_column=Column(String(255)))
    state: str = Field(default=VpsState.provisioning, sa_column=Column(String(16), nullable=False))
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    # What the provider last reported, kept apart from the lifecycle state; reconcile converges
    # `error` back to running/stopped from it. `needs_cleanup`: a VM may exist that must go.
    observed_state: str | None = Field(default=None, sa_column=Column(String(16)))
    observed_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    needs_cleanup: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default="false"))
    region: str | None = Field(default=None, sa_column=Column(String(64)))
    host: str | None = Field(default=None, sa_column=Column(String(255)))
    gateway_port: int | None = Field(default=None, sa_column=Column(Integer))
    # Control-plane device identities for this gateway (Ed25519 private keys) and the admin
    # identity's device token: admin for activities, relay for the proxy, never mixed.
    admin_device_key: str | None = Field(default=None, sa_column=Column(EncryptedText))
    admin_device_token: str | None = Field(default=None, sa_column=Column(EncryptedText))
    relay_device_key: str | None = Field(default=None, sa_column=Column(EncryptedText))
    # The relay identity's device token (relay scopes only): the proxy's Bearer on plain HTTP.
    relay_device_token: str | None = Field(default=None, sa_column=Column(EncryptedText))
    # Single-use bootstrap token: kept encrypted until redeemed (so a retried create hands the
    # same token to the VM it adopts), its SHA-256 for the lookup at redemption.
    bootstrap_token: str | None = Field(default=None, sa_column=Column(EncryptedText))
    bootstrap_token_sha256: str | None = Field(default=None, sa_column=Column(String(64), unique=True))
    bootstrap_expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    bootstrap_redeemed_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    ready_reported_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    # Where the control plane and the proxy reach the gateway (https:// on cloud VMs, plain loopback
    # http:// for local ones), and the SHA-256 of the certificate the VM reported at /bootstrap/ready:
    # every connection to a cloud VM trusts exactly that certificate. The proxy needs no provider.
    gateway_url: str | None = Field(default=None, sa_column=Column(String(255)))
    gateway_cert_sha256: str | None = Field(default=None, sa_column=Column(String(64)))
    applied_settings_version: int | None = Field(default=None, sa_column=Column(Integer))
    """The agent's `settings_version` the gateway last confirmed holding (None: never pushed)."""
    state_changed_at: datetime | None = Field(default=None, sa_column=_created())
    created_at: datetime | None = Field(default=None, sa_column=_created())
    destroyed_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))

    config: Optional["VpsConfig"] = Relationship()


class Agent(SQLModel, table=True):
    __tablename__ = "agents"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_agents_user_name"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    name: str = Field(sa_column=Column(String(64), nullable=False))
    gateway_token: str = Field(sa_column=Column(EncryptedText, nullable=False))
    gateway_token_last4: str = Field(sa_column=Column(String(4), nullable=False))
    vps_id: uuid.UUID | None = Field(
        default=None,
        sa_column=Column(UUID(as_uuid=True), ForeignKey("vpses.id", ondelete="SET NULL"), unique=True),
    )
    model: str | None = Field(default=None, sa_column=Column(String(128)))
    personality: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    )
    settings_version: int = Field(default=1, sa_column=Column(Integer, nullable=False, server_default="1"))
    """Bumped on every saved settings change; compared with `Vps.applied_settings_version`."""
    created_at: datetime | None = Field(default=None, sa_column=_created())
    updated_at: datetime | None = Field(default=None, sa_column=_created())

    vps: Optional["Vps"] = Relationship()
    channels: list["AgentChannel"] = Relationship(back_populates="agent", cascade_delete=True)


ACTIVE_OPERATION = ("queued", "running")
"""Statuses of an operation still in flight (see `workflows.contracts.OperationStatus`)."""


class VpsOperation(SQLModel, table=True):
    """One requested operation on a VPS and its outcome; the id is the Temporal workflow id."""

    __tablename__ = "vps_operations"
    __table_args__ = (UniqueConstraint("user_id", "idempotency_key", name="uq_vps_operations_user_idempotency_key"),)
    id: str = Field(sa_column=Column(String(255), primary_key=True))
    vps_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("vpses.id", ondelete="CASCADE"), nullable=False)
    )
    user_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    )
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    status: str = Field(default="queued",
                        sa_column=Column(String(16), nullable=False, server_default="queued"))
    step: str | None = Field(default=None, sa_column=Column(String(64)))
    error: str | None = Field(default=None, sa_column=Column(Text))
    detail: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    )
    idempotency_key: str | None = Field(default=None, sa_column=Column(String(255)))
    retrying: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB))
    """The last failed attempt of the step Temporal is retrying (activities/attempts.py); None if it has not failed."""
    created_at: datetime | None = Field(default=None, sa_column=_created())
    started_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    finished_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class AgentChannel(SQLModel, table=True):
    __tablename__ = "agent_channels"
    __table_args__ = (UniqueConstraint("agent_id", "kind", name="uq_agent_channels_agent_kind"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    agent_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("agents.id", ondelete="CASCADE"), nullable=False)
    )
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    # JSON of the channel's credentials (bot tokens...), encrypted as a whole.
    credentials: str | None = Field(default=None, sa_column=Column(EncryptedText))
    webhook_secret: str | None = Field(default=None, sa_column=Column(EncryptedText))
    status: str = Field(default="pending", sa_column=Column(String(32), nullable=False, server_default="pending"))
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    # WhatsApp pairing: the current QR (a short-lived secret) and a counter for long-polling.
    qr_data_url: str | None = Field(default=None, sa_column=Column(EncryptedText))
    qr_version: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    qr_expires_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    live_status: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB))
    created_at: datetime | None = Field(default=None, sa_column=_created())
    updated_at: datetime | None = Field(default=None, sa_column=_created())

    agent: Optional["Agent"] = Relationship(back_populates="channels")


# --- metering and budgets ---------------------------------------------------------------------


class VpsUsagePeriod(SQLModel, table=True):
    __tablename__ = "vps_usage_periods"
    __table_args__ = (UniqueConstraint("vps_id", "period_start", name="uq_vps_usage_periods_vps_month"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    vps_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("vpses.id", ondelete="CASCADE"), nullable=False)
    )
    period_start: date = Field(sa_column=Column(Date, nullable=False))
    bandwidth_in_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    bandwidth_out_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    cpu_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    memory_mb_seconds: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    storage_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    updated_at: datetime | None = Field(default=None, sa_column=_created())
    # Metering (0006). Billable bandwidth = max(proxy bytes, provider bytes) per direction: the
    # proxies add to bandwidth_*; the collector keeps the provider's own count and the top-up it
    # added on top of the proxies' count, so neither source is billed twice (README "Metering").
    provider_bandwidth_in_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False,
                                                                         server_default="0"))
    provider_bandwidth_out_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False,
                                                                          server_default="0"))
    provider_topup_in_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    provider_topup_out_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    # bandwidth_* already carried into the daily series (vps_usage_daily).
    daily_seen_in_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    daily_seen_out_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    frozen_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    """Set by CloseMonth: the month's statement was computed from this row."""


class VpsMeterState(SQLModel, table=True):
    """Per-VPS metering watermark: usage up to `collected_until` is in the counters, nothing after it.

    Written in the same transaction as the counters, by compare-and-set on the value read before
    the provider was asked: a retried, crashed or racing collection never counts a sample twice.
    """

    __tablename__ = "vps_meter_state"
    vps_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("vpses.id", ondelete="CASCADE"), primary_key=True)
    )
    collected_until: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    # Local VMs: the gateway process tree's cumulative CPU counter at `collected_until`.
    counter_ref: str | None = Field(default=None, sa_column=Column(String(64)))
    counter_cpu_ms: int | None = Field(default=None, sa_column=Column(BigInteger))
    stale: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default="false"))
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    last_attempt_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    updated_at: datetime | None = Field(default=None, sa_column=_created())


class VpsUsageDaily(SQLModel, table=True):
    """The month's usage per VPS per UTC day, for the dashboard chart (sums to the month's row)."""

    __tablename__ = "vps_usage_daily"
    vps_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("vpses.id", ondelete="CASCADE"), primary_key=True)
    )
    day: date = Field(sa_column=Column(Date, primary_key=True))
    bandwidth_in_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    bandwidth_out_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    cpu_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    memory_mb_seconds: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    storage_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


class MeteringMonth(SQLModel, table=True):
    """A calendar month CloseMonth has closed: later samples for it go to the next open month."""

    __tablename__ = "metering_months"
    period_start: date = Field(sa_column=Column(Date, primary_key=True))
    closed_at: datetime | None = Field(default=None, sa_column=_created())


class UsageStatement(SQLModel, table=True):
    """One user's usage and overage for a closed month (ready for a payment provider)."""

    __tablename__ = "usage_statements"
    __table_args__ = (UniqueConstraint("user_id", "period_start", name="uq_usage_statements_user_month"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    )
    period_start: date = Field(sa_column=Column(Date, nullable=False))
    plan_id: uuid.UUID | None = Field(default=None, sa_column=Column(UUID(as_uuid=True)))
    bandwidth_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    cpu_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    memory_mb_seconds: int = Field(sa_column=Column(BigInteger, nullable=False))
    storage_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    overage_cost_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    budget_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime | None = Field(default=None, sa_column=_created())


class OverageBudget(SQLModel, table=True):
    __tablename__ = "overage_budgets"
    __table_args__ = (UniqueConstraint("user_id", "period_start", name="uq_overage_budgets_user_month"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    )
    period_start: date = Field(sa_column=Column(Date, nullable=False))
    budget_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    revision: int = Field(default=1, sa_column=Column(BigInteger, nullable=False, server_default="1"))
    """Bumped on every change: an automatic stop belongs to one revision, so a raised budget starts afresh."""
    updated_at: datetime | None = Field(default=None, sa_column=_created())




# --- administration -------------------------------------------------------------------------------


class AdminAuditLog(SQLModel, table=True):
    """One admin action, written in the action's own transaction; never updated or deleted."""

    __tablename__ = "admin_audit_log"
    id: int | None = Field(default=None, sa_column=Column(BigInteger, Identity(always=True), primary_key=True))
    admin_user_id: uuid.UUID | None = Field(
        default=None, sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL"))
    )
    admin_email: str | None = Field(default=None, sa_column=Column(String(255)))
    """The admin's email when they acted: the row keeps saying who even after the account is gone."""
    action: str = Field(sa_column=Column(String(64), nullable=False))
    target_type: str = Field(sa_column=Column(String(32), nullable=False))
    target_id: str = Field(sa_column=Column(String(255), nullable=False))
    operation_id: str | None = Field(default=None, sa_column=Column(String(255)))
    """The submitted operation (workflow id) when the action was a VPS operation."""
    details: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    )
    created_at: datetime | None = Field(default=None, sa_column=_created())
# --- enforcement and notifications --------------------------------------------------------------


class UsageEnforcement(SQLModel, table=True):
    """What `EnforceUsage` decided for a user over their limits: one row per period and budget revision."""

    __tablename__ = "usage_enforcements"
    __table_args__ = (UniqueConstraint("user_id", "period_start", "budget_revision",
                                       name="uq_usage_enforcements_user_period_revision"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    )
    period_start: date = Field(sa_column=Column(Date, nullable=False))
    budget_revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    decision: str = Field(sa_column=Column(String(16), nullable=False))
    """`stop` (running VPSes stopped) or `exempt` (would have been, the user is exempt)."""
    reason: str = Field(sa_column=Column(Text, nullable=False))
    overage_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    budget_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    vps_ids: list[str] = Field(default_factory=list, sa_column=Column(
        JSONB, nullable=False, server_default=text("'[]'::jsonb")))
    """Every VPS a stop was submitted for under this revision (the stop's operation id is derived from it)."""
    created_at: datetime | None = Field(default=None, sa_column=_created())
    updated_at: datetime | None = Field(default=None, sa_column=_created())


class Notification(SQLModel, table=True):
    """A message to a user, shown by the API and emailed through the outbox columns."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("user_id", "dedupe_key", name="uq_notifications_user_dedupe_key"),)
    id: uuid.UUID | None = Field(default=None, sa_column=_uuid_pk())
    user_id: uuid.UUID = Field(
        sa_column=Column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    )
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    severity: str = Field(default="info", sa_column=Column(String(16), nullable=False, server_default="info"))
    title: str = Field(sa_column=Column(String(200), nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))
    data: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    )
    dedupe_key: str | None = Field(default=None, sa_column=Column(String(255)))
    """Unique per user: the same event (a threshold this period, one stop) is notified once."""
    read_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    email_status: str = Field(default="pending",
                              sa_column=Column(String(16), nullable=False, server_default="pending"))
    """Outbox: `pending` until sent (`sent`, with `emailed_at`) or given up on (`skipped`: no address or no SMTP)."""
    emailed_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    email_attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    email_error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime | None = Field(default=None, sa_column=_created())


