"""Fly.io Machines provider, through httpx (async).

One Fly app per VPS, named `<prefix>-<vps_id>` (deterministic, so a retried create finds it: a 422
on app create followed by a successful GET means "ours already"), on its own 6PN network. Inside
it: one volume for the agent's state mounted at /data, created first because it pins the region,
and one machine whose `metadata` carries `managed_by=slopbox` and `vps_id`, which is how a retried
create adopts the machine and how `list_managed` finds them. Destroy deletes the app, which
cascades to the machine and the volume.

Nothing here waits (base.py): create makes app -> volume -> machine, each step adopting what an
earlier attempt made, and returns the machine as Fly accepted it (usually `created`); start, stop
and destroy submit and return. The caller polls `get` (Fly allows 5 GETs per second per machine).

The gateway port is not in `services`, so it is not reachable from the internet; the control
plane reaches `<machine_id>.vm.<app>.internal:18789` over Fly's private network.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import httpx

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
    looks_secret,
)

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

_STATES = {
    "creating": VmState.PROVISIONING,
    "created": VmState.PROVISIONING,
    "starting": VmState.STARTING,
    "started": VmState.RUNNING,
    "stopping": VmState.STOPPING,
    "suspending": VmState.STOPPING,
    "stopped": VmState.STOPPED,
    "suspended": VmState.STOPPED,
    "restarting": VmState.BUSY,
    "updating": VmState.BUSY,
    "replacing": VmState.BUSY,
    "destroying": VmState.DELETING,
    "destroyed": VmState.DELETED,
    "failed": VmState.ERROR,
    "launch_failed": VmState.ERROR,
}
_GONE = {"destroying", "destroyed"}
_STARTABLE = {"stopped", "suspended", "failed", "created"}
_STOPPED = {"stopped", "suspended", "failed", "created"}
_CAPACITY_STATUSES = {"insufficient_capacity", "volume_placement_capacity"}
# Fly reports capacity problems with several status codes; these texts are what identifies them
# (observed in production by others: Kilo-Org/cloud #412, #516, #787; fly-go #306).
_CAPACITY_MARKERS = (
    "insufficient resources",
    "insufficient memory",
    "insufficient capacity",
    "no capacity",
    "over the allowed quota",
)
_MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")
NO_MACHINE = "no-machine"
"""Machine part of the ref listed for an app that holds no machine."""


def auth_header(token: str) -> str:
    """`FlyV1 <token>` for macaroon tokens (fly tokens create ...), `Bearer <token>` otherwise."""
    token = token.strip()
    if token.startswith(("FlyV1 ", "Bearer ")):
        return token
    if token.startswith(_MACAROON_PREFIXES):
        return f"FlyV1 {token}"
    return f"Bearer {token}"


class RegionFull(ProviderRetryable):
    """Fly has no room in that region (or on the volume's host) right now."""


# Keys of a rendered machine config (openclaw.render) that replace our defaults.
RENDERED_KEYS = ("files", "init", "services", "checks", "env", "restart", "stop_config")


class FlyProvider(VmProvider):
    """One Fly organization. `ref` is `<app name>/<machine id>`."""

    kind = "fly"

    def __init__(
        self,
        token: str,
        *,
        base_url: str = "https://api.machines.dev/v1",
        org_slug: str = "personal",
        app_prefix: str = "slopbox",
        default_regions: tuple[str, ...] = ("fra", "ams", "cdg"),
        default_image: str | None = None,
        volume_name: str = "slopbox_data",
        mount_path: str = "/data",
        files_root: str = "/data/state",
        gateway_port: int = GATEWAY_PORT,
        gateway_scheme: str = "https",
        gateway_host: str | None = None,
        request_timeout_s: float = MAX_REQUEST_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not token:
            raise ProviderFatal("FLY_API_TOKEN is not set", provider=self.kind)
        self._auth = auth_header(token)
        self.base_url = base_url.rstrip("/")
        # Where every gateway is reached instead of `<app>.flycast` (a test VM on loopback).
        self.gateway_host = gateway_host
        self.org_slug = org_slug
        self.app_prefix = app_prefix
        self.default_regions = tuple(default_regions)
        self.default_image = default_image
        self.volume_name = volume_name
        self.mount_path = mount_path
        self.files_root = files_root.rstrip("/")
        self.gateway_port = gateway_port
        self.gateway_scheme = gateway_scheme
        self.request_timeout_s = min(request_timeout_s, MAX_REQUEST_TIMEOUT_S)
        self._transport = transport
        self._http_client: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FlyProvider:
        token = settings.fly_api_token.get_secret_value() if settings.fly_api_token else ""
        kwargs: dict[str, Any] = {"base_url": settings.fly_api_base_url, "org_slug": settings.fly_org_slug}
        kwargs.update(overrides)
        return cls(token, **kwargs)

    def app_name(self, vps_id: str) -> str:
        return f"{self.app_prefix}-{vps_id}"

    # -- HTTP ----------------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        """One client per event loop (an httpx pool must not be shared across loops)."""
        loop = asyncio.get_running_loop()
        if self._http_client is None or self._http_loop is not loop:
            self._http_client = httpx.AsyncClient(
                base_url=self.base_url + "/",
                headers={"Authorization": self._auth, "User-Agent": "slopbox"},
                timeout=self.request_timeout_s,
                transport=self._transport,
            )
            self._http_loop = loop
        return self._http_client

    async def aclose(self) -> None:
        if self._http_client is not None:
            await self._http_client.aclose()
            self._http_client = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        allow: tuple[int, ...] = (),
    ) -> httpx.Response:
        """One API call. 2xx and statuses in `allow` come back; anything else raises a ProviderError."""
        try:
            resp = await self._http().request(method, path.lstrip("/"), json=json, params=params)
        except httpx.TimeoutException:
            raise ProviderRetryable(
                f"timed out talking to the Fly API ({method} {path})", provider=self.kind, code="timeout"
            ) from None
        except httpx.TransportError as exc:
            raise ProviderRetryable(
                f"could not reach the Fly API: {type(exc).__name__}", provider=self.kind, code="connection_error"
            ) from None
        if resp.is_success or resp.status_code in allow:
            return resp
        raise self._error(resp)

    def _error(self, resp: httpx.Response) -> ProviderError:
        """Classify a Fly error response (body `{"error", "status"?, "message"?}`)."""
        status = resp.status_code
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            message = str(body.get("error") or body.get("message") or resp.reason_phrase)
            code: str | int = str(body.get("status") or status)
        else:
            message = resp.text[:300].strip() or resp.reason_phrase
            code = status
        kw: dict[str, Any] = {"provider": self.kind, "code": code, "status": status}
        lowered = message.lower()
        if code in _CAPACITY_STATUSES or any(m in lowered for m in _CAPACITY_MARKERS):
            return RegionFull(message, **kw)
        if status == 429:
            return ProviderRetryable(message, retry_after_s=_retry_after(resp), **kw)
        if status in (401, 403):
            return ProviderFatal(message, **kw)
        if status == 404:
            return VmNotFound(message, **kw)
        if status in (408, 409, 412, 423) or status >= 500:
            return ProviderRetryable(message, retry_after_s=_retry_after(resp), **kw)
        return ProviderFatal(message, **kw)

    # -- refs & info -----------------------------------------------------------------------------------

    @staticmethod
    def _split(ref: str) -> tuple[str, str]:
        app, sep, mid = ref.partition("/")
        if not sep or not app or not mid or "/" in mid:
            raise ProviderFatal(f"not a Fly machine ref (app/machine_id): {ref!r}", provider="fly")
        return app, mid

    def _info(self, app: str, machine: dict[str, Any]) -> VmInfo:
        state = str(machine.get("state") or "unknown")
        vm_state = _STATES.get(state, VmState.UNKNOWN)
        if machine.get("host_status") not in (None, "ok"):
            vm_state = VmState.UNKNOWN
        config = machine.get("config") or {}
        metadata = {str(k): str(v) for k, v in (config.get("metadata") or {}).items()}
        created = None
        if raw := machine.get("created_at"):
            try:
                created = datetime.fromisoformat(str(raw))
            except ValueError:
                created = None
        return VmInfo(
            provider=self.kind,
            provider_ref=f"{app}/{machine['id']}",
            vps_id=metadata.get("vps_id"),
            state=vm_state,
            raw_state=state,
            # Flycast: Fly Proxy forwards the app's private address to the gateway's IPv4 listener.
            host=self.gateway_host or f"{app}.flycast",
            gateway_port=self.gateway_port,
            location=machine.get("region"),
            labels=metadata,
            created_at=created,
        )

    async def _machine(self, app: str, mid: str) -> dict[str, Any] | None:
        resp = await self._request("GET", f"apps/{app}/machines/{mid}", allow=(404,))
        if resp.status_code == 404:
            return None
        return resp.json()

    async def get(self, ref: str) -> VmInfo | None:
        """The machine; for `<app>/no-machine` (from `list_managed`) the app, until it is deleted."""
        app, mid = self._split(ref)
        if mid == NO_MACHINE:
            resp = await self._request("GET", f"apps/{app}", allow=(404,))
            return None if resp.status_code == 404 else self._app_info(app)
        machine = await self._machine(app, mid)
        if machine is None or machine.get("state") == "destroyed":
            return None
        return self._info(app, machine)

    def gateway_url(self, info: VmInfo) -> str:
        if not info.host:
            raise ProviderRetryable("the machine has no private address yet", provider=self.kind)
        return f"{self.gateway_scheme}://{info.host}:{info.gateway_port}"

    async def list_managed(self) -> list[VmInfo]:
        """Our machines in our apps, plus our apps that hold no machine at all.

        An app without a machine is what a create leaves when it failed between making the app
        (or its volume) and making the machine; it is listed with the ref `<app>/no-machine`,
        state provisioning and `detail` saying so, so that destroy-by-vps-id and the reconciler
        can delete it (`destroy` deletes the app; `get` returns None for that ref).
        """
        resp = await self._request("GET", "apps", params={"org_slug": self.org_slug})
        body = resp.json()
        apps = body.get("apps", []) if isinstance(body, dict) else body
        prefix = f"{self.app_prefix}-"
        out: list[VmInfo] = []
        for app in apps or []:
            name = str(app.get("name") or "")
            if not name.startswith(prefix):
                continue
            machines = await self._request("GET", f"apps/{name}/machines", allow=(404,))
            if machines.status_code == 404:
                continue
            live = [m for m in machines.json() or [] if m.get("state") not in _GONE]
            for m in live:
                meta = (m.get("config") or {}).get("metadata") or {}
                if meta.get("managed_by") == MANAGED_BY and meta.get("vps_id"):
                    out.append(self._info(name, m))
            if not live:
                out.append(self._app_info(name))
        return out

    def _app_info(self, app: str) -> VmInfo:
        vps_id = app.removeprefix(f"{self.app_prefix}-")
        return VmInfo(
            provider=self.kind,
            provider_ref=f"{app}/{NO_MACHINE}",
            vps_id=vps_id,
            state=VmState.PROVISIONING,
            raw_state="app-without-machine",
            gateway_port=self.gateway_port,
            labels={"managed_by": MANAGED_BY, "vps_id": vps_id},
            detail="the app exists but holds no machine (an interrupted create)",
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    def _check_spec(self, spec: VmSpec) -> str:
        image = spec.image or self.default_image
        if not image:
            raise ProviderFatal("no image: set VmSpec.image or the provider's default_image", provider=self.kind)
        if spec.secret_env:
            raise ProviderFatal(
                "secret_env is not accepted on Fly (machine config is readable through the API); "
                "the VM fetches its secrets with its bootstrap token",
                provider=self.kind,
            )
        if leaky := sorted(k for k in spec.env if looks_secret(k)):
            raise ProviderFatal(
                f"env keys that look like secrets would be stored in the machine config: {', '.join(leaky)}",
                provider=self.kind,
            )
        for rel in spec.files:
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or not p.parts:
                raise ProviderFatal(f"file path must be relative inside the state folder: {rel!r}", provider=self.kind)
        return image

    async def _ensure_app(self, app: str) -> None:
        body = {"app_name": app, "org_slug": self.org_slug, "network": app}
        resp = await self._request("POST", "apps", json=body, allow=(409, 422))
        if resp.is_success:
            log.info("fly: created app %s", app)
            return
        refusal = self._error(resp)
        existing = await self._request("GET", f"apps/{app}", allow=(404,))
        if existing.status_code == 404:
            raise ProviderFatal(
                f"cannot create app {app}: {refusal.message}", provider=self.kind, code=refusal.code, status=409
            )
        org = ((existing.json() or {}).get("organization") or {}).get("slug")
        if org and org != self.org_slug:
            raise ProviderFatal(f"app {app} exists in another organization ({org})", provider=self.kind)

    async def _our_machines(self, app: str, vps_id: str) -> list[dict[str, Any]]:
        """Machines an earlier attempt made for this VPS (destroyed ones are not listed by Fly)."""
        resp = await self._request("GET", f"apps/{app}/machines", params={"metadata.vps_id": vps_id})
        out = []
        for m in resp.json() or []:
            meta = (m.get("config") or {}).get("metadata") or {}
            if meta.get("vps_id") == vps_id and meta.get("managed_by") == MANAGED_BY and m.get("state") != "destroyed":
                out.append(m)
        return out

    async def _free_volume(self, app: str) -> dict[str, Any] | None:
        resp = await self._request("GET", f"apps/{app}/volumes")
        for v in resp.json() or []:
            if (
                v.get("name") == self.volume_name
                and not v.get("attached_machine_id")
                and v.get("state") not in ("destroyed", "destroying", "pending_destroy", "scheduling_destroy")
            ):
                return v
        return None

    def _machine_config(self, spec: VmSpec, image: str, volume_id: str) -> dict[str, Any]:
        config = self._default_machine_config(spec, image, volume_id)
        rendered = {k: v for k, v in spec.provider_config.items() if k in RENDERED_KEYS}
        if leaky := sorted(k for k in rendered.get("env", {}) if looks_secret(k)):
            raise ProviderFatal(f"rendered env keys look like secrets: {', '.join(leaky)}", provider=self.kind)
        return {**config, **rendered}

    def _default_machine_config(self, spec: VmSpec, image: str, volume_id: str) -> dict[str, Any]:
        return {
            "image": image,
            "guest": {"cpu_kind": spec.cpu_kind, "cpus": spec.cpus, "memory_mb": spec.memory_mb},
            "env": dict(spec.env),
            "files": [
                {
                    "guest_path": f"{self.files_root}/{rel}",
                    "raw_value": base64.b64encode(content.encode()).decode(),
                }
                for rel, content in sorted(spec.files.items())
            ],
            "metadata": {"managed_by": MANAGED_BY, "vps_id": spec.vps_id, "agent_id": spec.agent_id},
            "mounts": [{"volume": volume_id, "path": self.mount_path}],
            "services": [],
            "restart": {"policy": "on-failure", "max_retries": 10},
            "stop_config": {"signal": "SIGTERM", "timeout": "30s"},
            "auto_destroy": False,
        }

    async def _launch(self, app: str, spec: VmSpec, image: str) -> dict[str, Any]:
        """Volume then machine, walking the allowed regions while Fly reports no capacity."""
        volume = await self._free_volume(app)
        # A volume left by an earlier attempt pins us to its region (it may hold state).
        regions = [volume["region"]] if volume else list(spec.locations or self.default_regions)
        refusals: list[str] = []
        for region in regions:
            made_volume = False
            try:
                if volume is None:
                    resp = await self._request(
                        "POST",
                        f"apps/{app}/volumes",
                        json={"name": self.volume_name, "region": region, "size_gb": spec.disk_gb, "encrypted": True},
                    )
                    volume = resp.json()
                    made_volume = True
                body = {
                    "name": app,
                    "region": region,
                    "config": self._machine_config(spec, image, volume["id"]),
                }
                resp = await self._request("POST", f"apps/{app}/machines", json=body)
                machine = resp.json()
                log.info("fly: created machine %s in %s for vps %s", machine.get("id"), region, spec.vps_id)
                return machine
            except RegionFull as exc:
                log.info("fly: no capacity for vps %s in %s: %s", spec.vps_id, region, exc.message)
                refusals.append(f"{region}: {exc.message}")
                if made_volume and volume is not None:
                    await self._request("DELETE", f"apps/{app}/volumes/{volume['id']}", allow=(404,))
                volume = None
        raise CapacityUnavailable(
            "no capacity in any allowed region: " + "; ".join(refusals),
            provider=self.kind,
            code="insufficient_capacity",
            tried=regions,
        )

    async def create(self, spec: VmSpec) -> VmInfo:
        """App, then volume, then machine, each adopted when an earlier attempt made it.

        Returns the machine as Fly accepted it (usually `created`); the boot is not awaited.
        """
        image = self._check_spec(spec)
        app = self.app_name(spec.vps_id)
        await self._ensure_app(app)
        machines = await self._our_machines(app, spec.vps_id)
        live = [m for m in machines if m.get("state") not in _GONE]
        if live:
            return await self._adopt(app, live[0], spec)
        if machines:
            # Its volume is only free once Fly has destroyed it; launching now would make a second one.
            raise ProviderRetryable(
                f"machine {machines[0]['id']} from an earlier attempt is being destroyed",
                provider=self.kind,
                code="conflict",
            )
        machine = await self._launch(app, spec, image)
        return self._info(app, machine)

    async def _adopt(self, app: str, machine: dict[str, Any], spec: VmSpec) -> VmInfo:
        mid = str(machine["id"])
        state = machine.get("state")
        log.info("fly: adopting machine %s for vps %s (state %s)", mid, spec.vps_id, state)
        if state in ("stopped", "suspended", "failed"):
            await self.start(f"{app}/{mid}")
            machine = await self._machine(app, mid) or machine
        return self._info(app, machine)

    async def _live_machine(self, ref: str) -> tuple[str, str, dict[str, Any]]:
        app, mid = self._split(ref)
        machine = await self._machine(app, mid) if mid != NO_MACHINE else None
        if machine is None or machine.get("state") in _GONE:
            raise VmNotFound(f"machine {ref} not found", provider=self.kind, code="not_found")
        return app, mid, machine

    def _busy(self, ref: str, state: Any, what: str) -> ProviderRetryable:
        return ProviderRetryable(
            f"machine {ref} is {state}; {what} it once that has finished", provider=self.kind, code="conflict"
        )

    async def start(self, ref: str) -> None:
        app, mid, machine = await self._live_machine(ref)
        state = machine.get("state")
        if state in ("started", "starting"):
            return
        if state not in _STARTABLE:
            raise self._busy(ref, state, "start")
        await self._request("POST", f"apps/{app}/machines/{mid}/start")

    async def stop(self, ref: str) -> None:
        """SIGTERM with 30 s grace (the gateway saves its state); Fly kills the machine after that."""
        await self._stop(ref, {"signal": "SIGTERM", "timeout": "30s"})

    async def force_stop(self, ref: str) -> None:
        """SIGKILL, for a machine still not stopped after the graceful stop's grace period."""
        await self._stop(ref, {"signal": "SIGKILL", "timeout": "1s"}, again_when_stopping=True)

    async def _stop(self, ref: str, body: dict[str, str], *, again_when_stopping: bool = False) -> None:
        app, mid, machine = await self._live_machine(ref)
        state = machine.get("state")
        if state in _STOPPED or (state in ("stopping", "suspending") and not again_when_stopping):
            return
        if state not in ("started", "starting", "stopping", "suspending"):
            raise self._busy(ref, state, "stop")
        await self._request("POST", f"apps/{app}/machines/{mid}/stop", json=body)

    async def destroy(self, ref: str) -> None:
        """Ask Fly to delete the whole app (machine, volume and IPs go with it); returns once accepted.

        `get` says DELETING while the machine is destroyed, then None. Already gone = done.
        """
        app, _ = self._split(ref)
        if not app.startswith(f"{self.app_prefix}-"):
            raise ProviderFatal(f"refusing to delete app {app}: not a {self.app_prefix} app", provider=self.kind)
        await self._request("DELETE", f"apps/{app}", params={"force": "true"}, allow=(404,))
        log.info("fly: asked to delete app %s", app)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
