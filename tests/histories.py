"""Workflow histories recorded from the lifecycle and agent-operation tests, for the replay test.

`SLOPBOX_RECORD_HISTORIES=1 .venv/bin/python -m pytest tests/test_lifecycle_local.py tests/test_agent_ops.py
tests/test_vps_states.py` saves up to `PER_TYPE` completed runs of each workflow type into
tests/histories/ when each test stack closes. Commit them: tests/test_replay.py replays every one
against the current workflow code, so a change that would break runs already in flight fails CI
instead of a deploy (see "Changing a workflow" in the README).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus

HISTORIES = Path(__file__).resolve().parent / "histories"
PER_TYPE = 3


def recording() -> bool:
    return bool(os.environ.get("SLOPBOX_RECORD_HISTORIES"))


async def record(client: Client, task_queue: str) -> list[Path]:
    """Save closed runs of this task queue, up to PER_TYPE per workflow type (the longest first)."""
    HISTORIES.mkdir(exist_ok=True)
    found: dict[str, list[tuple[int, str, str]]] = {}
    async for wf in client.list_workflows(f'TaskQueue = "{task_queue}"'):
        if wf.status != WorkflowExecutionStatus.COMPLETED:
            continue
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        found.setdefault(wf.workflow_type, []).append((len(history.events), wf.id, history.to_json()))
    written = []
    for workflow_type, runs in found.items():
        have = sorted(HISTORIES.glob(f"{workflow_type}-*.json"))
        for _, wf_id, text in sorted(runs, reverse=True)[: max(0, PER_TYPE - len(have))]:
            name = re.sub(r"[^A-Za-z0-9-]", "-", wf_id)[:60]
            path = HISTORIES / f"{workflow_type}-{name}.json"
            path.write_text(text)
            written.append(path)
    return written
