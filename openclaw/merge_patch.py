"""JSON merge-patch knowledge shared by the config push and the gateway simulator.

The gateway's `config.patch` replaces arrays whole only at the paths named in `replacePaths`; both
the side that builds a patch and the side that applies one need the same list of array paths.
"""

from __future__ import annotations

from typing import Any


def array_paths(value: Any, path: str) -> list[str]:
    """Dotted paths of every array at or under `value` (itself at `path`)."""
    if isinstance(value, list):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in array_paths(v, f"{path}.{k}")]
    return []
