"""Request and response bodies. Secrets never appear in a response model."""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StringConstraints, TypeAdapter

T = TypeVar("T")

MAX_BUDGET_CENTS = 10_000_000  # $100,000 a month: anything above is a typo, not a budget
PROBLEM_JSON = "application/problem+json"


# --- errors (RFC 9457) ----------------------------------------------------------------------------

class ProblemDetails(BaseModel):
    """Every error body. Some problems add members (e.g. `running_operation_id` on a 409)."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="A URI naming the kind of problem; about:blank for plain HTTP errors")
    title: str
    status: int
    detail: str = Field(description="What went wrong and what to do about it")
    instance: str | None = Field(default=None, description="The request path")


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, or `body`")
    message: str
    type: str


class ValidationProblem(ProblemDetails):
    errors: list[FieldError] = Field(description="The first errors (at most 20); the input is never echoed")
    errors_total: int = Field(description="How many errors the request had in all")


PROBLEM_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed",
    401: "Missing or invalid credentials",
    402: "Over the plan's limits and this month's overage budget; the body says which budget would do",
    403: "A plan limit forbids it",
    404: "No such resource (or it belongs to another user)",
    409: "Conflicts with the resource's current state or a running operation",
    413: "The request body is larger than MAX_REQUEST_BODY_BYTES",
    422: "The request does not validate; `errors` lists what is wrong",
    429: "Too many operations are queued on this VPS; retry after `Retry-After` seconds",
    500: "An unexpected error; it has been logged",
    503: "The database or the orchestrator is unreachable; nothing was changed, retry after `Retry-After` seconds",
}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying", "required": True,
                                      "schema": {"type": "integer", "minimum": 1}}}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for problem answers (app.py moves them to the application/problem+json type)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ValidationProblem if status == 422 else ProblemDetails,
                                 "description": PROBLEM_DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = RETRY_AFTER_HEADER
        out[status] = entry
    return out


# Every authenticated route (413: a declared Content-Length over the limit is refused on any route).
COMMON_PROBLEMS = problem_responses(401, 413, 422, 500, 503)


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
    usage_exempt: bool = Field(default=False, description="An admin exempted the user from usage enforcement")
    plan: PlanOut


def _integral(value: object) -> object:
    """JSON has one number type: 500.0 is the integer 500 (JSON Schema agrees), "500" and 5.5 are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class OverageBudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget_cents: Annotated[StrictInt, Field(ge=0, le=MAX_BUDGET_CENTS, description="Monthly overage cap in US cents"),
                            BeforeValidator(_integral)]


class PlanChoiceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan_id: uuid.UUID = Field(description="One of the plans GET /plans lists")
    accept_overage_stop: bool = Field(
        default=False, description="Move even though this month's usage is over the new plan and the overage "
        "budget: enforcement then stops the user's VMs at its next check")


class OverageBudgetOut(BaseModel):
    budget_cents: int
    period_start: date
    currency: str = "USD"


# No control characters, and at least one character that is not whitespace (the name is stripped,
# so "   " would be empty: the pattern says so, rather than the schema accepting it and the API refusing).
AgentName = Annotated[str, StringConstraints(
    strip_whitespace=True, min_length=1, max_length=64,
    pattern=r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
            r"[^\x00-\x1f\x7f]*$")]
ModelId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=128,
                                           pattern=r"^[a-z0-9][a-z0-9._-]*/[A-Za-z0-9._:-]+$")]


class AgentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: AgentName
    model: ModelId | None = None


class RetryingOut(BaseModel):
    """A step whose attempt failed and that is being tried again: the operation is still running."""

    step: str
    attempt: int = Field(description="The number of the attempt that failed (1 = the first)")
    error: str = Field(description="Why that attempt failed")
    failed_at: datetime
    next_attempt_at: datetime = Field(description="When the next attempt starts (now or past: it is running)")


class CancelOut(BaseModel):
    operation_id: str
    status: str = Field(description="`cancelled` (it was queued and never runs) or `cancelling` (it stops at its "
                                    "current step and records `cancelled`)")
    status_url: str


