"""The embedded stack of a standalone run (the benchmarks, the fault figures): PostgreSQL migrated
and seeded, and a Temporal dev server, on free ports in a fresh temporary folder."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from db.migrate import migrate_and_seed
from devstack import postgres
from devstack.ports import unused_port
from devstack.postgres import EmbeddedPostgres
from devstack.temporal import temporal_cli
from orchestration.search_attributes import SEARCH_ATTRIBUTES


def free_port() -> int:
    return unused_port()


@dataclass(frozen=True)
class Standalone:
    tmp: Path
    database_url: str
    temporal: WorkflowEnvironment
    temporal_address: str
    postgres_pid: int


@asynccontextmanager
async def standalone_stack(prefix: str, *, remove: bool = False) -> AsyncIterator[Standalone]:
    """`remove`: delete the folder (database, VMs, logs) once PostgreSQL has stopped."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    pg = EmbeddedPostgres(tmp, free_port())
    proc = pg.spawn()
    try:
        pg.wait_ready(proc)
        pg.ensure_database()
        url = pg.url()
        migrate_and_seed(url.replace("postgresql://", "postgresql+psycopg://"))
        port = free_port()
        async with await WorkflowEnvironment.start_local(
            dev_server_existing_path=temporal_cli(), search_attributes=SEARCH_ATTRIBUTES,
            data_converter=pydantic_data_converter, port=port, ui=False,
            # e.g. BENCH_TEMPORAL_ARGS="--dynamic-config-value system.enableActivityEagerExecution=true"
            dev_server_extra_args=shlex.split(os.environ.get("BENCH_TEMPORAL_ARGS", "")),
        ) as env:
            yield Standalone(tmp, url, env, f"127.0.0.1:{port}", proc.pid)
    finally:
        postgres.stop(proc)
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
