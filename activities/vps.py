"""VPS lifecycle activities. Each is idempotent and safe to retry.

Provider errors are translated here: retryable ones (429, 5xx, timeouts) become retryable
`ApplicationError`s that honour the provider's Retry-After; permanent ones fail fast with the
provider's own message. Secrets are read from the database inside the activity and never
returned to the workflow (so they never land in Temporal's history).

Every activity heartbeats while it works (a background ticker), so a worker that dies is noticed
within the heartbeat timeout rather than the activity's whole budget. Each records its step on
its operation's row; state changes are compare-and-set on the states the workflow expects.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from sqlalchemy import exists, func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import gateway
from db.models import ACTIVE_OPERATION, Agent, Vps, VpsConfig, VpsOperation, VpsState
from openclaw.tls import CertificatePinError, check_peer, pinned_context
from providers import ProviderError, VmInfo, VmProvider, VmState, build_provider
from settings import Settings
from telemetry.metrics import OPERATIONS_FINISHED, PROVIDER_ERRORS

if TYPE_CHECKING:
    from activities.metering import MeteringActivities
from workflows.contracts import (
    Act,
    FinishInput,
    OperationInput,
    OperationKind,
    OperationResult,
    OperationStatus,
    ReconcileInput,
    ReconcileReport,
    WaitInput,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
BOOTSTRAP_TTL = timedelta(minutes=30)
HEARTBEAT_EVERY_S = 2.0


def provider_failure(err: ProviderError) -> ApplicationError:
    PROVIDER_ERRORS.labels(provider=err.provider or "unknown", code=str(err.status or err.code or "error")).inc()
    delay = timedelta(seconds=err.retry_after_s) if err.retry_after_s else None
    return ApplicationError(str(err), type=type(err).__name__, non_retryable=not err.retryable,
                            next_retry_delay=delay)


def fail(message: str, kind: str = "VpsError") -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


@asynccontextmanager
async def heartbeating(every_s: float = HEARTBEAT_EVERY_S) -> AsyncIterator[None]:
    """Heartbeat in the background while the body awaits one long call (an HTTP request, a provider
    submit): the heartbeat timeout then measures the worker's life, not the call's length."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()


def no_active_operation() -> Any:
    """SQL guard for writes outside an operation (Reconcile): only when no operation owns the VPS."""
    return ~exists().where(col(VpsOperation.vps_id) == col(Vps.id), col(VpsOperation.status).in_(ACTIVE_OPERATION))


