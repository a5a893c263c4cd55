"""What activities need to turn database rows into a VM and talk to its gateway.

Kept apart from the activity bodies so the rendering inputs (which secrets go where) are in one
place: secrets go to a local gateway's process env directly, and to cloud VMs only through the
bootstrap redemption — never into provider-stored metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from db.models import Agent, Vps, VpsConfig
from openclaw import render
from openclaw.agent_env import gateway_env, render_input
from openclaw.device import DeviceIdentity
from openclaw.merge_patch import array_paths, patch_applied
from openclaw.pairing import approve_device_keys
from openclaw.relay import RELAY_CLIENT, RELAY_SCOPES, relay_origin
from openclaw.rpc import (
    DEFAULT_OPERATOR_SCOPES,
    ClientInfo,
    GatewayClient,
    GatewayConnectionError,
    GatewayPinError,
    GatewayTimeoutError,
    NotPairedError,
    UnavailableError,
)
from providers import ProviderError, VmInfo, VmProvider, VmSpec, VmState
from settings import Settings

SIMULATOR_KNOB_PREFIX = "SLOPBOX_SIM_"
log = logging.getLogger(__name__)


def ensure_identities(vps: Vps) -> tuple[str, str]:
    """The control plane's two device identities for this gateway: admin and UI relay (PEM)."""
    admin = vps.admin_device_key or DeviceIdentity.generate().private_pem().decode()
    relay = vps.relay_device_key or DeviceIdentity.generate().private_pem().decode()
    return str(admin), str(relay)


