"""Deterministic Temporal workflows. No I/O here: every side effect is an activity."""

from workflows.lifecycle import DestroyVps, ProvisionVps, Reconcile, StartVps, StopVps

WORKFLOWS = [ProvisionVps, StartVps, StopVps, DestroyVps, Reconcile]

__all__ = ["WORKFLOWS", "DestroyVps", "ProvisionVps", "Reconcile", "StartVps", "StopVps"]
