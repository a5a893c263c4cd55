"""Control-plane overhead of provisioning: POST /agents/{id}/vps -> `running`, minus provider time.

Runs the real API (in-process ASGI), a real Temporal dev server, a real worker and an embedded
PostgreSQL; VMs are local gateway-simulator processes. For each VPS:

  total     = the VPS row's `running` timestamp - the moment the POST was sent
  provider  = time inside create_vm + wait_vm_running + wait_gateway_ready (the VM booting),
              read from the workflow history (activity started -> completed)
  overhead  = total - provider, split into gateway RPC (pairing + config push, which also waits on
              the gateway's CPU) and the rest (API, Temporal scheduling, database bookkeeping)

The baseline is one provision alone, measured in the same run; 50 concurrent provisions are
reported as a ratio against it. Usage: `.venv/bin/python -m bench.provision [--concurrency 50]`.

`BENCH_TRACING=1` turns tracing on (the SDK's in-memory exporter), to measure what it costs.
`BENCH_PROFILE=file.prof` writes a cProfile of the event loop thread during the concurrent round.

CPU seconds per provision, per process (much steadier than wall time on a shared machine): from
the moment the round's POSTs start to the moment its last VPS is running, divided by the round's
size. The benchmark process holds the API, the worker and the in-process VMs; its CPU is split by
thread: the main thread (API requests, activities, the workflow sandbox's per-run set-up and
activations, in-process gateways, the benchmark's own polling), the other Python threads (the rest
of the workflow activations) and the Temporal SDK core's Rust threads (gRPC, task polling). The
Temporal dev server, PostgreSQL (postmaster and backends) and the gateway processes are the
benchmark's child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from cryptography.fernet import Fernet
from temporalio.api.enums.v1 import EventType
from temporalio.worker import Worker

from activities.agent_ops import AgentActivities as VpsActivities
from api.app import create_app
from bench.stack import standalone_stack
from db.engine import make_engine, session_factory
from gateway_simulator.server import run_simulator
from providers import VmInfo, VmProvider, VmSpec, VmState
from settings import Settings
from worker import worker_options
from workflows import WORKFLOWS
from workflows.contracts import LifecycleTimeouts

PROVIDER_ACTIVITIES = {"vps.create_vm", "vps.wait_vm_running", "vps.wait_gateway_ready"}
GATEWAY_RPC_ACTIVITIES = {"vps.pair_gateway", "vps.push_config"}
KEY = "bench-key-" + "k" * 40
# The production worker's options (worker.py), with these replaced: BENCH_WORKER='{"max_...": 10}'
# (JSON) tries other tuning without editing code; "sandbox": "default" is the sandbox without our
# passthrough modules, "none" runs workflows unsandboxed (to measure what the sandbox costs).
WORKER_OVERRIDES: dict[str, Any] = json.loads(os.environ.get("BENCH_WORKER", "{}"))
_SANDBOX = WORKER_OVERRIDES.pop("sandbox", None)
if _SANDBOX == "none":
    from temporalio.worker import UnsandboxedWorkflowRunner

    WORKER_OVERRIDES["workflow_runner"] = UnsandboxedWorkflowRunner()
elif _SANDBOX == "default":
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

    WORKER_OVERRIDES["workflow_runner"] = SandboxedWorkflowRunner()


class InProcessVms(VmProvider):
    """VMs that cost no process start: gateway simulators inside this event loop.

    With real local processes, 50 Python gateways booting at once saturate both cores and every
    number measures CPU starvation. Here the provider time is near zero, so what remains is the
    control plane's own work: API, Temporal, database, pairing and config push.
    """

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vms: dict[str, tuple[Any, Any]] = {}

    async def create(self, spec: VmSpec) -> VmInfo:
        if spec.vps_id not in self.vms:
            config = json.loads(spec.files["openclaw.json"])
            env = {**os.environ, **{k: v.get_secret_value() for k, v in spec.secret_env.items()}}
            cm = run_simulator(self.root / spec.vps_id, port=0, token=env["OPENCLAW_GATEWAY_TOKEN"], config=config,
                               env=env)
            self.vms[spec.vps_id] = (cm, await cm.__aenter__())
        return self._info(spec.vps_id)

    def _info(self, ref: str) -> VmInfo:
        return VmInfo(provider="local", provider_ref=ref, vps_id=ref, state=VmState.RUNNING, host="127.0.0.1",
                      gateway_port=self.vms[ref][1].port)

    async def get(self, ref: str) -> VmInfo | None:
        return self._info(ref) if ref in self.vms else None

    async def start(self, ref: str) -> None:
        return None

    async def stop(self, ref: str) -> None:
        return None

    async def destroy(self, ref: str) -> None:
        if ref in self.vms:
            cm, _ = self.vms.pop(ref)
            await cm.__aexit__(None, None, None)

    async def list_managed(self) -> list[VmInfo]:
        return [self._info(ref) for ref in self.vms]

    def gateway_url(self, info: VmInfo) -> str:
        return f"http://{info.host}:{info.gateway_port}"


async def activity_seconds(client, workflow_id: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Seconds spent inside each activity type (started -> completed), from the run's history."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    scheduled: dict[int, str] = {}
    started: dict[int, float] = {}
    spent: dict[str, float] = {}
    for event in history.events:
        ts = event.event_time.ToDatetime().timestamp()
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started[event.activity_task_started_event_attributes.scheduled_event_id] = ts
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            sched = event.activity_task_completed_event_attributes.scheduled_event_id
            name = scheduled[sched]
            spent[name] = spent.get(name, 0.0) + ts - started[sched]
    return spent


async def temporal_work(client, operation_id: str, vps_id: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """What the Temporal server persisted for one provision: history events of the operation's run and
    of the VPS's entity run (up to now), and the workflow and activity tasks among them."""
    counts = {"events": 0, "workflow_tasks": 0, "activity_tasks": 0}
    for workflow_id in (operation_id, f"vps-{vps_id}"):
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        counts["events"] += len(history.events)
        for event in history.events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                counts["workflow_tasks"] += 1
            elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                counts["activity_tasks"] += 1
    return counts


