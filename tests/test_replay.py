"""Every recorded workflow history replays against today's workflow code (issue 8 #11).

A change to what a workflow does (an activity added, removed or reordered, a timer, a child) makes
runs started before the deploy fail with a nondeterminism error when a worker picks them up again.
Such a change must be guarded with `workflow.patched(...)` (README, "Changing a workflow"); this
test fails on the unguarded change. Histories come from tests/histories.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.histories import HISTORIES
from worker import workflow_runner
from workflows import WORKFLOWS

RECORDED = sorted(HISTORIES.glob("*.json"))


def test_histories_cover_every_operation_workflow() -> None:
    types = {path.name.split("-", 1)[0] for path in RECORDED}
    expected = {wf.__temporal_workflow_definition.name for wf in WORKFLOWS} - {"Reconcile"}  # type: ignore[attr-defined]
    assert expected <= types, f"no recorded history for {sorted(expected - types)}"


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem[:48] for p in RECORDED])
async def test_recorded_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())  # noqa: ASYNC240 (small test fixture)
    # The worker's own sandbox (its passthrough modules included), so replay checks what runs.
    result = await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter,
                            workflow_runner=workflow_runner()).replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"
