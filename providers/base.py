"""The one interface every VM provider implements, its models and its errors.

Activities call providers; providers never retry on their own. Instead every failure is raised as a
`ProviderError` whose `retryable` flag tells the Temporal activity whether to retry it with backoff
(429, 5xx, timeouts, locks, conflicts) or to fail fast with the provider's own message (invalid
input, quota, auth). Every method is idempotent: `create` adopts what an earlier attempt made
(deterministic names plus labels/metadata carrying the VPS id), `destroy` treats "gone" as done.

Every cloud provider method is single-shot: it submits its request(s) and returns once the provider
accepted them, a handful of short HTTP calls (each at most `MAX_REQUEST_TIMEOUT_S`), never waiting
for a VM to boot, stop or vanish. Waiting belongs to the caller, which polls `get` from a
heartbeating activity so that a dead worker is noticed and cancellation can arrive:

    after create / start:  poll `get` until RUNNING (ERROR = failed, None = gone)
    after stop:            poll `get` until STOPPED or ERROR (both mean "not running")
                           and call `force_stop` if a graceful stop takes too long
    after destroy:         poll `get` until `is_gone(info)` (None, or state DELETED)

A step that needs an earlier step to have finished is resumable instead of waiting: the retried
call adopts what exists and carries on, or raises a retryable error while the provider is busy.
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints

MANAGED_BY = "slopbox"
"""Value of the `managed-by` label (Hetzner) / `managed_by` metadata (Fly): marks what Slopbox made."""

GATEWAY_PORT = 18789
"""The OpenClaw gateway's default port on a cloud VM."""

MAX_REQUEST_TIMEOUT_S = 30.0
"""Upper bound for one provider HTTP call; longer waits are polls in the caller, with heartbeats."""

# Lower-case letters, digits and inner dashes: valid in a hostname, a Hetzner label value, a Fly
# app name and a folder name at once, so one id can be used everywhere without escaping.
VpsId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")]


class VmState(StrEnum):
    """Normalized VM state (providers.md §4.2)."""

    PROVISIONING = "provisioning"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    BUSY = "busy"
    DELETING = "deleting"
    DELETED = "deleted"
    ERROR = "error"
    UNKNOWN = "unknown"