class OperationOut(BaseModel):
    id: str
    operation: str = Field(description="The workflow type, e.g. StartVps")
    kind: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    step: str | None
    error: str | None = Field(description="Why it failed (or a note on a success)")
    detail: dict[str, Any]
    retrying: RetryingOut | None = Field(
        default=None, description="While running: the current step's last failed attempt, retried automatically")
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


# --- operations and their resources ---------------------------------------------------------------

class OperationAccepted(BaseModel):
    """A lifecycle or agent operation was started (or is the one already running for this request)."""

    operation_id: str = Field(description="The workflow id; the VPS's `operation_id` while it is queued or runs")
    operation: str = Field(description="The workflow type, e.g. ProvisionVps")
    vps_id: uuid.UUID
    status: str = Field(description="queued, running, succeeded, failed or cancelled (a replayed request "
                        "answers with the original operation's status)")
    status_url: str = Field(description="GET it to follow the operation: status, step, error")


class PairingCancelling(BaseModel):
    """A WhatsApp pairing in progress is being cancelled instead of a channel being removed."""

    operation_id: str
    operation: Literal["ConnectChannel"]
    status: Literal["cancelling"]


class VpsDestroyed(BaseModel):
    """DELETE on a VPS that is already destroyed: nothing to do."""

    vps_id: uuid.UUID
    state: Literal["destroyed"]
    operation_id: None


class SettingsSaved(BaseModel):
    """Settings saved while the agent is not running (pushed when it next starts), or a save that changed
    nothing (`unchanged`: no new version, no push while the gateway already holds them)."""

    saved: bool
    applied: str
    settings_version: int
    unchanged: bool = False
    """True when the request changed nothing (no new version, nothing pushed)."""


class AgentSettingsOut(BaseModel):
    """What a settings editor prefills: the personality files as saved, and the model."""

    files: dict[str, str] = Field(description="AGENTS.md, SOUL.md and IDENTITY.md as saved (\"\" when never set)")
    model: str | None = Field(description="The agent's model; null means the default below")
    default_model: str = Field(description="The model an agent without one runs")
    settings_version: int


class ChannelOut(BaseModel):
    kind: str
    status: str
    last_error: str | None
    credentials: dict[str, str] = Field(description="Masked: the last 4 characters of each value")
    live_status: dict[str, Any] | None = Field(description="What the gateway last reported for this channel")
    updated_at: datetime | None


class ChannelList(BaseModel):
    items: list[ChannelOut]


class WhatsAppQr(BaseModel):
    status: str = Field(description="awaiting_scan while a QR is shown; connected, failed, cancelled... at the end")
    qr_data_url: str | None = Field(description="data:image/png;base64,... to show the user, while awaiting_scan")
    version: int = Field(description="Bumped on each new QR; pass it as `after` to long-poll for the next")
    expires_at: datetime | None
    last_error: str | None


class BootstrapSecrets(BaseModel):
    env: dict[str, str] = Field(description="The gateway's environment (tokens, LLM keys)")
    pair_public_keys: list[str] = Field(description="Device public keys the gateway must pre-pair")


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description="`ok` or `unreachable: <error type>` per dependency")


# --- request schemas the route models cannot express (cross-field rules checked in validators) -------

def _string_schema(annotation: Any) -> dict[str, Any]:
    return TypeAdapter(annotation).json_schema()


