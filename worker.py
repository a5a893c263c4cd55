"""Temporal worker: runs every workflow in `workflows/` and every activity in `activities/`.

Any number of workers can run against one task queue; Temporal spreads the work. SIGTERM lets
running activities finish (graceful shutdown) before the process exits.

Metrics: our own series (telemetry/metrics.py) on WORKER_METRICS_PORT, and the Temporal SDK's
(temporal_* : task slots, poll and schedule-to-start latencies, activity failures...) on
WORKER_TEMPORAL_METRICS_PORT, served by the SDK's core runtime itself. Two listeners because the SDK's
exporter lives in its Rust core, apart from the Python registry.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta
from typing import Any

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import Interceptor, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from orchestration.client import connect, ensure_search_attributes
from orchestration.schedules import ensure_metering_schedules, ensure_reconcile_schedule
from settings import Settings
from telemetry.metrics import start_metrics_server
from workflows.metering import MeteringCycleInput

log = logging.getLogger("worker")


# Modules the workflow sandbox shares with the host instead of re-importing them for every workflow
# run. Each is deterministic data or pure functions with no module state a run could change:
# re-importing `workflows.contracts` built all its pydantic models again for each new run, about
# half of the worker's CPU per provision (bench/README.md). The workflow modules themselves stay
# sandboxed, so their calls are still checked. `opentelemetry`: temporalio's tracing interceptor
# runs inside the sandbox when tracing is on.
SANDBOX_PASSTHROUGH = ("workflows.contracts", "orchestration.search_attributes", "metering.periods",
                       "opentelemetry")


def workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSTHROUGH))


def worker_interceptors() -> list[Interceptor]:
    """A step's failed attempts on its operation's row while Temporal retries it (the API shows them)."""
    from activities.attempts import OperationAttempts

    return [OperationAttempts()]


def worker_options() -> dict[str, Any]:
    """How a worker runs workflows and activities, apart from what it runs (the benchmark uses the same)."""
    return {
        "workflow_runner": workflow_runner(),
        "interceptors": worker_interceptors(),
        "max_concurrent_activities": 100,
        # More pollers than the defaults (5): provisioning bursts are many short activities.
        "max_concurrent_workflow_task_polls": 10,
        "max_concurrent_activity_task_polls": 20,
    }


async def build_worker(settings: Settings, client: object | None = None) -> Worker:
    from activities import build_activities
    from workflows import WORKFLOWS

    temporal = client or await connect(settings)
    activities = await build_activities(settings)
    return Worker(
        temporal,  # type: ignore[arg-type]
        task_queue=settings.temporal_task_queue,
        workflows=WORKFLOWS,
        activities=activities,
        graceful_shutdown_timeout=timedelta(seconds=20),
        **worker_options(),
    )


def sdk_metrics_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime exporting the SDK's metrics in Prometheus format; None = the default runtime
    (port 0, or the port cannot be bound: logged, and the worker runs without them)."""
    port = settings.worker_temporal_metrics_port
    if port == 0:
        return None
    address = f"{settings.metrics_host}:{port}"
    try:
        runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(
            bind_address=address, counters_total_suffix=True, durations_as_seconds=True)))
    except Exception as err:  # noqa: BLE001  (the core raises a plain RuntimeError on a busy port)
        log.error("Temporal SDK metrics could not bind; running without them",
                  extra={"address": address, "error": str(err)})
        return None
    log.info("Temporal SDK metrics listening", extra={"url": f"http://{address}/metrics"})
    return runtime


def metering_cycle_input(settings: Settings) -> MeteringCycleInput:
    return MeteringCycleInput(interval_s=max(1, settings.metering_interval_s), batch_size=settings.metering_batch_size,
                              hetzner_requests_per_hour=settings.metering_hetzner_requests_per_hour,
                              start_enforcement=settings.metering_enforce)


async def run(settings: Settings) -> None:
    metrics = await start_metrics_server(settings.metrics_host, settings.worker_metrics_port, service="worker")
    client = await connect(settings, runtime=sdk_metrics_runtime(settings))
    await ensure_search_attributes(client, settings.temporal_namespace)
    if settings.reconcile_interval_s:
        await ensure_reconcile_schedule(client, settings.temporal_task_queue,
                                        timedelta(seconds=settings.reconcile_interval_s))
    await ensure_metering_schedules(client, settings.temporal_task_queue, metering_cycle_input(settings),
                                    interval_s=settings.metering_interval_s)
    worker = await build_worker(settings, client)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker started", extra={"task_queue": settings.temporal_task_queue,
                                      "namespace": settings.temporal_namespace})
    try:
        async with worker:
            await stop.wait()
            log.info("worker stopping")
    finally:
        if metrics is not None:
            await metrics.cleanup()
