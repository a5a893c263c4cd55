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


REDACTED = "__OPENCLAW_REDACTED__"
"""What `config.get` shows in place of a secret: it matches any value (it cannot be compared)."""


def patch_applied(live: Any, patch: Any) -> bool:
    """Whether `live` already holds what the merge patch says: applying it again would change nothing.

    How a write whose answer was lost (a timeout, a restart) is confirmed from `config.get`.
    """
    if not isinstance(patch, dict):
        return live == patch or (live == REDACTED and isinstance(patch, str))
    if not isinstance(live, dict):
        return False
    for key, value in patch.items():
        if value is None:
            if key in live:
                return False
        elif key not in live or not patch_applied(live[key], value):
            return False
    return True
