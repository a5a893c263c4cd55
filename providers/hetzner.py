"""Hetzner Cloud provider, through hcloud-python (sync; every call runs in a worker thread).

Idempotency rests on the deterministic server name `slopbox-vps-<vps_id>` plus the labels
`managed-by=slopbox` and `vps-id=<vps_id>`: `create` first looks the name up and adopts a server
whose labels match; a create that hits `uniqueness_error` (an earlier attempt's request did reach
Hetzner) adopts the same way. The firewall `slopbox-gateway` lets TCP 18789 in from the control
plane only and is attached in the create call, so the gateway is never exposed, not even at boot.

hcloud's own retry loop is switched off by default (`client_retries=0`): Temporal activities do
the retrying, with backoff, based on the `ProviderError.retryable` flag set here. Nothing here
waits for an action: every method submits and returns (base.py), and the caller polls `get`. A
server with an action still running is `locked`; starting or stopping it raises a retryable error.
A failed create/start action shows up in `get` as state ERROR (the server is left `off`).
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
from hcloud.firewalls import Firewall, FirewallRule
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer
from hcloud.ssh_keys import SSHKey

from providers.base import (
    GATEWAY_PORT,
    MANAGED_BY,
    MAX_REQUEST_TIMEOUT_S,
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
# Actions that decide whether an `off` server is stopped on purpose or failed to come up.
_POWER_COMMANDS = {"create_server", "start_server", "stop_server", "shutdown_server"}
_BOOT_COMMANDS = {"create_server", "start_server"}


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
        gateway_scheme: str = "https",
        poll_interval_s: float = 1.0,
        request_timeout_s: float = MAX_REQUEST_TIMEOUT_S,
        client_retries: int = 0,
        client_retry_base_s: float = 1.0,
    ) -> None:
        if not token:
            raise ProviderFatal("HCLOUD_TOKEN is not set", provider=self.kind)
        self._client = Client(
            token=token,
            api_endpoint=api_endpoint.rstrip("/"),
            application_name="slopbox",
            # Only hcloud's own action waits use poll_interval; this provider never calls them.
            poll_interval=poll_interval_s,
            timeout=min(request_timeout_s, MAX_REQUEST_TIMEOUT_S),
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

    def _info(self, server: BoundServer, failure: str | None = None) -> VmInfo:
        """`failure`: the error of the create/start action that left this server off (state ERROR)."""
        status = server.status or "unknown"
        state = _STATES.get(status, VmState.UNKNOWN)
        if state == VmState.RUNNING and server.locked:
            state = VmState.BUSY
        if failure is not None:
            state = VmState.ERROR
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
            detail=failure,
        )

    def _boot_failure_sync(self, server: BoundServer) -> tuple[str | None, bool]:
        """(why, create_failed): why an `off` server is off when its latest power action was a
        create/start that failed, and whether its create_server action itself failed.

        One extra read, only for servers that are off and not locked: that is how Hetzner tells
        "stopped" from "never came up" (the server has no error status of its own).
        """
        if server.status != "off" or server.locked:
            return None, False
        page = self._client.servers.get_actions_list(server, sort=["id:desc"], per_page=25)
        power = [a for a in page.actions if a.command in _POWER_COMMANDS]
        create_failed = any(a.command == "create_server" and a.status == "error" for a in power)
        latest = power[0] if power else None
        if latest is None or latest.status != "error" or latest.command not in _BOOT_COMMANDS:
            return None, False
        err = latest.error or {}
        return f"{latest.command} failed: {err.get('message', 'unknown error')}", create_failed

    def _read_sync(self, server_id: int) -> VmInfo | None:
        server = self._get_sync(server_id)
        if server is None:
            return None
        return self._info(server, self._boot_failure_sync(server)[0])

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
        return await self._call(self._read_sync, self._server_id(ref))

    async def list_managed(self) -> list[VmInfo]:
        servers = await self._call(self._client.servers.get_all, label_selector=f"managed-by={MANAGED_BY}")
        return [self._info(s) for s in servers if (s.labels or {}).get("vps-id")]

    def gateway_url(self, info: VmInfo) -> str:
        if not info.host:
            raise ProviderRetryable("the server has no public address yet", provider=self.kind)
        host = f"[{info.host}]" if ":" in info.host else info.host
        return f"{self.gateway_scheme}://{host}:{info.gateway_port}"

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
        """Firewall, then server, each adopted when it exists; returns the server as Hetzner accepted it.

        The create_server/start_server actions are not awaited: the server is usually
        `initializing` when this returns, and `get` reports RUNNING (or ERROR) later.
        """
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
            return self._info(value.server)
        raise CapacityUnavailable(
            "no capacity in any allowed location: " + "; ".join(refusals),
            provider=self.kind,
            code="resource_unavailable",
            tried=locations,
        )

    async def _adopt(self, server: BoundServer, spec: VmSpec) -> VmInfo:
        """Carry on with the server an earlier attempt made: one step at most, never a wait."""
        self._check_ours(server, spec.vps_id)
        ref = str(server.id)
        log.info("hetzner: adopting server %s for vps %s (status %s)", ref, spec.vps_id, server.status)
        if server.status == "deleting":
            raise ProviderRetryable(
                f"server {ref} from an earlier attempt is still being deleted", provider=self.kind, code="conflict"
            )
        failure, create_failed = await self._call(self._boot_failure_sync, server)
        if failure is not None and create_failed:
            # It never got created properly (no state worth keeping): remove it so a retry starts clean.
            log.warning("hetzner: server %s for vps %s %s; deleting it", ref, spec.vps_id, failure)
            await self.destroy(ref)
            raise ProviderRetryable(
                f"server {ref} from an earlier attempt failed ({failure}); it is being deleted",
                provider=self.kind,
                code="action_failed",
            )
        if server.status == "off" and not server.locked:
            await self.start(ref)
        info = await self.get(ref)
        if info is None:
            raise ProviderRetryable(f"server {ref} disappeared while being adopted", provider=self.kind)
        return info

    def _busy(self, ref: str, server: BoundServer, what: str) -> ProviderRetryable:
        return ProviderRetryable(
            f"server {ref} is busy ({server.status}, an action is still running); {what} it later",
            provider=self.kind,
            code="locked",
        )

    async def start(self, ref: str) -> None:
        server = await self._get_server(ref)
        if server is None or server.status == "deleting":
            raise VmNotFound(f"server {ref} not found", provider=self.kind, code="not_found")
        if server.status in ("initializing", "starting") or (server.status == "running" and not server.locked):
            return
        if server.locked or server.status != "off":
            raise self._busy(ref, server, "start")
        await self._call(self._client.servers.power_on, server)

    async def stop(self, ref: str) -> None:
        """Graceful (ACPI) shutdown: the gateway gets SIGTERM from systemd and saves its state."""
        server = await self._get_server(ref)
        if server is None or server.status == "deleting":
            raise VmNotFound(f"server {ref} not found", provider=self.kind, code="not_found")
        if server.status == "stopping" or (server.status == "off" and not server.locked):
            return
        if server.locked or server.status != "running":
            raise self._busy(ref, server, "stop")
        await self._call(self._client.servers.shutdown, server)

    async def force_stop(self, ref: str) -> None:
        """Hard power off, for a server that ignored the ACPI shutdown."""
        server = await self._get_server(ref)
        if server is None or server.status == "deleting":
            raise VmNotFound(f"server {ref} not found", provider=self.kind, code="not_found")
        if server.status == "off" and not server.locked:
            return
        if server.locked:
            raise self._busy(ref, server, "power off")
        log.info("hetzner: powering off server %s", ref)
        await self._call(self._client.servers.power_off, server)

    async def destroy(self, ref: str) -> None:
        """Submit the delete; `get` says DELETING until Hetzner has removed the server, then None."""
        server_id = self._server_id(ref)
        server = await self._call(self._get_sync, server_id)
        if server is None or server.status == "deleting":
            return
        try:
            await self._call(self._client.servers.delete, server)
        except VmNotFound:
            return
