"""Deterministic Temporal workflows. No I/O here: every side effect is an activity."""

from workflows.agent_ops import ConnectChannel, DisconnectChannel, PushConfig, RestartAgent
from workflows.enforcement import EnforceUsage
from workflows.entity import VpsEntity
from workflows.lifecycle import DestroyVps, ProvisionVps, Reconcile, StartVps, StopVps

WORKFLOWS = [VpsEntity, ProvisionVps, StartVps, StopVps, DestroyVps, Reconcile, PushConfig, RestartAgent,
             ConnectChannel, DisconnectChannel, EnforceUsage]

__all__ = ["WORKFLOWS", "ConnectChannel", "DestroyVps", "DisconnectChannel", "EnforceUsage", "ProvisionVps",
           "PushConfig",
           "Reconcile", "RestartAgent", "StartVps", "StopVps", "VpsEntity"]
