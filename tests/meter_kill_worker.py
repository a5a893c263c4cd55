"""`python -m tests.meter_kill_worker`: a metering worker that stops between fetching and writing.

It runs the real MeteringCycle and activities against the fake Hetzner API at `METER_FAKE_URL`;
after a batch has fetched its metrics it writes `METER_MARKER` and waits there (heartbeating), so
the test can SIGKILL it at exactly that point: the provider was asked, nothing was written.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities.metering import MeteringActivities
from db.engine import make_engine
from metering.collectors import HetznerCollector
from settings import Settings
from workflows.metering import CloseMonth, MeteringCycle


async def main() -> None:
    settings = Settings()
    engine = make_engine(settings)
    acts = MeteringActivities(settings, engine, {
        "hetzner": HetznerCollector(os.environ["METER_FAKE_URL"], "test-token", settle_s=0)})

    async def stop_here(*_: object) -> None:
        Path(os.environ["METER_MARKER"]).write_text("fetched")  # noqa: ASYNC240 (a few bytes, once)
        await asyncio.sleep(3600)  # until SIGKILL; the activity heartbeats meanwhile

    acts.after_fetch = stop_here
    client = await Client.connect(settings.temporal_target, data_converter=pydantic_data_converter)
    async with Worker(client, task_queue=settings.temporal_task_queue, workflows=[MeteringCycle, CloseMonth],
                      activities=acts.all()):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
