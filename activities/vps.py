"""VPS lifecycle activities. Each is idempotent and safe to retry.

Provider errors are translated here: retryable ones (429, 5xx, timeouts) become retryable
`ApplicationError`s that honour the provider's Retry-After; permanent ones fail fast with the
provider's own message. Secrets are read from the database inside the activity and never
returned to the workflow (so they never land in Temporal's history).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import gateway
from billing.plans import month_start
from db.models import Agent, Vps, VpsConfig, VpsState, VpsUsagePeriod
from providers import ProviderError, VmInfo, VmProvider, VmState, build_provider
from settings import Settings
from workflows.contracts import (
    Act,
    MarkStateInput,
    OperationInput,
    ReconcileInput,
    ReconcileReport,
    ReleaseInput,
    WaitInput,
)
from workflows.lifecycle import PROVISIONING_FAILED

log = logging.getLogger(__name__)
T = TypeVar("T")
BOOTSTRAP_TTL = timedelta(minutes=30)


def provider_failure(err: ProviderError) -> ApplicationError:
    delay = timedelta(seconds=err.retry_after_s) if err.retry_after_s else None
    return ApplicationError(str(err), type=type(err).__name__, non_retryable=not err.retryable,
                            next_retry_delay=delay)


def fail(message: str, kind: str = "VpsError") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


class VpsActivities:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession],
                 providers: dict[str, VmProvider] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self._providers: dict[str, VmProvider] = dict(providers or {})

    def all(self) -> list[Callable[..., Any]]:
        return [self.create_vm, self.wait_vm_running, self.wait_gateway_ready, self.pair_gateway,
                self.push_config, self.start_vm, self.stop_vm, self.destroy_vm, self.record_storage_usage,
                self.mark_state, self.release_operation, self.reconcile]

    def provider(self, kind: str) -> VmProvider:
        if kind not in self._providers:
            try:
                self._providers[kind] = build_provider(kind, self.settings)
            except ProviderError as err:
                raise provider_failure(err) from None
        return self._providers[kind]

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except ProviderError as err:
            raise provider_failure(err) from None

    async def _load(self, vps_id: str, step: str | None = None) -> tuple[Vps, Agent | None, VpsConfig]:
        """The VPS, its agent and its config in one query (every activity starts here)."""
        if step:
            await self._update(vps_id, step=step)
        async with self.sessions() as s:
            row = (await s.exec(
                select(Vps, VpsConfig, Agent)
                .join(VpsConfig, col(VpsConfig.id) == col(Vps.vps_config_id))
                .join(Agent, col(Agent.vps_id) == col(Vps.id), isouter=True)
                .where(Vps.id == vps_id))).first()
            if row is None:
                raise fail(f"VPS {vps_id} does not exist")
            vps, config, agent = row
            return vps, agent, config

    async def _update(self, vps_id: str, **values: Any) -> None:
        async with self.sessions() as s, s.begin():
            await s.exec(update(Vps).where(Vps.id == vps_id).values(**values))  # type: ignore[call-overload,arg-type]

    # --- bookkeeping -------------------------------------------------------------------------------

    @activity.defn(name=Act.mark_state)
    async def mark_state(self, inp: MarkStateInput) -> None:
        values: dict[str, Any] = {"state": inp.state, "state_changed_at": datetime.now(UTC),
                                  "last_error": inp.error, "step": None}
        if inp.state == VpsState.destroyed:
            values["destroyed_at"] = datetime.now(UTC)
        await self._update(inp.vps_id, **values)
        log.info("vps state", extra={"vps_id": inp.vps_id, "state": inp.state, "error": inp.error})

    @activity.defn(name=Act.release_operation)
    async def release_operation(self, inp: ReleaseInput) -> None:
        async with self.sessions() as s, s.begin():
            await s.exec(update(Vps).where(Vps.id == inp.vps_id, Vps.operation_id == inp.operation_id)  # type: ignore[call-overload,arg-type]
                         .values(operation_id=None, step=None))

    # --- provider calls ----------------------------------------------------------------------------

    @activity.defn(name=Act.create_vm)
    async def create_vm(self, inp: OperationInput) -> None:
        vps, agent, config = await self._load(inp.vps.vps_id, inp.step)
        if agent is None:
            raise fail("the VPS has no agent any more")
        provider = self.provider(vps.provider)
        if vps.provider_ref:
            existing = await self._call(lambda: provider.get(vps.provider_ref))  # type: ignore[arg-type]
            if existing is not None and existing.state != VmState.DELETED:
                return  # an earlier attempt got this far
        bootstrap = secrets.token_urlsafe(32)
        admin, relay = gateway.ensure_identities(vps)
        await self._update(
            vps.id, admin_device_key=admin, relay_device_key=relay,  # type: ignore[arg-type]
            bootstrap_token_sha256=hashlib.sha256(bootstrap.encode()).hexdigest(),
            bootstrap_expires_at=datetime.now(UTC) + BOOTSTRAP_TTL, bootstrap_redeemed_at=None,
        )
        spec = gateway.vm_spec(self.settings, vps, agent, config, bootstrap)
        info = await self._call(lambda: provider.create(spec))
        await self._save_info(vps.id, info)  # type: ignore[arg-type]

    async def _save_info(self, vps_id: Any, info: VmInfo) -> None:
        await self._update(vps_id, provider_ref=info.provider_ref, host=info.host,
                           gateway_port=info.gateway_port, region=info.location)

    @activity.defn(name=Act.wait_vm_running)
    async def wait_vm_running(self, inp: WaitInput) -> None:
        vps, _, _ = await self._load(inp.vps_id, inp.step)
        if not vps.provider_ref:
            raise fail("the VM was never created")
        provider = self.provider(vps.provider)
        want = VmState.RUNNING if inp.want == "running" else VmState.STOPPED
        deadline = time.monotonic() + inp.timeout_s
        last: VmInfo | None = None
        while time.monotonic() < deadline:
            activity.heartbeat(last.raw_state if last else None)
            last = await self._call(lambda: provider.get(vps.provider_ref))  # type: ignore[arg-type]
            if last is None or last.state == VmState.DELETED:
                raise fail(f"the VM disappeared at {vps.provider} while waiting for it to be {inp.want}")
            if last.state == want:
                await self._save_info(vps.id, last)
                return
            if last.state == VmState.ERROR:
                raise fail(f"the VM failed at {vps.provider}: {last.detail or last.raw_state}")
            await asyncio.sleep(inp.poll_interval_s)
        raise fail(f"the VM was not {inp.want} after {inp.timeout_s:.0f}s (last state: "
                   f"{last.raw_state if last else 'unknown'})", "Timeout")

    @activity.defn(name=Act.wait_gateway_ready)
    async def wait_gateway_ready(self, inp: WaitInput) -> None:
        vps, _, _ = await self._load(inp.vps_id, inp.step)
        url = gateway.base_url(self.provider(vps.provider), vps)
        deadline = time.monotonic() + inp.timeout_s
        last = "no answer yet"
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() < deadline:
                activity.heartbeat(last)
                try:
                    resp = await http.get(f"{url}/readyz")
                    if resp.status_code == 200:
                        return
                    last = f"/readyz answered {resp.status_code}"
                except httpx.HTTPError as err:
                    last = f"{type(err).__name__}"
                await asyncio.sleep(inp.poll_interval_s)
        raise fail(f"the gateway did not become ready within {inp.timeout_s:.0f}s ({last})", "GatewayNotReady")

    @activity.defn(name=Act.pair_gateway)
    async def pair_gateway(self, inp: OperationInput) -> None:
        vps, agent, _ = await self._load(inp.vps.vps_id, inp.step)
        if agent is None:
            raise fail("the VPS has no agent any more")
        device_token = await gateway.pair(self.settings, self.provider(vps.provider), vps, agent)
        if device_token:
            await self._update(vps.id, admin_device_token=device_token)

    @activity.defn(name=Act.push_config)
    async def push_config(self, inp: OperationInput) -> None:
        vps, agent, _ = await self._load(inp.vps.vps_id, inp.step)
        if agent is None:
            raise fail("the VPS has no agent any more")
        await gateway.push_config(self.settings, self.provider(vps.provider), vps, agent)

    @activity.defn(name=Act.start_vm)
    async def start_vm(self, inp: OperationInput) -> None:
        vps, _, _ = await self._load(inp.vps.vps_id, inp.step)
        provider = self.provider(vps.provider)
        await self._call(lambda: provider.start(vps.provider_ref))  # type: ignore[arg-type]

    @activity.defn(name=Act.stop_vm)
    async def stop_vm(self, inp: OperationInput) -> None:
        vps, _, _ = await self._load(inp.vps.vps_id, inp.step)
        provider = self.provider(vps.provider)
        await self._call(lambda: provider.stop(vps.provider_ref))  # type: ignore[arg-type]

    @activity.defn(name=Act.destroy_vm)
    async def destroy_vm(self, inp: OperationInput) -> None:
        """Destroy by reference, or by label when create failed before we saw the reference."""
        vps, _, _ = await self._load(inp.vps.vps_id, inp.step)
        provider = self.provider(vps.provider)
        refs = {vps.provider_ref} if vps.provider_ref else set()
        if not refs:
            managed = await self._call(provider.list_managed)
            refs = {vm.provider_ref for vm in managed if vm.vps_id == str(vps.id)}
        for ref in refs:
            await self._call(lambda r=ref: provider.destroy(r))  # type: ignore[misc]
        await self._update(vps.id, bootstrap_token_sha256=None)

    @activity.defn(name=Act.record_storage_usage)
    async def record_storage_usage(self, inp: OperationInput) -> None:
        """Make sure the month's usage row exists, with the storage allocation, before the VM goes.

        Only storage is recorded here. Bandwidth is added by the proxies as they carry it; CPU and
        memory from provider metrics are not collected yet (no metering workflow exists).
        """
        vps, _, config = await self._load(inp.vps.vps_id, inp.step)
        from sqlalchemy.dialects.postgresql import insert

        stmt = insert(VpsUsagePeriod).values(vps_id=vps.id, period_start=month_start(),
                                             storage_bytes=config.disk_gb * 1024**3)
        stmt = stmt.on_conflict_do_nothing(constraint="uq_vps_usage_periods_vps_month")
        async with self.sessions() as s, s.begin():
            await s.exec(stmt)  # type: ignore[call-overload]

    # --- reconcile ----------------------------------------------------------------------------------

    @activity.defn(name=Act.reconcile)
    async def reconcile(self, inp: ReconcileInput) -> ReconcileReport:
        report = ReconcileReport()
        now = datetime.now(UTC)
        async with self.sessions() as s:
            rows = (await s.exec(select(Vps).where(Vps.state != VpsState.destroyed))).all()
            known = {str(v.id): v for v in (await s.exec(select(Vps))).all()}
        kinds = sorted({v.provider for v in rows} | set(self.settings.configured_providers()))
        for kind in kinds:
            try:
                provider = self.provider(kind)
                managed = await provider.list_managed()
            except (ProviderError, ApplicationError) as err:
                report.errors.append(f"{kind}: {err}")
                continue
            by_ref = {vm.provider_ref: vm for vm in managed}
            for vm in managed:
                activity.heartbeat(vm.provider_ref)
                owner = known.get(vm.vps_id or "")
                orphan = owner is None or owner.state == VpsState.destroyed or (
                    owner.provider_ref not in (None, vm.provider_ref)) or (
                    # a failed provisioning whose compensation did not get through
                    owner.state == VpsState.error and owner.operation_id is None
                    and (owner.last_error or "").startswith(PROVISIONING_FAILED))
                old_enough = vm.created_at is None or (now - vm.created_at).total_seconds() >= inp.orphan_grace_s
                if orphan and old_enough:
                    await self._call(lambda r=vm.provider_ref, p=provider: p.destroy(r))  # type: ignore[misc]
                    report.orphans_destroyed.append(f"{kind}:{vm.provider_ref}")
            for vps in (v for v in rows if v.provider == kind):
                report.checked += 1
                if vps.operation_id is not None:
                    age = (now - (vps.created_at or now)).total_seconds()
                    if vps.state == VpsState.provisioning and age > inp.provisioning_deadline_s:
                        await self._fail_stuck(vps, provider, report)
                    continue  # an operation owns this VPS right now
                if vps.state == VpsState.provisioning:
                    await self._fail_stuck(vps, provider, report)
                    continue
                if vps.state not in (VpsState.running, VpsState.stopped) or not vps.provider_ref:
                    continue
                vm = by_ref.get(vps.provider_ref)
                if vm is None:
                    await self._update(vps.id, state=VpsState.error, state_changed_at=now,
                                       last_error="the VM was deleted outside Slopbox")
                    report.drift_fixed.append(f"{vps.id}: {vps.state} -> error (VM gone)")
                elif vps.state == VpsState.running and vm.state in (VmState.STOPPED, VmState.ERROR):
                    await self._update(vps.id, state=VpsState.stopped, state_changed_at=now,
                                       last_error=f"the VM was stopped outside Slopbox ({vm.raw_state or vm.state})")
                    report.drift_fixed.append(f"{vps.id}: running -> stopped")
                elif vm.state == VmState.RUNNING and vps.state == VpsState.stopped:
                    await self._update(vps.id, state=VpsState.running, state_changed_at=now, last_error=None)
                    report.drift_fixed.append(f"{vps.id}: stopped -> running")
        log.info("reconciled", extra=report.model_dump())
        return report

    async def _fail_stuck(self, vps: Vps, provider: VmProvider, report: ReconcileReport) -> None:
        if vps.provider_ref:
            await self._call(lambda: provider.destroy(vps.provider_ref))  # type: ignore[arg-type]
        await self._update(vps.id, state=VpsState.error, state_changed_at=datetime.now(UTC), operation_id=None,
                           step=None, last_error="provisioning did not finish before its deadline")
        report.stuck_failed.append(str(vps.id))
