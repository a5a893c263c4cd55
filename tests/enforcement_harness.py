"""Helpers for the enforcement and notification tests: a worker with every activity, an SMTP server
in-process (aiosmtpd, real SMTP on loopback), usage written straight into `vps_usage_periods`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

import psycopg
from aiosmtpd.smtp import SMTP, Envelope, Session
from temporalio.client import Client
from temporalio.worker import Worker

from activities.agent_ops import AgentActivities
from activities.enforcement import EnforcementActivities
from activities.notifications import NotificationActivities
from billing.plans import month_start
from db.engine import make_engine, session_factory
from settings import Settings
from tests import histories
from worker import worker_interceptors, workflow_runner
from workflows import WORKFLOWS
from workflows.contracts import EnforceUsageInput, EnforceUsageResult
from workflows.enforcement import EnforceUsage


class Mailbox:
    """aiosmtpd handler: keeps every accepted message; `fail_next` answers that many DATA with a 451."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail_next = 0
        self.refused = 0

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:  # noqa: N802
        if self.fail_next > 0:
            self.fail_next -= 1
            self.refused += 1
            return "451 4.3.0 Try again later"
        raw = (envelope.original_content or b"").decode(errors="replace")
        self.messages.append({"to": list(envelope.rcpt_tos), "raw": raw})
        return "250 OK"


@asynccontextmanager
async def smtp_server(port: int, mailbox: Mailbox) -> AsyncIterator[Mailbox]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(mailbox, hostname="test-smtp"), "127.0.0.1", port)
    try:
        yield mailbox
    finally:
        server.close()
        await server.wait_closed()


def mail_settings(settings: Settings, smtp_port: int | None) -> Settings:
    return settings.model_copy(update={
        "temporal_task_queue": f"tq-enf-{uuid.uuid4().hex[:8]}",
        "smtp_host": "127.0.0.1" if smtp_port else None, "smtp_port": smtp_port or 587, "smtp_starttls": False,
        "smtp_timeout_s": 5.0})


def all_activities(settings: Settings) -> tuple[list[Callable[..., Any]], Any]:
    engine = make_engine(settings)
    sessions = session_factory(engine)
    acts = [*AgentActivities(settings, sessions).all(), *EnforcementActivities(settings, sessions).all(),
            *NotificationActivities(settings, sessions).all()]
    return acts, engine


@asynccontextmanager
async def full_worker(settings: Settings, client: Client) -> AsyncIterator[Worker]:
    """A worker like `slopbox worker`'s: every workflow and every activity (build_activities)."""
    acts, engine = all_activities(settings)
    try:
        async with Worker(client, task_queue=settings.temporal_task_queue, workflows=WORKFLOWS, activities=acts,
                          max_concurrent_activities=50, interceptors=worker_interceptors(),
                          workflow_runner=workflow_runner()) as worker:
            try:
                yield worker
            finally:
                if histories.recording():
                    await histories.record(client, settings.temporal_task_queue)
    finally:
        await engine.dispose()


async def enforce(client: Client, settings: Settings, user_ids: list[uuid.UUID] | None = None,
                  period: date | None = None, workflow_id: str | None = None) -> EnforceUsageResult:
    result: EnforceUsageResult = await client.execute_workflow(
        EnforceUsage.run, EnforceUsageInput(period_start=period or month_start(),
                                            user_ids=[str(u) for u in user_ids or []]),
        id=workflow_id or f"enforce-{uuid.uuid4().hex[:10]}", task_queue=settings.temporal_task_queue)
    return result


def plan_limits(sql: psycopg.Connection, plan: str) -> dict[str, int]:
    row = sql.execute("SELECT max_cpu_ms, max_bandwidth_bytes, max_memory_mb_seconds, max_storage_bytes, "
                      "overage_cpu_cost_per_hour_cents FROM plans WHERE name = %s", (plan,)).fetchone()
    assert row is not None
    return dict(zip(("cpu", "bandwidth", "memory", "storage", "cpu_rate"), row, strict=True))


def write_usage(sql: psycopg.Connection, vps_id: Any, *, cpu_ms: int = 0, bandwidth_out: int = 0,
                period: date | None = None) -> None:
    """What the collectors would have accumulated: this month's counters of one VPS."""
    sql.execute(
        "INSERT INTO vps_usage_periods (vps_id, period_start, cpu_ms, bandwidth_out_bytes) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (vps_id, period_start) DO UPDATE SET cpu_ms = EXCLUDED.cpu_ms, "
        "bandwidth_out_bytes = EXCLUDED.bandwidth_out_bytes",
        (vps_id, period or month_start(), cpu_ms, bandwidth_out))


def stopped_vps_row(sql: psycopg.Connection, user: uuid.UUID, state: str = "stopped") -> uuid.UUID:
    config = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()
    assert config is not None
    row = sql.execute("INSERT INTO vpses (user_id, vps_config_id, provider, state) VALUES (%s, %s, 'local', %s) "
                      "RETURNING id", (user, config[0], state)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


async def until(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.2)