def vm_spec(settings: Settings, vps: Vps, agent: Agent, config: VpsConfig, bootstrap_token: str) -> VmSpec:
    common: dict[str, Any] = {"vps_id": str(vps.id), "agent_id": str(agent.id), "user_id": str(vps.user_id),
                              "locations": list(config.locations), "image": config.image}
    if vps.provider == "local":
        # SLOPBOX_SIM_* knobs (slow or never-ready boots) reach simulated local gateways only.
        knobs = {k: v for k, v in os.environ.items() if k.startswith(SIMULATOR_KNOB_PREFIX)}
        return VmSpec(**common, files=render.render_local_files(render_input(settings, agent, local=True)),
                      env=knobs, secret_env=gateway_env(settings, agent, local=True))  # type: ignore[arg-type]
    inp = render_input(settings, agent, local=False)
    if vps.provider == "hetzner":
        return VmSpec(**common, server_type=config.server_type,
                      user_data=render.render_cloud_init(inp, bootstrap_token))
    cpus = max(1, config.cpu_millicores // 1000)
    guest = {"cpu_kind": "performance" if (config.server_type or "").startswith("performance") else "shared",
             "cpus": cpus, "memory_mb": config.memory_mb}
    fly = render.render_fly_machine_config(inp, bootstrap_token, None, guest, config.image, None)
    return VmSpec(**common, cpu_kind=guest["cpu_kind"], cpus=cpus, memory_mb=config.memory_mb,
                  disk_gb=config.disk_gb, env=fly["env"], provider_config=fly)


def base_url(provider: VmProvider, vps: Vps) -> str:
    """https://host:port for a cloud VM (its gateway serves TLS only), http://127.0.0.1:port locally."""
    info = VmInfo(provider=vps.provider, provider_ref=vps.provider_ref or "", vps_id=str(vps.id),
                  state=VmState.RUNNING, host=vps.host, gateway_port=vps.gateway_port or 18789)
    return provider.gateway_url(info).rstrip("/")


def tls_pin(vps: Vps, url: str) -> str | None:
    """The certificate SHA-256 to trust for this URL: None for plain loopback http (local VMs).

    An https gateway whose VM has not reported a certificate is never contacted: there is nothing
    to trust it with, and falling back to CA trust or no check would send the token in the clear.
    """
    if not url.startswith(("https://", "wss://")):
        return None
    if not vps.gateway_cert_sha256:
        raise ApplicationError("the VM has not reported its gateway certificate; refusing to connect",
                               type="GatewayNotPinned", non_retryable=True)
    return str(vps.gateway_cert_sha256)


def pin_refused(err: GatewayPinError) -> ApplicationError:
    """A certificate other than the pinned one: someone else answers at that address. Not retried."""
    return ApplicationError(f"refused the gateway's TLS certificate: {err}", type="CertificatePinMismatch",
                            non_retryable=True)


# --- gateway RPC: pairing and config push ------------------------------------------------------------

ADMIN_CLIENT = ClientInfo(id="gateway-client", mode="backend", display_name="slopbox-control-plane")
PAIRING_BUDGET_S = 90.0


def ws_url(provider: VmProvider, vps: Vps) -> str:
    """wss:// for a cloud VM (pinned, see `tls_pin`), ws:// on loopback."""
    return "ws" + base_url(provider, vps).removeprefix("http")


async def _connect_until_paired(url: str, *, token: str, device: DeviceIdentity, client: ClientInfo,
                                scopes: tuple[str, ...], origin: str | None, deadline: float,
                                pin: str | None) -> str | None:
    """Connect with a device identity, retrying while the gateway says PAIRING_REQUIRED."""
    loop = asyncio.get_running_loop()
    while True:
        gw = GatewayClient(url, token=token, device=device, client=client, scopes=scopes, origin=origin,
                           reconnect=False, connect_timeout=15, cert_sha256=pin)
        try:
            async with gw:
                return gw.hello.device_token
        except NotPairedError:
            if loop.time() >= deadline:
                raise
            activity.heartbeat("waiting for pairing approval")
            await asyncio.sleep(1.0)


async def pair(settings: Settings, provider: VmProvider, vps: Vps, agent: Agent,
               budget_s: float = PAIRING_BUDGET_S) -> tuple[str | None, str | None]:
    """Pair the admin and UI-relay identities; returns their device tokens (admin, relay).

    The relay's token carries only the relay's scopes: the proxy sends it on plain HTTP requests
    instead of the owner-level gateway token.

    On cloud VMs the boot-time pairing step approves exactly our public keys (they came with the
    bootstrap redemption); on this machine we run that same step ourselves, over loopback.
    """
    url = ws_url(provider, vps)
    pin = tls_pin(vps, url)
    token = str(agent.gateway_token)
    admin = DeviceIdentity.from_pem(str(vps.admin_device_key))
    relay = DeviceIdentity.from_pem(str(vps.relay_device_key))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    approver = None
    if vps.provider == "local":
        approver = asyncio.create_task(approve_device_keys(
            url, token=token, public_keys=[admin.public_key_b64url, relay.public_key_b64url],
            timeout=budget_s, poll_interval=0.5, cert_sha256=pin))
    try:
        device_token = await _connect_until_paired(url, token=token, device=admin, client=ADMIN_CLIENT,
                                                   scopes=DEFAULT_OPERATOR_SCOPES, origin=None, deadline=deadline,
                                                   pin=pin)
        relay_token = await _connect_until_paired(url, token=token, device=relay, client=RELAY_CLIENT,
                                                  scopes=RELAY_SCOPES, origin=relay_origin(settings),
                                                  deadline=deadline, pin=pin)
        # Both identities connected with their scopes: paired (a loopback connection may have been
        # paired silently, so the approver need not have seen a request for it).
        return device_token, relay_token
    except GatewayPinError as err:
        raise pin_refused(err) from None
    finally:
        if approver is not None and not approver.done():
            approver.cancel()


def admin_client(provider: VmProvider, vps: Vps, agent: Agent, **options: Any) -> GatewayClient:
    """The control plane's admin identity on this gateway; never used for user traffic."""
    url = ws_url(provider, vps)
    return GatewayClient(url, token=str(agent.gateway_token), cert_sha256=tls_pin(vps, url),
                         device=DeviceIdentity.from_pem(str(vps.admin_device_key)),
                         device_token=str(vps.admin_device_token) if vps.admin_device_token else None,
                         client=ADMIN_CLIENT, scopes=DEFAULT_OPERATOR_SCOPES, **{"reconnect": True, **options})


@asynccontextmanager
async def admin_session(provider: VmProvider, vps: Vps, agent: Agent, *, budget_s: float,
                        **options: Any) -> AsyncIterator[GatewayClient]:
    """An admin session that waits up to `budget_s` (a gateway start) for a gateway still restarting
    after the previous change. One that does not answer within that fails for good (GatewayNotReady):
    retrying would only make the user wait that long again; a lost worker is still retried. While it
    waits, the provider is asked whether the VM is still up (`vm_down`): one that is off or dead fails
    the session at once (VmNotRunning, final)."""
    client = admin_client(provider, vps, agent, connect_timeout=budget_s, **options)
    try:
        await unless_vm_down(provider, vps, client.connect())
    except BaseException as err:
        await client.close()
        if isinstance(err, GatewayPinError):
            raise pin_refused(err) from None
        if isinstance(err, GatewayConnectionError):
            raise ApplicationError(f"the gateway did not answer within {budget_s:.0f}s: {err}",
                                   type="GatewayNotReady", non_retryable=True) from None
        raise
    try:
        yield client
    finally:
        await client.close()


# Provider states from which nothing brings the gateway back without a start from us: at once
# (a failed machine, a dead local gateway, a deleted VM), or when seen on two looks in a row (a Fly
# machine restarting its crashed gateway passes through `stopped` for a moment).
VM_GONE = frozenset({VmState.DELETING, VmState.DELETED, VmState.ERROR})
VM_OFF = frozenset({VmState.STOPPING, VmState.STOPPED})
VM_WATCH_FIRST_S, VM_WATCH_EVERY_S = 1.0, 10.0  # a provider GET per 10 s of waiting: 6 for a 60 s first boot
T = TypeVar("T")


async def vm_down(provider: VmProvider, vps: Vps, *, first_s: float = VM_WATCH_FIRST_S,
                  every_s: float = VM_WATCH_EVERY_S) -> str:
    """Returns why, once the provider says the VM is down; never while it runs or starts.

    A gateway that does not answer may be restarting (a config change, systemd or Fly bringing a
    crashed one back: the VM stays up) or gone with its VM. Only the provider tells the two apart;
    asking it lets a wait on a VM that is off or dead end in seconds instead of after a gateway
    start's whole budget. A provider that cannot answer right now is asked again later."""
    await asyncio.sleep(first_s)
    off_before = False
    while True:
        try:
            info = await provider.get(str(vps.provider_ref))
        except ProviderError as err:
            log.info("vm watch: the provider did not answer (%s); asking again", err)
        else:
            if info is None:
                return f"the {vps.provider} VM no longer exists"
            if info.state in VM_GONE or (info.state in VM_OFF and off_before):
                detail = f" ({info.detail})" if info.detail else ""
                return f"the {vps.provider} VM's state is {info.state.value}{detail}"
            off_before = info.state in VM_OFF
        await asyncio.sleep(every_s)


async def unless_vm_down(provider: VmProvider, vps: Vps, work: Awaitable[T]) -> T:
    """`work`, unless the VM goes down first (`vm_down`): then it is cancelled and the activity
    fails for good (VmNotRunning): waiting longer cannot help, and a retry would wait again."""
    if not vps.provider_ref:  # no VM to ask about (yet): nothing to race
        return await work
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(vm_down(provider, vps))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ApplicationError(f"the gateway's VM is not running: {watch.result()}", type="VmNotRunning",
                                   non_retryable=True)
        return task.result()
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


# The real gateway's answer to a write it kept but applies only by restarting (UNAVAILABLE
# "config.patch persisted and updated the active Gateway, but a recovery restart is required" or
# "... persisted and was accepted for restart"): the write is not lost, the gateway is going away.
PERSISTED_MARK = "persisted"


async def write_config(gw: GatewayClient, patch: dict[str, Any], *, budget_s: float,
                       replace_paths: list[str] | None = None, note: str | None = None,
                       vm: tuple[VmProvider, Vps] | None = None) -> None:
    """`config.patch` that outlasts the gateway's own reload.

    The gateway answers a channel or plugin change only after it has reloaded the channel: 13-26 s
    with channel plugins on a 2-core machine (34 s seen), more under load. A write that times out may
    still be applying, and sending it again supersedes that reload, which the gateway recovers from
    by restarting itself. So: one write with the whole budget, and when its answer is lost (a
    timeout, a socket closed under it) or says "persisted, restarting", the config the gateway reads
    back decides: after the restart it announced, once it answers again. Only a write that is not in
    the config then fails, or a gateway that does not answer within the budget. With `vm`, the
    provider is asked meanwhile (`unless_vm_down`): a gateway that dies during the reload or the
    restart fails the write in seconds (VmNotRunning), not after the budget.
    """
    if vm is not None:
        provider, vps = vm
        return await unless_vm_down(provider, vps, write_config(gw, patch, budget_s=budget_s,
                                                                replace_paths=replace_paths, note=note))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    restarting = False
    try:
        await gw.config_patch(patch, replace_paths=replace_paths, note=note, timeout=budget_s)
        return
    except GatewayPinError:
        raise
    except GatewayTimeoutError:
        lost = f"no answer within {budget_s:.0f}s"
    except GatewayConnectionError as err:
        lost = f"the connection closed: {err}"
    except UnavailableError as err:
        if PERSISTED_MARK not in err.message:
            raise
        lost, restarting = err.message, True
    log.info("config write unconfirmed (%s); reading the config back", lost)
    sessions = gw.reconnect_count
    reopen = False
    while True:
        remaining = deadline - loop.time()
        if restarting and gw.reconnect_count == sessions and remaining > 0:
            if gw.connected or gw.reconnecting:
                await asyncio.sleep(0.2)  # not on the restarted gateway yet: what the old one reads is not the answer
                continue
            restarting, reopen = False, True  # the client gave up coming back by itself: a fresh session
        try:
            async with asyncio.timeout(max(5.0, remaining)):
                if reopen:  # a close the client does not come back from by itself (e.g. 4001 policy changed)
                    await gw.connect()
                live = _source_config(await gw.call("config.get"))
        except GatewayPinError:
            raise
        except (GatewayConnectionError, TimeoutError, UnavailableError) as err:
            if remaining <= 0:
                raise ApplicationError(f"the gateway did not answer within {budget_s:.0f}s of a config change "
                                       f"({lost}; then: {err})", type="GatewayNotReady", non_retryable=True) from None
            reopen = isinstance(err, GatewayConnectionError) and not err.retryable
            await asyncio.sleep(min(2.0, max(0.1, remaining)))
            continue
        if patch_applied(live, patch):
            log.info("config write confirmed from the gateway's config")
            return
        raise ApplicationError(f"the gateway did not keep the config change ({lost})", type="ConfigNotApplied")


async def push_config(settings: Settings, provider: VmProvider, vps: Vps, agent: Agent, *, budget_s: float) -> None:
    """Re-assert the locked-down config and write the workspace files through the admin identity.

    The owned sections are made *equal* to the rendered ones (keys the render does not have are
    deleted with merge-patch nulls, so a tampered `agents.entries.main.sandbox` goes too), keys
    whose presence weakens the lockdown elsewhere (`plugins.entries.<id>.enabled`, `dangerously*`)
    are deleted, and then the config is read back: if the lock check still finds anything, the
    push failed, whatever the gateway answered (LockdownViolation, final). `budget_s` bounds the
    wait for a gateway that is restarting (connect) and for one config write (`write_config`).
    """
    inp = render_input(settings, agent, local=vps.provider == "local")
    wanted = render.render_openclaw_config(inp)
    violations = render.check_locked(wanted)
    if violations:
        # Deterministic: retrying the same render cannot help, so it fails the operation at once.
        raise ApplicationError("refusing to push a config that weakens the lockdown: " + "; ".join(violations),
                               type="LockdownViolation", non_retryable=True)
    try:
        async with admin_session(provider, vps, agent, budget_s=budget_s) as gw:
            live = _source_config(await gw.config_get())
            patch, replace_paths = _patch_for(live, wanted)
            if patch:
                await write_config(gw, patch, budget_s=budget_s, replace_paths=replace_paths,
                                   note="slopbox: re-assert the lockdown", vm=(provider, vps))
            else:
                # Nothing to change (a fresh VM booted with this render): what was just read is the
                # read-back, on this same session; no second handshake (bench/README.md).
                _assert_locked(render.check_locked(live), vps, agent)
                await _write_workspace(gw, inp)
                return
    except GatewayPinError as err:
        raise pin_refused(err) from None
    # A fresh connection: removing a plugin or changing trusted proxies makes the gateway close
    # every socket (4001 "gateway policy changed"), and an in-process restart may follow.
    for attempt in range(1, READ_BACK_ATTEMPTS + 1):
        try:
            async with admin_client(provider, vps, agent, reconnect=False) as gw:
                _assert_locked(render.check_locked(_source_config(await gw.config_get())), vps, agent)
                await _write_workspace(gw, inp)
                return
        except GatewayPinError as err:  # another certificate: no reconnect makes it ours
            raise pin_refused(err) from None
        except GatewayConnectionError:
            if attempt == READ_BACK_ATTEMPTS:
                raise
            activity.heartbeat("reconnecting after the config push")
            await asyncio.sleep(2.0)


READ_BACK_ATTEMPTS = 5


def _assert_locked(remaining: list[str], vps: Vps, agent: Agent) -> None:
    if remaining:
        log.error("lockdown violation: vps %s (agent %s) still has %d weakened setting(s) after the "
                  "config push: %s", vps.id, agent.id, len(remaining), "; ".join(remaining))
        raise ApplicationError("the gateway config still weakens the lockdown after the push: "
                               + "; ".join(remaining), type="LockdownViolation", non_retryable=True)


async def _write_workspace(gw: GatewayClient, inp: render.AgentRenderInput) -> None:
    for name, text in render.render_workspace_files(inp).items():
        existing = await gw.agents_files_get("main", name)
        if (existing.get("file") or {}).get("content") != text:
            await gw.agents_files_set("main", name, text)


def _source_config(current: dict[str, Any]) -> dict[str, Any]:
    # `parsed` is the file as written (with ${VAR} references); `config` has secrets redacted.
    return current.get("parsed") or current.get("config") or {}


# The config sections we own and re-assert; the rest (channels, plugins, meta) is the gateway's,
# except for keys whose mere presence weakens the lockdown (render.lockdown_removals).
OWNED_SECTIONS = ("gateway", "agents", "tools", "hooks")


def _patch_for(live: dict[str, Any], wanted: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The merge patch that makes the owned sections of `live` equal to `wanted` and deletes the
    forbidden keys elsewhere; plus the array paths it shrinks or removes, which the gateway only
    accepts when named in `replacePaths`. Empty patch = nothing to do."""
    replace: list[str] = []
    patch: dict[str, Any] = {}
    for key in OWNED_SECTIONS:
        if key in wanted:
            change = _diff(live.get(key, _ABSENT), wanted[key], key, replace)
            if change is not _SAME:
                patch[key] = change
    for path in render.lockdown_removals(live):
        if path[0] in OWNED_SECTIONS:
            continue  # the exact diff above already removes it
        node = patch
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = None
            replace += array_paths(_lookup(live, path), ".".join(path))
    return patch, sorted(set(replace))


_ABSENT = object()
_SAME = object()


def _diff(live: Any, wanted: Any, path: str, replace: list[str]) -> Any:
    """Merge patch turning `live` into `wanted` (RFC 7396: null deletes), or _SAME."""
    if isinstance(wanted, dict) and isinstance(live, dict):
        out: dict[str, Any] = {}
        for key in live.keys() - wanted.keys():
            out[key] = None
            replace += array_paths(live[key], f"{path}.{key}")
        for key, value in wanted.items():
            change = _diff(live.get(key, _ABSENT), value, f"{path}.{key}", replace)
            if change is not _SAME:
                out[key] = change
        return out or _SAME
    if live is not _ABSENT and live == wanted and type(live) is type(wanted):
        return _SAME
    if live is not _ABSENT:
        replace += array_paths(live, path)
    return wanted



def _lookup(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node