class VmSpec(BaseModel):
    """What to create. Rendered elsewhere (config, cloud-init, files); passed through opaquely.

    `locations` is an ordered preference list (Hetzner locations or Fly regions); the next one is
    tried when the provider reports no capacity. Sizing fields are read by the provider that needs
    them: Hetzner uses `server_type`, Fly uses `cpu_kind`/`cpus`/`memory_mb` and `disk_gb` for the
    state volume, local uses none. `env` is plain configuration and may end up visible in provider
    metadata (Fly machine config); `secret_env` is only accepted by providers that keep it off the
    provider's API (local); cloud VMs fetch their secrets with a bootstrap token instead.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    vps_id: VpsId
    agent_id: str
    user_id: str
    locations: list[str] = Field(default_factory=list)
    server_type: str | None = None
    cpu_kind: Literal["shared", "performance"] = "shared"
    cpus: int = Field(default=1, ge=1)
    memory_mb: int = Field(default=1024, ge=256)
    disk_gb: int = Field(default=10, ge=1)
    image: str | None = None
    user_data: str | None = Field(default=None, repr=False)
    files: dict[str, str] = Field(default_factory=dict, repr=False)
    """Relative path (under the gateway's state folder) -> file content."""
    env: dict[str, str] = Field(default_factory=dict, repr=False)
    secret_env: dict[str, SecretStr] = Field(default_factory=dict)
    ssh_keys: list[str] = Field(default_factory=list)
    provider_config: dict[str, Any] = Field(default_factory=dict, repr=False)
    """Provider-specific rendered config (Fly: a machine config from openclaw.render) whose
    files/init/services/checks/env replace the provider's defaults; identity fields stay the provider's."""


class VmInfo(BaseModel):
    """What a provider knows about one VM right now."""

    model_config = ConfigDict(frozen=True)

    provider: str
    provider_ref: str
    """Opaque handle for get/start/stop/destroy; store it as soon as create returns."""
    vps_id: str | None
    state: VmState
    raw_state: str | None = None
    """The provider's own status string, for logs and debugging."""
    host: str | None = None
    gateway_port: int = GATEWAY_PORT
    location: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None
    detail: str | None = None
    """Why the VM is in this state, in words a user may read (e.g. "the gateway process exited")."""


# -- errors ------------------------------------------------------------------------------------


class ProviderError(Exception):
    """A provider call failed. `retryable` decides between backoff-and-retry and fail-fast.

    `message` is the provider's own text (safe to show: it never contains our tokens);
    `code` is the provider's error code (e.g. `rate_limit_exceeded`) or HTTP status;
    `retry_after_s` is set when the provider said how long to wait.
    """

    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        code: str | int | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.code = code
        self.status = status
        self.retry_after_s = retry_after_s
        self.retryable = self.default_retryable if retryable is None else retryable

    def __str__(self) -> str:
        parts = [p for p in (self.provider, str(self.code) if self.code is not None else "") if p]
        prefix = f"[{' '.join(parts)}] " if parts else ""
        return f"{prefix}{self.message}"


class ProviderRetryable(ProviderError):
    """Transient: rate limit, 5xx, timeout, locked resource, conflict. Retry with backoff."""

    default_retryable = True


class ProviderFatal(ProviderError):
    """Permanent: invalid input, auth, quota, not allowed. Retrying the same call will not help."""

    default_retryable = False


class VmNotFound(ProviderFatal):
    """start/stop on a VM the provider no longer has (get returns None for the same VM)."""


class CapacityUnavailable(ProviderError):
    """Every allowed location/region reported no capacity.

    Not retryable right away: capacity rarely returns within an activity's retry window. The
    workflow decides whether to wait longer or surface the error to the user.
    """

    default_retryable = False

    def __init__(self, message: str, *, tried: list[str] | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.tried = list(tried or [])


# -- the interface -----------------------------------------------------------------------------


class VmProvider(ABC):
    """A place to run one OpenClaw gateway per VPS. All methods are idempotent and single-shot."""

    kind: ClassVar[str]

    @abstractmethod
    async def create(self, spec: VmSpec) -> VmInfo:
        """Create the VM for `spec.vps_id`, or adopt the one an earlier attempt made.

        Returns as soon as the provider accepted the VM, typically PROVISIONING or STARTING; store
        `provider_ref` at once and poll `get` until RUNNING. An adopted VM that is powered off is
        sent a start (not awaited). A half-made VM (a step whose predecessor is still in progress)
        raises a retryable error; the retry resumes from what exists.
        """

    @abstractmethod
    async def get(self, ref: str) -> VmInfo | None:
        """Current state, one cheap read; None when the VM is gone (see `is_gone`).

        ERROR means the last create/start failed (the VM is not running); DELETING means a destroy
        is in progress; None (or DELETED) means the destroy has finished.
        """

    @abstractmethod
    async def start(self, ref: str) -> None:
        """Ask for the VM to power on; returns once accepted (poll `get` for RUNNING).

        No-op when running or already booting. Retryable error while the provider is busy with
        the VM (stopping, locked by another action). Raises VmNotFound when the VM is gone.
        """

    @abstractmethod
    async def stop(self, ref: str) -> None:
        """Ask for a graceful power off; returns once accepted (poll `get` for STOPPED).

        No-op when stopped or already stopping. Retryable error while the provider is busy with
        the VM. Raises VmNotFound when the VM is gone.
        """

    async def force_stop(self, ref: str) -> None:
        """Hard power off, for when a graceful `stop` did not finish in time; returns once accepted.

        No-op when stopped. Providers without a harder stop use `stop`.
        """
        await self.stop(ref)

    @abstractmethod
    async def destroy(self, ref: str) -> None:
        """Ask for the VM and what was made for it to be deleted; returns once accepted.

        Already gone or already being deleted = done. Poll `get` until `is_gone` to know the
        deletion finished.
        """

    @abstractmethod
    async def list_managed(self) -> list[VmInfo]:
        """Every VM Slopbox made (label/metadata scoped), for the reconciler."""

    @abstractmethod
    def gateway_url(self, info: VmInfo) -> str:
        """Base URL of the VM's gateway as the control plane reaches it (https on cloud VMs: TLS only, pinned)."""

    async def wait_until_running(self, ref: str, timeout_s: float = 120.0, poll_s: float = 2.0) -> VmInfo | None:
        """Poll `get` until running, gone, errored or `timeout_s`; returns the last info seen.

        A helper for tests and scripts; activities poll `get` themselves, heartbeating in between.
        """
        return await self._poll(ref, lambda i: i.state in (VmState.RUNNING, VmState.ERROR), timeout_s, poll_s)

    async def wait_until_gone(self, ref: str, timeout_s: float = 120.0, poll_s: float = 2.0) -> VmInfo | None:
        """Poll `get` until the VM is gone (returns None) or `timeout_s` (returns the last info seen).

        A helper for tests and scripts, like `wait_until_running`.
        """
        return await self._poll(ref, lambda i: False, timeout_s, poll_s)

    async def _poll(
        self, ref: str, done: Callable[[VmInfo], bool], timeout_s: float, poll_s: float
    ) -> VmInfo | None:
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.get(ref)
            if info is None or is_gone(info):
                return None
            if done(info) or time.monotonic() >= deadline:
                return info
            await asyncio.sleep(poll_s)

    async def aclose(self) -> None:
        """Release connections. Default: nothing to release."""
        return None


# -- helpers shared by the providers -------------------------------------------------------------


def is_gone(info: VmInfo | None) -> bool:
    """True when `get` says the VM no longer exists: a finished destroy (None or DELETED)."""
    return info is None or info.state == VmState.DELETED


def spec_labels(spec: VmSpec) -> dict[str, str]:
    """The identifying labels/metadata for a VM. Ids only: never a secret."""
    return {"managed-by": MANAGED_BY, "vps-id": spec.vps_id}


_SECRETISH = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)


def looks_secret(key: str) -> bool:
    """Heuristic guard used before writing env keys to provider-visible metadata."""
    return bool(_SECRETISH.search(key))
