"""Deterministic Temporal workflows. No I/O here: every side effect is an activity.

The names below are imported on first use, not by this `__init__`: the workflow sandbox imports
this package again for every workflow run, and importing every workflow module each time (the
metering ones build a dozen pydantic models) cost a provision's runs most of their start-up CPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workflows.agent_ops import ConnectChannel, DisconnectChannel, PushConfig, RestartAgent
    from workflows.enforcement import EnforceUsage
    from workflows.entity import VpsEntity
    from workflows.lifecycle import DestroyVps, ProvisionVps, Reconcile, StartVps, StopVps
    from workflows.metering import CloseMonth, MeteringCycle

    WORKFLOWS: list[type]

_WHERE = {
    "VpsEntity": "entity", "ProvisionVps": "lifecycle", "StartVps": "lifecycle", "StopVps": "lifecycle",
    "DestroyVps": "lifecycle", "Reconcile": "lifecycle", "PushConfig": "agent_ops", "RestartAgent": "agent_ops",
    "ConnectChannel": "agent_ops", "DisconnectChannel": "agent_ops", "EnforceUsage": "enforcement",
    "MeteringCycle": "metering", "CloseMonth": "metering",
}

__all__ = ["WORKFLOWS", "CloseMonth", "ConnectChannel", "DestroyVps", "DisconnectChannel", "EnforceUsage",
           "MeteringCycle", "ProvisionVps", "PushConfig", "Reconcile", "RestartAgent", "StartVps", "StopVps",
           "VpsEntity"]


def __getattr__(name: str) -> Any:
    if name == "WORKFLOWS":
        return [__getattr__(n) for n in _WHERE]
    if name in _WHERE:
        return getattr(importlib.import_module(f"workflows.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'workflows' has no attribute {name!r}")
