"""`python -m tests.fault_worker`: the real worker (`slopbox worker`), made to stop inside a chosen step.

A worker killed with SIGKILL "inside an activity" must be killed while the activity is running, not
just before or after it; most steps take milliseconds, so racing them is hopeless. This worker
holds an activity open *after* its body has run (the side effects are done, the completion is not
reported yet) whenever the VPS row's `step` column (or the step passed with the call) is the step
the test asked for, and heartbeats while it holds, so the test can kill it at leisure. That is
exactly the state a crash leaves behind: the work happened, Temporal does not know it, and a retry
must cope.

Which step to hold comes from a JSON file (`SLOPBOX_TEST_HOLD_FILE`), `{user_id: step}`, read on
every activity completion, so a test can arm a hold after setting a VPS up. A held activity writes
`held/<user_id>` (content: the step) next to that file. The VPS is found through what the API
promises: the workflow id is the operation id, and the operation's row in `vps_operations` carries
`user_id` and `step`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import psycopg
import temporalio.worker
from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

HOLD_FILE_ENV = "SLOPBOX_TEST_HOLD_FILE"


def held_dir() -> Path:
    """Where a held activity leaves a file named after the VPS's user (content: the step)."""
    path = Path(os.environ[HOLD_FILE_ENV]).parent / "held"
    path.mkdir(exist_ok=True)
    return path


def _targets() -> dict[str, str]:
    path = os.environ.get(HOLD_FILE_ENV)
    if not path:
        return {}
    try:
        return dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return {}


async def _row(operation_id: str) -> tuple[str, str | None] | None:
    url = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT user_id::text, step FROM vps_operations WHERE id = %s", (operation_id,))
        row = await cur.fetchone()
    return (str(row[0]), row[1]) if row else None


class _Hold(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        result = await self.next.execute_activity(input)
        targets = _targets()
        if targets:
            row = await _row(activity.info().workflow_id or "")
            # The step the workflow passed along with the call, as a fallback: the first step's
            # write to the row can lose a race with the API's commit of that row (then the row
            # still says `queued`).
            passed = getattr(input.args[0], "step", None) if input.args else None
            target = targets.get(row[0]) if row is not None else None
            if row is not None and target is not None and target in (row[1], passed):
                # Tell the test this activity's body has run and it is now held open.
                (held_dir() / row[0]).write_text(target)
                while True:  # until SIGKILL
                    activity.heartbeat(f"held at {target}")
                    await asyncio.sleep(1)
        return result


class HoldInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Hold(next)


def main() -> int:
    original = temporalio.worker.Worker.__init__

    def with_hold(self: temporalio.worker.Worker, *args: Any, **kwargs: Any) -> None:
        kwargs["interceptors"] = [*kwargs.get("interceptors", []), HoldInterceptor()]
        original(self, *args, **kwargs)

    # The worker is built by our own code (`slopbox worker`); only Temporal's class gets the hook.
    temporalio.worker.Worker.__init__ = with_hold  # type: ignore[method-assign]
    from cli.main import main as cli_main

    return cli_main(["worker"])


if __name__ == "__main__":
    sys.exit(main())