def request_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra=` that documents a JSON body as `schema` in place of the model's own (see app.py)."""
    return {"requestBody": {"content": {"application/json": {"schema": {**schema, "x-replaces-model": True}}}}}


def settings_request(file_names: tuple[str, ...], max_file_chars: int) -> dict[str, Any]:
    """PATCH settings: known file names only, no NUL, and at least one of `files` / `model`."""
    file_text = {"type": "string", "maxLength": max_file_chars, "pattern": "^[^\\x00]*$"}
    files = {"type": "object", "properties": dict.fromkeys(file_names, file_text), "additionalProperties": False}
    model = _string_schema(ModelId)
    return request_schema({
        "type": "object", "additionalProperties": False,
        "properties": {"files": {"anyOf": [files, {"type": "null"}]}, "model": {"anyOf": [model, {"type": "null"}]}},
        "anyOf": [{"required": ["files"], "properties": {"files": files}},
                  {"required": ["model"], "properties": {"model": model}}],
    })


def channel_request(formats: dict[str, dict[str, tuple[re.Pattern[str], str]]]) -> dict[str, Any]:
    """POST channels: one shape per kind, with each credential's format (`formats` is the route's table)."""
    variants = []
    for kind, fields in formats.items():
        credentials = {"type": "object", "additionalProperties": False, "required": list(fields),
                       "properties": {name: {"type": "string", "pattern": pattern.pattern, "description": hint}
                                      for name, (pattern, hint) in fields.items()}}
        variants.append({"type": "object", "additionalProperties": False,
                         "required": ["kind", "credentials"] if fields else ["kind"],
                         "properties": {"kind": {"const": kind}, "credentials": credentials}})
    return request_schema({"oneOf": variants})


# --- admin API (api/routes/admin.py) -------------------------------------------------------------------

ADMIN_PROBLEMS: dict[int | str, dict[str, Any]] = {
    403: {"model": ProblemDetails, "description": "The user named by X-User-Id is not an admin"}}
INT32_MAX = 2**31 - 1
JSON_INT_MAX = 2**53  # the largest integer every JSON client reads exactly (bigint columns hold more)

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
DisplayName = Annotated[str, StringConstraints(
    strip_whitespace=True, min_length=1, max_length=128,
    pattern=r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
            r"[^\x00-\x1f\x7f]*$")]
ImageRef = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,255}$")]
ServerType = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Location = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
Int32 = Annotated[StrictInt, Field(ge=0, le=INT32_MAX), BeforeValidator(_integral)]
Int64 = Annotated[StrictInt, Field(ge=0, le=JSON_INT_MAX), BeforeValidator(_integral)]
Positive32 = Annotated[StrictInt, Field(ge=1, le=INT32_MAX), BeforeValidator(_integral)]
ProviderName = Literal["hetzner", "fly", "local"]
VpsStateName = Literal["provisioning", "running", "stopped", "destroyed", "error"]


class UsageTotals(BaseModel):
    """Usage counters (vps_usage_periods) summed over some VPSes for one calendar month (UTC)."""

    bandwidth_in_bytes: int
    bandwidth_out_bytes: int
    cpu_ms: int
    memory_mb_seconds: int
    storage_bytes: int


class PlanRef(BaseModel):
    id: uuid.UUID
    name: str
    display_name: str
    active: bool


class AdminUserOut(BaseModel):
    id: uuid.UUID
    email: str | None
    name: str | None
    is_admin: bool
    usage_exempt: bool = Field(description="Overage enforcement never stops this user's VPSes")
    plan: PlanRef = Field(description="The plan that governs the user (the default plan when none is assigned)")
    plan_assigned: bool = Field(description="False: no plan of their own, the default plan applies")
    agent_count: int
    vps_count: int = Field(description="VPSes that may own a VM (every state but destroyed)")
    period_start: date
    usage: UsageTotals = Field(description="This calendar month (UTC), summed over the user's VPSes")
    created_at: datetime | None


class UsageExemptIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exempt: bool = Field(strict=True)


class UserPlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan_id: uuid.UUID


class AdminVpsOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    user_email: str | None
    agent_id: uuid.UUID | None = Field(description="The agent the VPS belongs to (null for a replaced, destroyed VPS)")
    provider: str
    state: str
    vps_config_id: uuid.UUID
    vps_config_name: str
    region: str | None
    observed_state: str | None
    needs_cleanup: bool
    last_error: str | None
    operation_id: str | None = Field(description="The oldest operation queued or running on this VPS")
    created_at: datetime | None
    state_changed_at: datetime | None
    destroyed_at: datetime | None


class AdminOperationAccepted(BaseModel):
    """A force stop or destroy was submitted to the VPS's entity workflow on the owner's behalf."""

    operation_id: str
    operation: str = Field(description="The workflow type, e.g. StopVps")
    vps_id: uuid.UUID
    status: str
    status_url: str = Field(description="GET it (as an admin) to follow the operation")
    audit_id: int = Field(description="The audit log entry recording this action")


class PlanIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Slug
    display_name: DisplayName
    is_default: bool = Field(default=False, strict=True,
                             description="Make this the default plan (the previous default stops being it)")
    price_cents_per_month: Int32
    max_agents: Int32
    max_vpses: Int32
    max_bandwidth_bytes: Int64
    max_storage_bytes: Int64
    max_cpu_ms: Int64
    max_memory_mb_seconds: Int64
    overage_bandwidth_cost_per_gb_cents: Int32
    overage_storage_cost_per_gb_cents: Int32
    overage_cpu_cost_per_hour_cents: Int32
    overage_memory_cost_per_gb_hour_cents: Int32
    vps_config_ids: list[uuid.UUID] = Field(default_factory=list, max_length=100,
                                            description="The VPS configs the plan allows")


class PlanPatch(BaseModel):
    """Only the fields given change; null leaves a field as it is."""

    model_config = ConfigDict(extra="forbid")
    display_name: DisplayName | None = None
    is_default: Annotated[bool, Field(strict=True)] | None = Field(
        default=None, description="true makes this the default plan; false is refused on the default plan "
                                  "(make another plan the default instead)")
    active: Annotated[bool, Field(strict=True)] | None = Field(
        default=None, description="false deactivates: not offered to new users; users on it keep it")
    price_cents_per_month: Int32 | None = None
    max_agents: Int32 | None = None
    max_vpses: Int32 | None = None
    max_bandwidth_bytes: Int64 | None = None
    max_storage_bytes: Int64 | None = None
    max_cpu_ms: Int64 | None = None
    max_memory_mb_seconds: Int64 | None = None
    overage_bandwidth_cost_per_gb_cents: Int32 | None = None
    overage_storage_cost_per_gb_cents: Int32 | None = None
    overage_cpu_cost_per_hour_cents: Int32 | None = None
    overage_memory_cost_per_gb_hour_cents: Int32 | None = None
    vps_config_ids: Annotated[list[uuid.UUID], Field(max_length=100)] | None = Field(
        default=None, description="Replaces the set of VPS configs the plan allows")


class AdminVpsConfigOut(BaseModel):
    id: uuid.UUID
    name: str
    provider: str
    cpu_millicores: int
    memory_mb: int
    disk_gb: int
    image: str
    server_type: str | None
    locations: list[str]
    active: bool
    deactivated_at: datetime | None
    vps_count: int = Field(description="VPSes using it that may own a VM (every state but destroyed)")
    plan_ids: list[uuid.UUID]
    created_at: datetime | None


class AdminPlanOut(BaseModel):
    id: uuid.UUID
    name: str
    display_name: str
    is_default: bool
    active: bool
    deactivated_at: datetime | None
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
    vps_config_ids: list[uuid.UUID] = Field(description="Every config the plan allows, active or not, any provider")
    user_count: int = Field(description="Users assigned this plan (users without a plan are on the default)")
    created_at: datetime | None


class VpsConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Slug
    provider: ProviderName
    cpu_millicores: Positive32
    memory_mb: Positive32
    disk_gb: Positive32
    image: ImageRef
    server_type: ServerType | None = None
    locations: list[Location] = Field(min_length=1, max_length=50)


class VpsConfigPatch(BaseModel):
    """Only the fields given change; null leaves a field as it is. Sizes of a config in use cannot change."""

    model_config = ConfigDict(extra="forbid")
    cpu_millicores: Positive32 | None = None
    memory_mb: Positive32 | None = None
    disk_gb: Positive32 | None = None
    image: ImageRef | None = Field(default=None, description="Used by VPSes created from now on")
    server_type: ServerType | None = None
    locations: Annotated[list[Location], Field(min_length=1, max_length=50)] | None = None
    active: Annotated[bool, Field(strict=True)] | None = Field(
        default=None, description="false deactivates: no new VPS uses it; existing VPSes keep it")


class ProviderUsage(BaseModel):
    provider: str
    vpses: int = Field(description="VPSes with a usage row this month")
    usage: UsageTotals


class AggregateUsageOut(BaseModel):
    period_start: date
    users: int = Field(description="Users with at least one VPS with usage this month")
    vpses: int = Field(description="VPSes with a usage row this month")
    usage: UsageTotals
    by_provider: list[ProviderUsage]


class AuditEntryOut(BaseModel):
    id: int
    admin_user_id: uuid.UUID | None = Field(description="Null once the admin's account is deleted")
    admin_email: str | None = Field(description="The admin's email when they acted")
    action: str = Field(description="e.g. vps.stop, vps.destroy, plan.create, plan.update, plan.delete, "
                                    "vps_config.create, user.usage_exempt, user.plan")
    target_type: str = Field(description="user, vps, plan or vps_config")
    target_id: str
    operation_id: str | None = Field(description="The submitted operation, for VPS actions")
    details: dict[str, Any]
    created_at: datetime
# --- notifications ------------------------------------------------------------------------------------

class NotificationOut(BaseModel):
    id: uuid.UUID
    kind: str = Field(description="usage_warning, overage_stop, collection_failed, provider_outage, admin_alert, info")
    severity: Literal["info", "warning", "critical"]
    title: str
    body: str
    data: dict[str, Any]
    created_at: datetime
    read_at: datetime | None
    emailed_at: datetime | None = Field(description="When the email went out; null while pending or when not emailed")


class NotificationPage(BaseModel):
    items: list[NotificationOut] = Field(description="Newest first")
    unread_count: int = Field(description="Unread notifications in all (not only on this page)")
    total: int
    limit: int
    offset: int


class NotificationsMarked(BaseModel):
    marked: int = Field(description="How many were unread and are now read")
    unread_count: int


# --- usage (GET /agents/{id}/usage) ---------------------------------------------------------------

class ResourceUsage(BaseModel):
    used: int = Field(description="This month so far, summed over all of the user's VPSes")
    limit: int = Field(description="The plan's monthly limit")
    projected: int = Field(description="`used` extrapolated linearly to the end of the month")
    over_limit: bool
    agent_used: int = Field(description="This agent's VPS's share of `used`")
    used_in: int | None = Field(default=None, description="Bandwidth only: the inbound part of `used`")
    used_out: int | None = Field(default=None, description="Bandwidth only: the outbound part of `used`")


class UsageResources(BaseModel):
    bandwidth_bytes: ResourceUsage = Field(description="In + out: max(proxy bytes, provider bytes) per VPS")
    cpu_ms: ResourceUsage
    memory_mb_seconds: ResourceUsage
    storage_bytes: ResourceUsage = Field(description="Disk allocation accrued for the time each VPS exists")


class UsageDay(BaseModel):
    day: date
    bandwidth_bytes: int
    bandwidth_in_bytes: int = Field(description="To the agent's VPS (bandwidth_bytes is in + out)")
    bandwidth_out_bytes: int = Field(description="From the agent's VPS")
    cpu_ms: int
    memory_mb_seconds: int
    storage_bytes: int


class UsageOut(BaseModel):
    period_start: date
    period_end: date = Field(description="Exclusive: the first day of the next month")
    as_of: datetime
    collected_until: datetime | None = Field(description="Usage of every VPS is counted at least up to here")
    stale: bool = Field(description="Some provider data lagged and was used as far as it went")
    resources: UsageResources
    overage_cost_cents: int = Field(description="Overage so far, integer cents, rounded up once")
    projected_overage_cost_cents: int
    budget_cents: int
    currency: str = "USD"
    daily: list[UsageDay] = Field(description="The month per UTC day, over all of the user's VPSes")
