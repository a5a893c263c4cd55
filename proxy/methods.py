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

from dataclasses import dataclass
from typing import Any

from openclaw.methods import METHOD_SCOPES, NODE_ROLE, SCOPE_ADMIN, scope_satisfied
from openclaw.relay import RELAY_SCOPES

__all__ = ["ALLOWED_METHODS", "DENIED_METHODS", "Refusal", "check_method"]

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


def _dynamic_scope(method: str, params: Any) -> str | None:
    """The gateway's param rule for the session methods; the scope needed when it exceeds write."""
    if method == "sessions.patch" and _is_object(params):
        if params.get("permissionMode") == "full" or "sandboxMode" in params:
            return SCOPE_ADMIN
    if method == "sessions.patchMany" and _is_object(params) and _is_object(params.get("patch")):
        patch = params["patch"]
        if patch.get("permissionMode") == "full" or "sandboxMode" in patch:
            return SCOPE_ADMIN
    if method == "sessions.create" and _is_object(params):
        if (params.get("incognito") is True or "execNode" in params or "toolOverrides" in params
                or params.get("permissionMode") == "full"):
            return SCOPE_ADMIN
    return None


def check_method(method: str, params: Any = None) -> Refusal | None:
    """None when the browser may call `method` with `params`; otherwise why not."""
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