Row = tuple[float, float, float]  # total, provider, gateway RPC (pairing + config push)
CpuSample = dict[str, float]


def _tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and all its descendants, live or reaped (reaped ones are in its
    children_* times, live ones are counted by recursion, so none is counted twice)."""
    try:
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        return total + sum(_tree_cpu(c) for c in proc.children())
    except psutil.NoSuchProcess:
        return 0.0


class CpuMeter:
    """CPU seconds by part: this process's threads, and its child process trees by what they are."""

    def __init__(self, postgres_pid: int) -> None:
        self.me = psutil.Process()
        self.postgres_pid = postgres_pid

    def _thread_kinds(self) -> dict[int, str]:
        import threading

        kinds = {}
        for thread in threading.enumerate():
            if thread.native_id is None:
                continue
            if thread is threading.main_thread():
                kinds[thread.native_id] = "main thread"
            else:
                kinds[thread.native_id] = "workflow threads"  # temporalio's workflow task executor
        return kinds

    def sample(self) -> CpuSample:
        out: CpuSample = {"main thread": 0.0, "workflow threads": 0.0, "temporal core": 0.0}
        kinds = self._thread_kinds()
        for thread in self.me.threads():
            # Threads Python does not know are the SDK core's (Rust) and its gRPC runtime.
            out[kinds.get(thread.id, "temporal core")] += thread.user_time + thread.system_time
        out["temporal server"] = out["postgresql"] = out["gateway processes"] = 0.0
        for child in self.me.children():
            try:
                name = " ".join(child.cmdline()[:2])
            except psutil.NoSuchProcess:
                continue
            kind = ("postgresql" if child.pid == self.postgres_pid else
                    "temporal server" if "temporal" in name else "gateway processes")
            out[kind] += _tree_cpu(child)
        # Gateways that exited since (destroyed VMs) were reaped into this process's children times.
        t = self.me.cpu_times()
        out["gateway processes"] += t.children_user + t.children_system
        return out


CONTROL_PLANE = ("main thread", "workflow threads", "temporal core", "temporal server", "postgresql")


def cpu_per_provision(before: CpuSample, after: CpuSample, n: int) -> CpuSample:
    per = {k: (after[k] - before[k]) / n for k in after}
    per["control plane"] = sum(per[k] for k in CONTROL_PLANE)
    return per


def print_cpu(label: str, per: CpuSample) -> None:
    parts = "  ".join(f"{k} {v * 1000:.0f}" for k, v in per.items()
                      if k != "control plane" and not k.endswith(" per provision"))
    print(f"{label:>14}: CPU ms per provision: control plane {per['control plane'] * 1000:.0f} = {parts}")
    events = per.get("temporal events per provision")
    if events:
        print(f"{label:>14}: Temporal per provision: {events:.0f} history events (operation + entity), "
              f"{per['temporal workflow_tasks per provision']:.1f} workflow tasks, "
              f"{per['temporal activity_tasks per provision']:.1f} activity tasks; server CPU "
              f"{per['temporal server'] * 1e6 / events:.0f} µs per event")


