"""Hetzner Cloud provider, through hcloud-python (sync; every call runs in a worker thread).

Idempotency rests on the deterministic server name `slopbox-vps-<vps_id>` plus the labels
`managed-by=slopbox` and `vps-id=<vps_id>`: `create` first looks the name up and adopts a server
whose labels match; a create that hits `uniqueness_error` (an earlier attempt's request did reach
Hetzner) adopts the same way. The firewall `slopbox-gateway` lets TCP 18789 in from the control
plane only and is attached in the create call, so the gateway is never exposed, not even at boot.

hcloud's own retry loop is switched off by default (`client_retries=0`): Temporal activities do
the retrying, with backoff, based on the `ProviderError.retryable` flag set here. Waiting for
actions is done here too (async sleeps, bounded), so no worker thread is held while a VM boots.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import requests
from hcloud import APIException, Client, exponential_backoff_function
from hcloud.actions import BoundAction
from hcloud.firewalls import Firewall, FirewallRule
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer
from hcloud.ssh_keys import SSHKey

from providers.base import (
    GATEWAY_PORT,
    MANAGED_BY,
    CapacityUnavailable,
    ProviderError,
    ProviderFatal,
    ProviderRetryable,
    VmInfo,
    VmNotFound,
    VmProvider,
    VmSpec,
    VmState,
    spec_labels,
)

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

FIREWALL_NAME = "slopbox-gateway"
USER_DATA_LIMIT = 32 * 1024

_STATES = {
    "initializing": VmState.PROVISIONING,
    "starting": VmState.STARTING,
    "running": VmState.RUNNING,
    "stopping": VmState.STOPPING,
    "off": VmState.STOPPED,
    "deleting": VmState.DELETING,
    "migrating": VmState.BUSY,
    "rebuilding": VmState.BUSY,
    "unknown": VmState.UNKNOWN,
}

# Error codes (providers.md §1.6). Anything not listed as retryable or capacity is fatal.
_RETRYABLE_CODES = {
    "rate_limit_exceeded",
    "conflict",
    "locked",
    "timeout",
    "server_error",
    "unavailable",
    "bad_gateway",
    "maintenance",
    "service_error",
}
_CAPACITY_CODES = {"resource_unavailable", "placement_error"}


class ActionFailed(ProviderRetryable):
    """A Hetzner action (create_server, start_server, ...) finished with status `error`."""


def server_name(vps_id: str) -> str:
    return f"slopbox-vps-{vps_id}"


def _details_text(details: Any) -> str:
    """Turn `invalid_input` field details into readable text for the user-facing message."""
    if not isinstance(details, dict):
        return ""
    parts = []
    for f in details.get("fields") or []:
        msgs = "; ".join(f.get("messages") or [])
        parts.append(f"{f.get('name')}: {msgs}" if msgs else str(f.get("name")))
    for lim in details.get("limits") or []:
        parts.append(f"limit {lim.get('name')}")
    return ", ".join(parts)


class HetznerProvider(VmProvider):
    """One Hetzner Cloud project. `ref` is the server id as a string."""

    kind = "hetzner"

    def __init__(
        self,
        token: str,
        *,
        control_plane_ips: list[str],
        api_endpoint: str = "https://api.hetzner.cloud/v1",
        default_locations: tuple[str, ...] = ("fsn1", "nbg1", "hel1"),
        default_server_type: str = "cx23",
        default_image: str = "ubuntu-24.04",
        firewall_name: str = FIREWALL_NAME,
        gateway_port: int = GATEWAY_PORT,
        gateway_scheme: str = "http",
        poll_interval_s: float = 1.0,
        poll_max_interval_s: float = 10.0,
        boot_timeout_s: float = 180.0,
        stop_timeout_s: float = 60.0,
        destroy_timeout_s: float = 60.0,
        request_timeout_s: float = 30.0,
        client_retries: int = 0,
        client_retry_base_s: float = 1.0,
    ) -> None:
        if not token:
            raise ProviderFatal("HCLOUD_TOKEN is not set", provider=self.kind)
        self._client = Client(
            token=token,
            api_endpoint=api_endpoint.rstrip("/"),
            application_name="slopbox",
            poll_interval=poll_interval_s,
            timeout=request_timeout_s,
        )
        # Private knobs of hcloud 2.x (providers.md §1.1): retries belong to Temporal, not here.
        base = self._client._client
        base._retry_max_retries = client_retries
        base._retry_interval_func = exponential_backoff_function(
            base=client_retry_base_s, multiplier=2, cap=60.0, jitter=True
        )
        self._tls = threading.local()
        session = getattr(base, "_session", None)
        if session is not None:
            session.hooks.setdefault("response", []).append(self._remember_headers)
        self.control_plane_cidrs = self._cidrs(control_plane_ips)
        self.default_locations = tuple(default_locations)
        self.default_server_type = default_server_type
        self.default_image = default_image
        self.firewall_name = firewall_name
        self.gateway_port = gateway_port
        self.gateway_scheme = gateway_scheme
        self.poll_interval_s = poll_interval_s
        self.poll_max_interval_s = poll_max_interval_s
        self.boot_timeout_s = boot_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.destroy_timeout_s = destroy_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> HetznerProvider:
        token = settings.hcloud_token.get_secret_value() if settings.hcloud_token else ""
        kwargs: dict[str, Any] = {
            "api_endpoint": settings.hcloud_api_endpoint,
            "control_plane_ips": list(settings.control_plane_ips),
        }
        kwargs.update(overrides)
        return cls(token, **kwargs)

    @classmethod
    def _cidrs(cls, ips: list[str]) -> list[str]:
        out = []
        for ip in ips:
            try:
                out.append(str(ipaddress.ip_network(ip.strip(), strict=False)))
            except ValueError:
                raise ProviderFatal(
                    f"CONTROL_PLANE_IPS: {ip!r} is not an IP address or CIDR", provider=cls.kind
                ) from None
        return out

    # -- error handling ----------------------------------------------------------------------------

    def _remember_headers(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """requests response hook: keep the last headers of this thread for `retry_after_s`."""
        self._tls.headers = response.headers

    def _retry_after(self) -> float | None:
        headers = getattr(self._tls, "headers", None)
        if not headers:
            return None
        if (value := headers.get("Retry-After")) is not None:
            try:
                return max(0.0, float(value))
            except ValueError:
                pass
        reset = headers.get("RateLimit-Reset")
        if reset is None:
            return None
        try:
            # Reset is when the bucket is full again; it refills 1/s, so cap the wait at a minute.
            return min(60.0, max(1.0, float(reset) - time.time()))
        except ValueError:
            return None

    def _translate(self, exc: Exception) -> ProviderError:
        """Classify an hcloud/requests failure as retryable or fatal (runs in the calling thread)."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, APIException):
            code = exc.code
            extra = _details_text(exc.details)
            message = f"{exc.message} ({extra})" if extra else str(exc.message)
            kw: dict[str, Any] = {"provider": self.kind, "code": code}
            if isinstance(code, int):
                kw["status"] = code
                if code == 429:
                    return ProviderRetryable(message, retry_after_s=self._retry_after(), **kw)
                if code == 404:
                    return VmNotFound(message, **kw)
                if code == 408 or code >= 500:
                    return ProviderRetryable(message, **kw)
                return ProviderFatal(message, **kw)
            if code == "rate_limit_exceeded":
                return ProviderRetryable(message, retry_after_s=self._retry_after(), **kw)
            if code in _RETRYABLE_CODES:
                return ProviderRetryable(message, **kw)
            if code in _CAPACITY_CODES:
                # Outside create (where locations are walked) this is a transient refusal.
                return ProviderRetryable(message, **kw)
            if code == "not_found":
                return VmNotFound(message, **kw)
            return ProviderFatal(message, **kw)
        if isinstance(exc, requests.exceptions.Timeout):
            return ProviderRetryable("timed out talking to the Hetzner API", provider=self.kind, code="timeout")
        if isinstance(exc, requests.exceptions.ConnectionError):
            return ProviderRetryable(
                "could not connect to the Hetzner API", provider=self.kind, code="connection_error"
            )
        if isinstance(exc, requests.exceptions.RequestException):
            return ProviderRetryable(f"HTTP error: {type(exc).__name__}", provider=self.kind)
        raise exc

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking hcloud call in a thread, translating its errors in that thread."""

        def run() -> T:
            try:
                return fn(*args, **kwargs)
            except (APIException, requests.exceptions.RequestException) as exc:
                raise self._translate(exc) from exc

        return await asyncio.to_thread(run)

    # -- reading -------------------------------------------------------------------------------------

    def _info(self, server: BoundServer) -> VmInfo:
        status = server.status or "unknown"
        state = _STATES.get(status, VmState.UNKNOWN)
        if state == VmState.RUNNING and server.locked:
            state = VmState.BUSY
        host = None
        pn = server.public_net
        if pn is not None and not isinstance(pn, dict):
            if pn.ipv4 is not None and pn.ipv4.ip:
                host = pn.ipv4.ip
            elif pn.ipv6 is not None and pn.ipv6.ip:
                net = ipaddress.ip_network(pn.ipv6.ip, strict=False)
                host = str(net.network_address + 1)
        labels = dict(server.labels or {})
        location = server.location.name if server.location is not None else None
        created = server.created if isinstance(server.created, datetime) else None
        return VmInfo(
            provider=self.kind,
            provider_ref=str(server.id),
            vps_id=labels.get("vps-id"),
            state=state,
            raw_state=status,
            host=host,
            gateway_port=self.gateway_port,
            location=location,
            labels=labels,
            created_at=created,
        )

    @staticmethod
    def _server_id(ref: str) -> int:
        try:
            return int(ref)
        except (TypeError, ValueError):
            raise ProviderFatal(f"not a Hetzner server id: {ref!r}", provider="hetzner") from None

    def _get_sync(self, server_id: int) -> BoundServer | None:
        try:
            return self._client.servers.get_by_id(server_id)
        except APIException as exc:
            if exc.code == "not_found" or exc.code == 404:
                return None
            raise

    async def _get_server(self, ref: str) -> BoundServer | None:
        return await self._call(self._get_sync, self._server_id(ref))

    async def get(self, ref: str) -> VmInfo | None:
        server = await self._get_server(ref)
        return self._info(server) if server is not None else None

    async def list_managed(self) -> list[VmInfo]:
        servers = await self._call(self._client.servers.get_all, label_selector=f"managed-by={MANAGED_BY}")
        return [self._info(s) for s in servers if (s.labels or {}).get("vps-id")]

    def gateway_url(self, info: VmInfo) -> str:
        if not info.host:
            raise ProviderRetryable("the server has no public address yet", provider=self.kind)
        host = f"[{info.host}]" if ":" in info.host else info.host
        return f"{self.gateway_scheme}://{host}:{info.gateway_port}"

    # -- waiting -------------------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return min(self.poll_max_interval_s, self.poll_interval_s * (1.5**attempt))

    async def _wait_actions(self, actions: list[BoundAction], timeout_s: float) -> bool:
        """Wait until every action left `running`. True when all succeeded, False on timeout.

        Raises ActionFailed (retryable) naming the action when one ended in `error`.
        """
        deadline = time.monotonic() + timeout_s
        attempt = 0
        pending = [a for a in actions if a.status == "running"]
        self._raise_failed(actions)
        while pending:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            fresh = [await self._call(self._client.actions.get_by_id, a.id) for a in pending]
            self._raise_failed(fresh)
            pending = [a for a in fresh if a.status == "running"]
        return True

    def _raise_failed(self, actions: list[BoundAction]) -> None:
        for a in actions:
            if a.status == "error":
                err = a.error or {}
                raise ActionFailed(
                    f"{a.command} ended in error: {err.get('message', 'unknown error')}",
                    provider=self.kind,
                    code=err.get("code", "action_failed"),
                )

    async def _wait_status(self, ref: str, wanted: set[str], timeout_s: float) -> BoundServer | None:
        """Poll the server until its status is in `wanted`, it is gone (None) or `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            server = await self._get_server(ref)
            if server is None or server.status in wanted or time.monotonic() >= deadline:
                return server
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    # -- firewall ------------------------------------------------------------------------------------

    def _rules(self) -> list[FirewallRule]:
        return [
            FirewallRule(
                direction=FirewallRule.DIRECTION_IN,
                protocol=FirewallRule.PROTOCOL_TCP,
                port=str(self.gateway_port),
                source_ips=list(self.control_plane_cidrs),
                description="openclaw gateway from the slopbox control plane",
            )
        ]

    @staticmethod
    def _rule_key(rules: list[FirewallRule] | None) -> set[tuple[Any, ...]]:
        return {
            (r.direction, r.protocol, r.port, tuple(sorted(r.source_ips or [])), tuple(sorted(r.destination_ips or [])))
            for r in rules or []
        }

    def _ensure_firewall_sync(self) -> int:
        """Find or create the shared gateway firewall and make its rules match the settings."""
        fw = self._client.firewalls.get_by_name(self.firewall_name)
        if fw is None:
            try:
                created = self._client.firewalls.create(
                    name=self.firewall_name, rules=self._rules(), labels={"managed-by": MANAGED_BY}
                )
                return int(created.firewall.id)
            except APIException as exc:
                if exc.code != "uniqueness_error":
                    raise
                fw = self._client.firewalls.get_by_name(self.firewall_name)
                if fw is None:
                    raise
        if self._rule_key(fw.rules) != self._rule_key(self._rules()):
            log.info("updating firewall %s rules to the current control plane IPs", self.firewall_name)
            self._client.firewalls.set_rules(fw, self._rules())
        return int(fw.id)

    # -- lifecycle -------------------------------------------------------------------------------------

    def _check_ours(self, server: BoundServer, vps_id: str) -> None:
        labels = server.labels or {}
        if labels.get("managed-by") != MANAGED_BY or labels.get("vps-id") != vps_id:
            raise ProviderFatal(
                f"a server named {server.name} exists but is not labelled for VPS {vps_id}; refusing to adopt it",
                provider=self.kind,
                code="name_taken",
            )

    def _create_sync(self, spec: VmSpec, name: str, location: str, firewall_id: int) -> tuple[str, Any]:
        """One create attempt in one location: ("created", response) | ("capacity", msg) | ("taken", None)."""
        try:
            resp = self._client.servers.create(
                name=name,
                server_type=ServerType(name=spec.server_type or self.default_server_type),
                image=Image(name=spec.image or self.default_image),
                location=Location(name=location),
                ssh_keys=[SSHKey(name=k) for k in spec.ssh_keys] or None,
                firewalls=[Firewall(id=firewall_id)],
                user_data=spec.user_data,
                labels=spec_labels(spec),
                start_after_create=True,
            )
        except APIException as exc:
            if exc.code in _CAPACITY_CODES:
                return "capacity", f"{location}: {exc.message}"
            if exc.code == "uniqueness_error":
                return "taken", None
            raise
        return "created", resp

    async def create(self, spec: VmSpec) -> VmInfo:
        if not self.control_plane_cidrs:
            raise ProviderFatal(
                "CONTROL_PLANE_IPS is empty: the firewall would keep the control plane out of the gateway",
                provider=self.kind,
            )
        if spec.secret_env:
            raise ProviderFatal(
                "secret_env is not accepted on Hetzner (user_data is stored by Hetzner); "
                "the VM fetches its secrets with its bootstrap token",
                provider=self.kind,
            )
        if spec.user_data is not None and len(spec.user_data.encode()) > USER_DATA_LIMIT:
            raise ProviderFatal("user_data is larger than Hetzner's 32 KiB limit", provider=self.kind)
        name = server_name(spec.vps_id)
        existing = await self._call(self._client.servers.get_by_name, name)
        if existing is not None:
            return await self._adopt(existing, spec)

        firewall_id = await self._call(self._ensure_firewall_sync)
        locations = list(spec.locations or self.default_locations)
        refusals: list[str] = []
        for location in locations:
            outcome, value = await self._call(self._create_sync, spec, name, location, firewall_id)
            if outcome == "capacity":
                log.info("hetzner: no capacity for vps %s in %s, trying the next location", spec.vps_id, location)
                refusals.append(value)
                continue
            if outcome == "taken":
                taken = await self._call(self._client.servers.get_by_name, name)
                if taken is None:
                    raise ProviderRetryable(
                        f"server name {name} is taken but the server is not visible yet", provider=self.kind
                    )
                return await self._adopt(taken, spec)
            log.info("hetzner: created server %s for vps %s in %s", value.server.id, spec.vps_id, location)
            return await self._finish_create(value, spec)
        raise CapacityUnavailable(
            "no capacity in any allowed location: " + "; ".join(refusals),
            provider=self.kind,
            code="resource_unavailable",
            tried=locations,
        )

    async def _finish_create(self, resp: Any, spec: VmSpec) -> VmInfo:
        ref = str(resp.server.id)
        try:
            await self._wait_actions([resp.action, *resp.next_actions], self.boot_timeout_s)
        except ActionFailed:
            # The server exists but will not boot: remove it so the retried create starts clean.
            log.warning("hetzner: create of vps %s ended in error; deleting server %s", spec.vps_id, ref)
            try:
                await self.destroy(ref)
            except ProviderError as cleanup_exc:
                log.warning("hetzner: cleanup of server %s failed: %s", ref, cleanup_exc)
            raise
        info = await self.get(ref)
        if info is None:
            raise ProviderRetryable(f"server {ref} disappeared right after create", provider=self.kind)
        return info

    async def _adopt(self, server: BoundServer, spec: VmSpec) -> VmInfo:
        self._check_ours(server, spec.vps_id)
        ref = str(server.id)
        log.info("hetzner: adopting server %s for vps %s (status %s)", ref, spec.vps_id, server.status)
        if server.status == "deleting":
            raise ProviderRetryable(
                f"server {ref} from an earlier attempt is still being deleted", provider=self.kind, code="conflict"
            )
        if server.status == "off":
            await self.start(ref)
        elif server.status in ("initializing", "starting"):
            await self._wait_status(ref, {"running", "off"}, self.boot_timeout_s)
        info = await self.get(ref)
        if info is None:
            raise ProviderRetryable(f"server {ref} disappeared while being adopted", provider=self.kind)
        return info

    async def start(self, ref: str) -> None:
        server = await self._get_server(ref)
        if server is None or server.status == "deleting":
            raise VmNotFound(f"server {ref} not found", provider=self.kind, code="not_found")
        if server.status == "running":
            return
        if server.status in ("starting", "initializing"):
            await self._wait_status(ref, {"running", "off"}, self.boot_timeout_s)
            return
        if server.status == "stopping":
            await self._wait_status(ref, {"off"}, self.stop_timeout_s)
        action = await self._call(self._client.servers.power_on, server)
        await self._wait_actions([action], self.boot_timeout_s)

    async def stop(self, ref: str) -> None:
        server = await self._get_server(ref)
        if server is None or server.status == "deleting":
            raise VmNotFound(f"server {ref} not found", provider=self.kind, code="not_found")
        if server.status == "off":
            return
        if server.status != "stopping":
            # Graceful first (ACPI); the gateway gets SIGTERM from systemd and saves its state.
            action = await self._call(self._client.servers.shutdown, server)
            await self._wait_actions([action], self.stop_timeout_s)
        server = await self._wait_status(ref, {"off"}, self.stop_timeout_s)
        if server is None or server.status == "off":
            return
        log.info("hetzner: server %s ignored the shutdown; powering off", ref)
        action = await self._call(self._client.servers.power_off, server)
        await self._wait_actions([action], self.stop_timeout_s)

    async def destroy(self, ref: str) -> None:
        server_id = self._server_id(ref)
        server = await self._call(self._get_sync, server_id)
        if server is None:
            return
        if server.status != "deleting":
            try:
                await self._call(self._client.servers.delete, server)
            except VmNotFound:
                return
        await self._wait_status(ref, set(), self.destroy_timeout_s)