class VpsActivities:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession],
                 providers: dict[str, VmProvider] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self._providers: dict[str, VmProvider] = dict(providers or {})
        self._metering: MeteringActivities | None = None

    def all(self) -> list[Callable[..., Any]]:
        return [self.create_vm, self.wait_vm_running, self.wait_gateway_ready, self.pair_gateway,
                self.push_config, self.start_vm, self.stop_vm, self.destroy_vm, self.record_storage_usage,
                self.finish_operation, self.reconcile]

    def provider(self, kind: str) -> VmProvider:
        if kind not in self._providers:
            try:
                self._providers[kind] = build_provider(kind, self.settings)
            except ProviderError as err:
                raise provider_failure(err) from None
        return self._providers[kind]

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            async with heartbeating():
                return await fn()
        except ProviderError as err:
            raise provider_failure(err) from None

    async def _load(self, inp: OperationInput | WaitInput) -> tuple[Vps, Agent | None, VpsConfig]:
        """Record the step on the operation's row, then load the VPS, its agent and its config.

        An operation's first activity also creates its row when the API could not (it crashed or
        lost the database after Temporal accepted the operation): no run goes unrecorded.
        """
        now = datetime.now(UTC)
        async with self.sessions() as s, s.begin():
            if isinstance(inp, OperationInput):
                upsert = insert(VpsOperation).values(
                    id=inp.operation_id, vps_id=inp.vps.vps_id, user_id=inp.vps.user_id, kind=inp.operation,
                    status=OperationStatus.running, step=inp.step, started_at=now)
                await s.exec(upsert.on_conflict_do_update(  # type: ignore[call-overload]
                    index_elements=["id"], where=col(VpsOperation.status).in_(ACTIVE_OPERATION),
                    set_={"status": OperationStatus.running, "step": inp.step,
                          "started_at": func.coalesce(col(VpsOperation.started_at), upsert.excluded.started_at)}))
            else:
                await s.exec(update(VpsOperation).where(  # type: ignore[call-overload]
                    col(VpsOperation.id) == inp.operation_id, col(VpsOperation.status).in_(ACTIVE_OPERATION))
                    .values(status=OperationStatus.running, step=inp.step))
            vps_id = inp.vps.vps_id if isinstance(inp, OperationInput) else inp.vps_id
            row = (await s.exec(
                select(Vps, VpsConfig, Agent)
                .join(VpsConfig, col(VpsConfig.id) == col(Vps.vps_config_id))
                .join(Agent, col(Agent.vps_id) == col(Vps.id), isouter=True)
                .where(Vps.id == vps_id))).first()
            if row is None:
                raise fail(f"VPS {vps_id} does not exist")
            vps, config, agent = row
            return vps, agent, config

    async def _update(self, vps_id: Any, **values: Any) -> None:
        async with self.sessions() as s, s.begin():
            await s.exec(update(Vps).where(Vps.id == vps_id).values(**values))  # type: ignore[call-overload,arg-type]

    async def _observed(self, vps_id: Any, info: VmInfo | None) -> None:
        values: dict[str, Any] = {"observed_state": info.state if info else VmState.DELETED,
                                  "observed_at": datetime.now(UTC)}
        if info is not None:
            values.update(provider_ref=info.provider_ref, host=info.host, gateway_port=info.gateway_port,
                          region=info.location)
        await self._update(vps_id, **values)

    # --- bookkeeping -------------------------------------------------------------------------------

    @activity.defn(name=Act.finish_operation)
    async def finish_operation(self, inp: FinishInput) -> OperationResult:
        """The operation's outcome and, for lifecycle operations, the VPS state: compare-and-set on the
        states the workflow expects, in one transaction. A state that moved underneath is reported."""
        now = datetime.now(UTC)
        status, error, state = inp.status, inp.error, inp.state
        async with self.sessions() as s, s.begin():
            if inp.state is not None:
                values: dict[str, Any] = {"state": inp.state, "state_changed_at": now, "last_error": inp.last_error}
                if inp.needs_cleanup is not None:
                    values["needs_cleanup"] = inp.needs_cleanup
                if inp.state == VpsState.destroyed:
                    values["destroyed_at"] = now
                    values["bootstrap_token"] = None
                changed = (await s.exec(update(Vps).where(  # type: ignore[call-overload]
                    col(Vps.id) == inp.vps_id, col(Vps.state).in_(inp.expect)).values(**values)
                    .returning(col(Vps.id)))).first()
                if changed is None:
                    state = (await s.exec(select(Vps.state).where(Vps.id == inp.vps_id))).first()
                    status = OperationStatus.failed
                    error = (f"{error}; " if error else "") + (
                        f"the VPS was {state} when {inp.operation} finished, not {' or '.join(inp.expect)}; "
                        "its state was left as is")
                    log.warning("state changed underneath", extra={"vps_id": inp.vps_id, "state": state,
                                                                   "operation_id": inp.operation_id})
            elif inp.needs_cleanup is not None:
                await s.exec(update(Vps).where(col(Vps.id) == inp.vps_id)  # type: ignore[call-overload]
                             .values(needs_cleanup=inp.needs_cleanup))
            row = {"status": status, "error": error, "finished_at": now, "step": None, "retrying": None}
            upsert = insert(VpsOperation).values(id=inp.operation_id, vps_id=inp.vps_id, user_id=inp.user_id,
                                                 kind=inp.operation, **row)
            await s.exec(upsert.on_conflict_do_update(index_elements=["id"], set_=row))  # type: ignore[call-overload]
        OPERATIONS_FINISHED.labels(kind=str(inp.operation), status=str(status)).inc()  # after the commit
        log.info("operation finished", extra={"vps_id": inp.vps_id, "operation_id": inp.operation_id,
                                              "status": status, "state": state, "error": error})
        return OperationResult(vps_id=inp.vps_id, operation_id=inp.operation_id, status=status, state=state,
                               error=error)

    # --- provider calls ----------------------------------------------------------------------------

    @activity.defn(name=Act.create_vm)
    async def create_vm(self, inp: OperationInput) -> None:
        """Submit the VM (or adopt the one an earlier attempt made). The bootstrap token is minted once
        per VPS and kept encrypted until redeemed, so the VM a retry adopts holds the same token."""
        vps, agent, config = await self._load(inp)
        if agent is None:
            raise fail("the VPS has no agent any more")
        provider = self.provider(vps.provider)
        if vps.provider_ref:
            existing = await self._call(lambda: provider.get(vps.provider_ref))  # type: ignore[arg-type]
            if existing is not None and existing.state != VmState.DELETED:
                return  # an earlier attempt got this far
        if not vps.bootstrap_token and vps.bootstrap_token_sha256 and vps.bootstrap_redeemed_at:
            # An earlier attempt's VM (its create answer was lost) has already redeemed this VPS's
            # token: adopt that VM. A new token would make its ready report, and with it the pin of
            # its gateway certificate, unknown (401).
            managed = await self._call(provider.list_managed)
            mine = next((vm for vm in managed if vm.vps_id == str(vps.id) and vm.state != VmState.DELETED), None)
            if mine is not None:
                await self._observed(vps.id, mine)
                return
        bootstrap = str(vps.bootstrap_token) if vps.bootstrap_token else secrets.token_urlsafe(32)
        if not vps.bootstrap_token:
            admin, relay = gateway.ensure_identities(vps)
            await self._update(
                vps.id, admin_device_key=admin, relay_device_key=relay, bootstrap_token=bootstrap,
                bootstrap_token_sha256=hashlib.sha256(bootstrap.encode()).hexdigest(),
                bootstrap_expires_at=datetime.now(UTC) + BOOTSTRAP_TTL, bootstrap_redeemed_at=None,
            )
            vps.admin_device_key, vps.relay_device_key = admin, relay
        spec = gateway.vm_spec(self.settings, vps, agent, config, bootstrap)
        info = await self._call(lambda: provider.create(spec))
        await self._observed(vps.id, info)

    @activity.defn(name=Act.wait_vm_running)
    async def wait_vm_running(self, inp: WaitInput) -> None:
        vps, _, _ = await self._load(inp)
        provider = self.provider(vps.provider)
        ref = vps.provider_ref or await self._find_ref(provider, str(vps.id))
        if not ref:
            raise fail("the VM was never created")
        want = VmState.RUNNING if inp.want == "running" else VmState.STOPPED
        started = time.monotonic()
        deadline = started + inp.timeout_s
        forced = False
        last: VmInfo | None = None
        while time.monotonic() < deadline:
            try:
                last = await self._call(lambda: provider.get(ref))
            except ApplicationError as err:
                # A 429/5xx while waiting is waited out here, until the deadline: the poll's own
                # retries are for a lost worker, and a run of hiccups must not fail the operation.
                if err.non_retryable:
                    raise
                pause = err.next_retry_delay.total_seconds() if err.next_retry_delay else inp.poll_interval_s
                activity.heartbeat(f"{vps.provider}: {err.message}")
                await asyncio.sleep(max(0.0, min(max(pause, inp.poll_interval_s), deadline - time.monotonic())))
                continue
            if last is None or last.state == VmState.DELETED:
                await self._observed(vps.id, None)
                raise fail(f"the VM disappeared at {vps.provider} while waiting for it to be {inp.want}")
            # A VM whose last create/start failed is powered off: for a stop, that is stopped.
            if last.state == want or (want == VmState.STOPPED and last.state == VmState.ERROR):
                await self._observed(vps.id, last)
                return
            if want == VmState.STOPPED and not forced and time.monotonic() - started > inp.timeout_s / 2:
                # The graceful shutdown was ignored for half the budget: power it off.
                await self._call(lambda: provider.force_stop(ref))
                forced = True
            if last.state == VmState.ERROR:
                await self._observed(vps.id, last)
                raise fail(f"the VM failed at {vps.provider}: {last.detail or last.raw_state}")
            activity.heartbeat(last.raw_state)
            await asyncio.sleep(inp.poll_interval_s)
        raise fail(f"the VM was not {inp.want} after {inp.timeout_s:.0f}s (last state: "
                   f"{last.raw_state if last else 'unknown'})", "Timeout")

    async def _find_ref(self, provider: VmProvider, vps_id: str) -> str | None:
        """The VM made for this VPS, by its label, when create's answer was lost before we saw it."""
        managed = await self._call(provider.list_managed)
        return next((vm.provider_ref for vm in managed if vm.vps_id == vps_id and vm.state != VmState.DELETED), None)

    @activity.defn(name=Act.wait_gateway_ready)
    async def wait_gateway_ready(self, inp: WaitInput) -> None:
        """Poll `/readyz`; on a cloud VM over https, trusting only the certificate its VM reported.

        The pin arrives with the VM's ready report (`/bootstrap/ready`), so until then we wait. A
        certificate other than the pinned one fails the operation at once (someone else answers at
        that address), and so does a VM the provider says is down (`gateway.unless_vm_down`: a gateway
        that crashed at boot). When ready, the URL is stored on the row: the proxy reads it from there.
        """
        vps, _, _ = await self._load(inp)
        provider = self.provider(vps.provider)
        await gateway.unless_vm_down(provider, vps, self._until_ready(inp, vps, gateway.base_url(provider, vps)))

    async def _until_ready(self, inp: WaitInput, vps: Vps, url: str) -> None:
        deadline = time.monotonic() + inp.timeout_s
        last = "no answer yet"
        context = pinned_context()
        async with httpx.AsyncClient(timeout=5, verify=context, trust_env=False) as http:
            while time.monotonic() < deadline:
                activity.heartbeat(last)
                pin = None
                if url.startswith("https://"):
                    if vps.gateway_cert_sha256 is None:
                        vps, _, _ = await self._load(inp)
                    pin = vps.gateway_cert_sha256
                    if pin is None:
                        last = "the VM has not reported ready with its certificate yet"
                        await asyncio.sleep(inp.poll_interval_s)
                        continue
                try:
                    resp = await http.get(f"{url}/readyz")
                    if pin is not None:
                        stream = resp.extensions.get("network_stream")
                        check_peer(stream.get_extra_info("ssl_object") if stream else None, pin)
                    if resp.status_code == 200:
                        await self._update(vps.id, gateway_url=url)
                        return
                    last = f"/readyz answered {resp.status_code}"
                except CertificatePinError as err:
                    raise fail(f"refused the gateway's TLS certificate: {err}", "CertificatePinMismatch") from None
                except httpx.HTTPError as err:
                    last = f"{type(err).__name__}"
                await asyncio.sleep(inp.poll_interval_s)
        raise fail(f"the gateway did not become ready within {inp.timeout_s:.0f}s ({last})", "GatewayNotReady")

    @activity.defn(name=Act.pair_gateway)
    async def pair_gateway(self, inp: OperationInput) -> None:
        vps, agent, _ = await self._load(inp)
        if agent is None:
            raise fail("the VPS has no agent any more")
        provider = self.provider(vps.provider)
        async with heartbeating():
            admin_token, relay_token = await gateway.unless_vm_down(provider, vps, gateway.pair(
                self.settings, provider, vps, agent, budget_s=inp.timeouts.pairing_s))
        tokens = {"admin_device_token": admin_token, "relay_device_token": relay_token}
        if any(tokens.values()):
            await self._update(vps.id, **{k: v for k, v in tokens.items() if v})

    @activity.defn(name=Act.push_config)
    async def push_config(self, inp: OperationInput) -> None:
        """Push settings and re-assert the lockdown; records which settings version the gateway holds."""
        vps, agent, _ = await self._load(inp)
        if agent is None:
            raise fail("the VPS has no agent any more")
        if inp.operation == OperationKind.settings and vps.state != VpsState.running:
            raise fail(f"the agent is not running (its VPS is {vps.state})", "NotRunning")
        version = agent.settings_version
        async with heartbeating():
            await gateway.push_config(self.settings, self.provider(vps.provider), vps, agent,
                                      budget_s=inp.timeouts.gateway_ready_s)
        await self._update(vps.id, applied_settings_version=version)

    @activity.defn(name=Act.start_vm)
    async def start_vm(self, inp: OperationInput) -> None:
        vps, _, _ = await self._load(inp)
        if not vps.provider_ref:
            raise fail("the VPS has no VM to start; destroy it and create a new one")
        provider = self.provider(vps.provider)
        await self._call(lambda: provider.start(vps.provider_ref))  # type: ignore[arg-type]

    @activity.defn(name=Act.stop_vm)
    async def stop_vm(self, inp: OperationInput) -> None:
        vps, _, _ = await self._load(inp)
        if not vps.provider_ref:
            raise fail("the VPS has no VM to stop")
        provider = self.provider(vps.provider)
        await self._call(lambda: provider.stop(vps.provider_ref))  # type: ignore[arg-type]

    @activity.defn(name=Act.destroy_vm)
    async def destroy_vm(self, inp: OperationInput) -> None:
        """Destroy by reference and by label (create may have failed before we saw the reference),
        then poll until the provider no longer has it."""
        vps, _, _ = await self._load(inp)
        provider = self.provider(vps.provider)
        gone = await self._remove_vms(provider, vps, inp.timeouts.vm_gone_s, inp.timeouts.poll_interval_s)
        if not gone:
            raise ApplicationError(f"the VM was still there {inp.timeouts.vm_gone_s:.0f}s after it was destroyed",
                                   type="VmNotGone")
        await self._update(vps.id, bootstrap_token_sha256=None, bootstrap_token=None,
                           observed_state=VmState.DELETED, observed_at=datetime.now(UTC))

    async def _remove_vms(self, provider: VmProvider, vps: Vps, timeout_s: float, poll_s: float) -> bool:
        managed = await self._call(provider.list_managed)
        refs = {vm.provider_ref for vm in managed if vm.vps_id == str(vps.id)}
        if vps.provider_ref:
            refs.add(vps.provider_ref)
        for ref in refs:
            await self._call(lambda r=ref: provider.destroy(r))  # type: ignore[misc]
        deadline = time.monotonic() + timeout_s
        while refs:
            for ref in list(refs):
                info = await self._call(lambda r=ref: provider.get(r))  # type: ignore[misc]
                if info is None or info.state == VmState.DELETED:
                    refs.discard(ref)
            if not refs or time.monotonic() >= deadline:
                break
            activity.heartbeat(f"waiting for {len(refs)} VM(s) to go")
            await asyncio.sleep(poll_s)
        return not refs

    @activity.defn(name=Act.record_storage_usage)
    async def record_storage_usage(self, inp: OperationInput) -> None:
        """The VPS's final metering collection, while its VM still exists (a provider serves no metrics
        for a deleted VM): CPU, memory, bandwidth and storage up to now, through the same exactly-once
        ledger as `MeteringCycle`; storage accrues on to `destroyed_at` in the next cycle."""
        vps, _, _ = await self._load(inp)
        report = await self._meter().collect_now(str(vps.id), int(time.time()))
        if report.failed:
            raise ApplicationError(f"the final usage collection failed: {report.failed[0].reason}",
                                   type="CollectionFailed")

    def _meter(self) -> MeteringActivities:
        from activities.metering import MeteringActivities  # it imports this module's heartbeating

        if self._metering is None:
            self._metering = MeteringActivities(self.settings, self.sessions.kw["bind"])
        return self._metering

    # --- reconcile ----------------------------------------------------------------------------------

    @activity.defn(name=Act.reconcile)
    async def reconcile(self, inp: ReconcileInput) -> ReconcileReport:
        """Converge every VPS with no operation in flight to what its provider reports.

        Orphans (VMs no live VPS owns) are destroyed; `needs_cleanup` VMs are destroyed; `error`
        converges to running or stopped from the observed VM; running/stopped follow drift; a
        `provisioning` VPS with nothing in flight has failed. Each write is a compare-and-set on the
        state read, guarded by "no operation queued or running", so it never races an operation.
        """
        report = ReconcileReport()
        now = datetime.now(UTC)
        await self._expire_operations(now, inp, report)
        async with self.sessions() as s:
            known = {str(v.id): v for v in (await s.exec(select(Vps))).all()}
            busy = set((await s.exec(select(VpsOperation.vps_id).where(
                col(VpsOperation.status).in_(ACTIVE_OPERATION)))).all())
        live = [v for v in known.values() if v.state != VpsState.destroyed]
        kinds = sorted({v.provider for v in live} | set(self.settings.configured_providers()))
        for kind in kinds:
            try:
                provider = self.provider(kind)
                managed = await self._call(provider.list_managed)
            except (ProviderError, ApplicationError) as err:
                report.errors.append(f"{kind}: {err}")  # unavailable is not "gone": change nothing
                continue
            for vm in managed:
                activity.heartbeat(vm.provider_ref)
                owner = known.get(vm.vps_id or "")
                orphan = owner is None or owner.state == VpsState.destroyed or (
                    owner.provider_ref not in (None, vm.provider_ref))
                old_enough = vm.created_at is None or (now - vm.created_at).total_seconds() >= inp.orphan_grace_s
                if orphan and (old_enough or (owner is not None and owner.state == VpsState.destroyed)):
                    try:
                        await self._call(lambda r=vm.provider_ref, p=provider: p.destroy(r))  # type: ignore[misc]
                        report.orphans_destroyed.append(f"{kind}:{vm.provider_ref}")
                    except ApplicationError as err:
                        report.errors.append(f"{kind}:{vm.provider_ref}: {err}")
            for vps in (v for v in live if v.provider == kind and v.id not in busy):
                report.checked += 1
                try:
                    await self._converge(vps, provider, managed, now, inp, report)
                except ApplicationError as err:
                    report.errors.append(f"{vps.id}: {err}")
        log.info("reconciled", extra=report.model_dump())
        return report

    async def _expire_operations(self, now: datetime, inp: ReconcileInput, report: ReconcileReport) -> None:
        """Runs time out at `operation_s`; a row still active long after is from a run that died unrecorded."""
        cutoff = now - timedelta(seconds=inp.operation_deadline_s)
        async with self.sessions() as s, s.begin():
            expired = (await s.exec(update(VpsOperation).where(  # type: ignore[call-overload]
                col(VpsOperation.status).in_(ACTIVE_OPERATION), col(VpsOperation.created_at) < cutoff)
                .values(status=OperationStatus.failed, finished_at=now, step=None,
                        error="the operation did not finish within its time limit")
                .returning(col(VpsOperation.id)))).all()
        report.operations_expired.extend(str(row[0]) for row in expired)

    async def _set_if(self, vps: Vps, **values: Any) -> bool:
        """Compare-and-set on the state we read, only while no operation owns the VPS."""
        async with self.sessions() as s, s.begin():
            done = (await s.exec(update(Vps).where(  # type: ignore[call-overload]
                col(Vps.id) == vps.id, col(Vps.state) == vps.state, no_active_operation())
                .values(**values).returning(col(Vps.id)))).first()
        return done is not None

    async def _converge(self, vps: Vps, provider: VmProvider, managed: list[VmInfo], now: datetime,
                        inp: ReconcileInput, report: ReconcileReport) -> None:
        vm = next((m for m in managed if vps.provider_ref and m.provider_ref == vps.provider_ref), None) or next(
            (m for m in managed if m.vps_id == str(vps.id)), None)
        observed = vm.state if vm is not None else VmState.DELETED
        seen = {"observed_state": observed, "observed_at": now}
        if vps.needs_cleanup or vps.state == VpsState.provisioning:
            age = (now - (vps.created_at or now)).total_seconds()
            if vps.state == VpsState.provisioning and age < inp.provisioning_deadline_s:
                return  # the API made it a moment ago; its operation row may not be written yet
            gone = await self._remove_vms(provider, vps, timeout_s=0, poll_s=0)
            values: dict[str, Any] = {**seen, "needs_cleanup": not gone}
            if vps.state == VpsState.provisioning:
                values.update(state=VpsState.error, state_changed_at=now,
                              last_error="provisioning did not finish; the VM was removed")
            if gone:
                values["observed_state"] = VmState.DELETED
            if await self._set_if(vps, **values):
                (report.stuck_failed if vps.state == VpsState.provisioning else report.cleaned_up).append(str(vps.id))
            return
        change: dict[str, Any] = {}
        if vps.state == VpsState.error:
            if observed == VmState.RUNNING:
                change = {"state": VpsState.running, "last_error": None}
            elif observed == VmState.STOPPED:
                change = {"state": VpsState.stopped, "last_error": None}
        elif vps.state in (VpsState.running, VpsState.stopped):
            if observed == VmState.DELETED:
                change = {"state": VpsState.error, "last_error": "the VM was deleted outside Slopbox; destroy "
                          "this VPS and create a new one"}
            elif vps.state == VpsState.running and observed in (VmState.STOPPED, VmState.ERROR):
                change = {"state": VpsState.stopped, "last_error": f"the VM was stopped outside Slopbox "
                          f"({vm.raw_state if vm else observed})"}
            elif vps.state == VpsState.stopped and observed == VmState.RUNNING:
                change = {"state": VpsState.running, "last_error": None}
        if change:
            change["state_changed_at"] = now
        if await self._set_if(vps, **seen, **change) and change:
            report.drift_fixed.append(f"{vps.id}: {vps.state} -> {change['state']} (VM {observed})")