async def run_round(api: httpx.AsyncClient, client, sql: psycopg.Connection, user: str, n: int,  # type: ignore[no-untyped-def]
                    config_id: str, cpu: CpuMeter | None = None) -> tuple[list[Row], CpuSample]:
    hdrs = {"Authorization": f"Bearer {KEY}", "X-User-Id": user}
    agents = []
    for _ in range(n):
        resp = await api.post("/agents", json={"name": f"b-{uuid.uuid4().hex[:8]}"}, headers=hdrs)
        agents.append(resp.json()["id"])

    async def one(agent: str) -> tuple[float, str, str]:
        sent = time.time()
        resp = await api.post(f"/agents/{agent}/vps", json={"vps_config_id": config_id}, headers=hdrs)
        assert resp.status_code == 202, resp.text
        op = resp.json()
        # Async and unhurried: the timestamps come from the row, so polling speed does not change
        # the measurement, but a blocking poll would stall the worker sharing this event loop. One
        # connection for all the polls: 50 of them would take PostgreSQL's slots from the API.
        while True:
            async with poll_lock:
                cur = await poller.execute(
                    "SELECT v.state, extract(epoch from v.state_changed_at), (SELECT o.id FROM vps_operations o "
                    "WHERE o.vps_id = v.id AND o.status IN ('queued', 'running') LIMIT 1), v.last_error "
                    "FROM vpses v WHERE v.id = %s", (op["vps_id"],))
                row = await cur.fetchone()
            assert row is not None
            if row[0] in ("running", "error") and row[2] is None:
                break
            await asyncio.sleep(0.25)
        assert row[0] == "running", row[3]
        return float(row[1]) - sent, op["operation_id"], op["vps_id"]

    meter = cpu or CpuMeter(0)
    poll_lock = asyncio.Lock()
    async with await psycopg.AsyncConnection.connect(sql.info.dsn, autocommit=True) as poller:
        profile = cProfile.Profile() if os.environ.get("BENCH_PROFILE") and n > 1 else None
        before = meter.sample()
        if profile:
            profile.enable()
        done = await asyncio.gather(*[one(a) for a in agents])
        if profile:
            profile.disable()
            profile.dump_stats(os.environ["BENCH_PROFILE"])
        per = cpu_per_provision(before, meter.sample(), n)
    results: list[Row] = []
    work: dict[str, int] = {}
    for total, operation_id, vps_id in done:  # the histories are read after the CPU window closed
        for key, value in (await temporal_work(client, operation_id, vps_id)).items():
            work[key] = work.get(key, 0) + value
        spent = await activity_seconds(client, operation_id)
        provider = sum(v for k, v in spent.items() if k in PROVIDER_ACTIVITIES)
        results.append((total, provider, sum(v for k, v in spent.items() if k in GATEWAY_RPC_ACTIVITIES)))
    for agent in agents:
        await api.delete(f"/agents/{agent}/vps", headers=hdrs)
    per.update({f"temporal {k} per provision": v / n for k, v in work.items()})
    return results, per


def summary(label: str, rows: list[Row]) -> dict[str, float]:
    overhead = [t - p for t, p, _ in rows]
    orchestration = [t - p - g for t, p, g in rows]
    out = {"p50_total": statistics.median(r[0] for r in rows), "p50_provider": statistics.median(r[1] for r in rows),
           "p50_overhead": statistics.median(overhead), "max_overhead": max(overhead),
           "p50_gateway_rpc": statistics.median(r[2] for r in rows),
           "p50_orchestration": statistics.median(orchestration)}
    print(f"{label:>14}: n={len(rows):3d}  total p50 {out['p50_total']:.2f}s  provider p50 {out['p50_provider']:.2f}s"
          f"  overhead p50 {out['p50_overhead']:.3f}s (max {out['max_overhead']:.3f}s) = gateway RPC "
          f"{out['p50_gateway_rpc']:.3f}s + API/Temporal/DB {out['p50_orchestration']:.3f}s")
    return out


