"""Which WebSocket methods a browser may call through the relay: an allow-list, failing closed.

Derived from the recorded method-scope table (`openclaw.methods`): a method is allowed when the
UI-relay identity's scopes (`openclaw.relay.RELAY_SCOPES`) satisfy the scope it needs, minus the
explicit denies below. Anything else, unknown names included, gets a synthetic `FORBIDDEN` from
the proxy and never reaches the VM; the gateway's own checks stay as a second line. Names are
matched exactly (the gateway's method lookup is exact too), so `Config.Patch`, `tools.invoke\\n`
or a Cyrillic look-alike is simply an unknown method.

For the dynamic session methods the proxy applies the gateway's own param rule (2026.9.6,
`method-scopes-*.mjs`) before forwarding: a `sessions.patch` to `permissionMode: "full"` or with a
`sandboxMode`, or a `sessions.create` with `execNode`/`toolOverrides`/`permissionMode: "full"`/
incognito, needs `operator.admin`, which the relay never holds. Decisions are documented in
proxy/README.md ("WebSocket method policy").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openclaw.methods import METHOD_SCOPES, NODE_ROLE, SCOPE_ADMIN, scope_satisfied
from openclaw.relay import RELAY_SCOPES

__all__ = ["ALLOWED_ANY_PARAMS", "ALLOWED_METHODS", "DENIED_METHODS", "Refusal", "check_method"]

# Methods the relay's scopes would allow but the browser must not call (PRD §4.6, reference §2.8/§6.6).
DENIED_METHODS: frozenset[str] = frozenset({
    # PRD §4.6: exec approvals follow the owner's policy, not a click in the UI.
    "exec.approval.resolve", "approval.resolve",
    # Requests for approval come from agents and nodes, never from the UI: a browser could fake one.
    "exec.approval.request", "plugin.approval.request",
    # The WS twin of POST /tools/invoke (reference §3.3).
    "tools.invoke",
    # Host escape: remote computer/node control and listing the host's file system.
    "computer.invoke", "node.invoke", "fs.listDir", "environments.list", "environments.status",
    "environments.session.status",
    # A scope upgrade of the relay identity would make every relayed session admin (reference §6.6).
    "device.scopes.requestUpgrade", "device.scopes.waitUpgrade",
    # The raw config names the host layout and the control plane's settings; the UI's settings pages
    # that need it are admin-only anyway.
    "config.get", "config.schema", "config.schema.lookup",
    # 292 KB of gateway logs: the control plane's pairing, addresses and request traces, not the user's.
    "logs.tail",
    # The VM's lifecycle belongs to the control plane.
    "gateway.restart.preflight", "gateway.suspend.status",
    # Channel pairing belongs to the pairing scope the relay does not hold (list is pairing-only).
    "channels.pairing.approve",
})

ALLOWED_METHODS: frozenset[str] = frozenset(
    name for name, scope in METHOD_SCOPES.items()
    if scope != NODE_ROLE and scope_satisfied(scope, RELAY_SCOPES) and name not in DENIED_METHODS
)


@dataclass(frozen=True)
class Refusal:
    """Why the proxy refused a method: `rule` is what the logs and `details.rule` show."""

    rule: str
    """`unknown` (not in the table), `scope` (needs a scope the relay lacks), `denied` (explicit deny),
    `params` (a dynamic method asked for admin-only params)."""
    required_scope: str


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _session_patch(params: Any) -> bool:
    return _is_object(params) and (params.get("permissionMode") == "full" or "sandboxMode" in params)


def _session_patch_many(params: Any) -> bool:
    return _is_object(params) and _session_patch(params.get("patch"))


def _session_create(params: Any) -> bool:
    return _is_object(params) and (params.get("incognito") is True or "execNode" in params
                                   or "toolOverrides" in params or params.get("permissionMode") == "full")


_ADMIN_PARAMS: dict[str, Callable[[Any], bool]] = {
    "sessions.patch": _session_patch,
    "sessions.patchMany": _session_patch_many,
    "sessions.create": _session_create,
}
"""The gateway's param rule for the session methods: True when these params need operator.admin."""

ALLOWED_ANY_PARAMS: frozenset[str] = ALLOWED_METHODS - frozenset(_ADMIN_PARAMS)
"""Allowed whatever their params (no rule above looks at them): one set lookup decides most frames."""


def _dynamic_scope(method: str, params: Any) -> str | None:
    """The scope the params of a session method need when it exceeds write (None: no rule applies)."""
    rule = _ADMIN_PARAMS.get(method)
    return SCOPE_ADMIN if rule is not None and rule(params) else None


def check_method(method: str, params: Any = None) -> Refusal | None:
    """None when the browser may call `method` with `params`; otherwise why not."""
    if isinstance(method, str) and method in ALLOWED_ANY_PARAMS:
        return None
    scope = METHOD_SCOPES.get(method) if isinstance(method, str) else None
    if scope is None:
        return Refusal("unknown", SCOPE_ADMIN)
    if method in DENIED_METHODS:
        return Refusal("denied", scope if scope != NODE_ROLE and not scope_satisfied(scope, RELAY_SCOPES)
                       else SCOPE_ADMIN)
    if method not in ALLOWED_METHODS:
        return Refusal("scope", SCOPE_ADMIN if scope == NODE_ROLE else scope)
    needed = _dynamic_scope(method, params)
    if needed is not None and not scope_satisfied(needed, RELAY_SCOPES):
        return Refusal("params", needed)
    return None
