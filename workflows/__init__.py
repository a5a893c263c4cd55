"""Deterministic Temporal workflows. No I/O here: every side effect is an activity."""

from workflows.agent_ops import ConnectChannel, DisconnectChannel, PushConfig, RestartAgent
from workflows.enforcement import EnforceUsage
from workflows.entity import VpsEntity
from workflows.lifecycle import DestroyVps, ProvisionVps, Reconcile, StartVps, StopVps
from workflows.metering import CloseMonth, MeteringCycle

WORKFLOWS = [VpsEntity, ProvisionVps, StartVps, StopVps, DestroyVps, Reconcile, PushConfig, RestartAgent,
             ConnectChannel, DisconnectChannel, EnforceUsage, MeteringCycle, CloseMonth]

__all__ = ["WORKFLOWS", "CloseMonth", "ConnectChannel", "DestroyVps", "DisconnectChannel", "EnforceUsage",
           "MeteringCycle", "ProvisionVps", "PushConfig", "Reconcile", "RestartAgent", "StartVps", "StopVps",
           "VpsEntity"]