async def main(concurrency: int, only_in_process: bool = False) -> None:
    async with standalone_stack("slopbox-bench-") as stack:
        tmp, url, env = stack.tmp, stack.database_url, stack.temporal
        try:
            settings = Settings(database_url=url, control_plane_api_key=KEY, local_provider=True,
                                encryption_keys=[Fernet.generate_key().decode()],
                                temporal_address=stack.temporal_address, data_dir=tmp / "data")
            worker_client = env.client
            spans = None
            if os.environ.get("BENCH_TRACING"):
                # Tracing on, as `slopbox api` and `worker` run it, into the SDK's in-memory exporter:
                # what tracing costs per provision (the API's client and the worker's carry the interceptor).
                from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

                from orchestration.client import connect
                from telemetry.tracing import configure_tracing

                spans = InMemorySpanExporter()
                configure_tracing("slopbox-bench", settings, exporter=spans, simple=True)
                worker_client = await connect(settings)
            with psycopg.connect(url, autocommit=True) as sql:
                sql.execute("INSERT INTO plans (name, display_name, max_agents, max_vpses, max_bandwidth_bytes, "
                            "max_storage_bytes, max_cpu_ms, max_memory_mb_seconds, "
                            "overage_bandwidth_cost_per_gb_cents, overage_storage_cost_per_gb_cents, "
                            "overage_cpu_cost_per_hour_cents, overage_memory_cost_per_gb_hour_cents) "
                            "VALUES ('bench', 'Bench', 1000, 1000, 1, 1, 1, 1, 0, 0, 0, 0)")
                sql.execute("INSERT INTO plan_vps_configs SELECT p.id, c.id FROM plans p, vps_configs c "
                            "WHERE p.name = 'bench' AND c.name = 'local-small'")
                # Exempt from plan limits: the destroys record storage usage, which the tiny plan would refuse.
                user = str(sql.execute("INSERT INTO users (email, usage_exempt, plan_id) "
                                       "VALUES ('bench@example.com', true, "
                                       "(SELECT id FROM plans WHERE name = 'bench')) RETURNING id").fetchone()[0])  # type: ignore[index]
                config_id = str(sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0])  # type: ignore[index]
                engine = make_engine(settings, pool_size=20)
                variants: list[tuple[str, dict[str, VmProvider] | None]] = [
                    ("in-process VMs", {"local": InProcessVms(tmp / "inproc")})]
                if not only_in_process:
                    variants.append(("local processes", None))
                for label, providers in variants:
                    activities = VpsActivities(settings, session_factory(engine), providers)
                    cpu = CpuMeter(stack.postgres_pid)
                    app = create_app(settings)
                    app.state.lifecycle_timeouts = LifecycleTimeouts(gateway_ready_s=180, poll_interval_s=0.1)
                    print(f"-- {label}")
                    async with app.router.lifespan_context(app), httpx.AsyncClient(
                            transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=60) as api:
                        options = {**worker_options(), **WORKER_OVERRIDES}
                        async with Worker(worker_client, task_queue=settings.temporal_task_queue, workflows=WORKFLOWS,
                                          activities=activities.all(), **options):
                            await run_round(api, env.client, sql, user, 1, config_id)  # warm-up, not counted
                            await asyncio.sleep(1)
                            rows, base_cpu = await run_round(api, env.client, sql, user, 1, config_id, cpu)
                            base = summary("1 alone", rows)
                            await asyncio.sleep(2)  # let the destroy finish outside the next window
                            rows, many_cpu = await run_round(api, env.client, sql, user, concurrency, config_id, cpu)
                            many = summary(f"{concurrency} at once", rows)
                            print_cpu("1 alone", base_cpu)
                            print_cpu(f"{concurrency} at once", many_cpu)
                            await asyncio.sleep(3)  # let the destroys finish
                    if spans is not None:
                        print(f"   spans recorded: {len(spans.get_finished_spans())}")
                        spans.clear()
                    for key in ("p50_overhead", "p50_gateway_rpc", "p50_orchestration"):
                        print(f"   {key} ratio ({concurrency} concurrent / 1 alone): {many[key] / base[key]:.2f}x")
                await engine.dispose()
        finally:
            from providers.local import LocalProvider

            local = LocalProvider(tmp / "data")
            for vm in await local.list_managed():
                await local.destroy(vm.provider_ref)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--only-in-process", action="store_true", help="skip the local-process variant")
    args = parser.parse_args()
    asyncio.run(main(args.concurrency, args.only_in_process))
    sys.exit(0)
