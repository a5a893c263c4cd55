"""openclaw.json handling for the gateway simulator.

Mirrors the real gateway's observable behaviour (openclaw 2026.9.6, src/gateway/server-methods/config.ts
and src/gateway/config-reload-plan.ts): `${VAR}` substitution, closed-object validation of the keys
the control plane uses, HMAC config hashes, merge-patch with id-keyed array merging and the refusal of
destructive array patches, secret redaction with the `__OPENCLAW_REDACTED__` sentinel, changed-path
reporting and restart/hot classification. The file is plain JSON (the real gateway reads JSON5).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openclaw.merge_patch import REDACTED, array_paths

VERSION = "2026.9.6"

TOP_LEVEL_KEYS = frozenset(
    "accessGroups acp agents approvals attachments auth bindings broadcast browser channels cloudWorkers "
    "commands cron desktop diagnostics discovery env gateway hooks logging mcp memory messages meta models "
    "nodeHost plugins proxy secrets security session skills surfaces talk telemetry tools transcripts tts ui "
    "update wizard worktreeAcceleration worktreeRoot".split()
)
GATEWAY_KEYS = frozenset(
    "mode port bind customBindHost auth controlUi terminal trustedProxies allowRealIpFallback tools http "
    "nodes reload publicOrigin tls roles remote tailscale push cliAgents portals".split()
)
AUTH_KEYS = frozenset("mode token password rateLimit trustedProxy identityScopes allowTailscale".split())
CONTROL_UI_KEYS = frozenset(
    "enabled basePath allowedOrigins dangerouslyAllowHostHeaderOriginFallback dangerouslyDisableDeviceAuth "
    "root embedSandbox environment communityInvite github sessionObserver allowExternalEmbedUrls "
    "automaticallyFetchFavicons experimental".split()
)
BIND_VALUES = ("loopback", "lan", "tailnet", "auto", "custom")
AUTH_MODES = ("none", "token", "password", "trusted-proxy")
_SECRET_KEY_RE = re.compile(r"(token|password|secret|apikey|privatekey)$", re.IGNORECASE)
_ENV_RE = re.compile(r"\$(\$)?\{([A-Z_][A-Z0-9_]*)\}")

# (prefix, kind) from src/gateway/config-reload-plan.ts, trimmed to what a control plane touches.
# Longest matching prefix wins; anything unmatched under gateway.* restarts.
_RELOAD_RULES: tuple[tuple[str, str], ...] = (
    ("gateway.remote", "none"),
    ("gateway.reload", "none"),
    ("gateway.auth.token", "hot-auth"),
    ("gateway.auth.password", "hot-auth"),
    ("gateway.http.endpoints", "hot"),
    ("gateway.tools", "hot"),
    ("gateway.cliAgents", "hot"),
    ("gateway.controlUi.enabled", "hot"),
    ("gateway.controlUi.embedSandbox", "hot"),
    ("gateway.controlUi.allowedOrigins", "hot"),
    ("gateway.controlUi.dangerouslyAllowHostHeaderOriginFallback", "hot"),
    ("gateway.nodes.pairing", "hot"),
    ("gateway.terminal", "hot"),
    ("gateway.auth.rateLimit", "hot"),
    ("gateway.roles", "hot"),
    ("gateway.trustedProxies", "hot"),
    ("gateway.allowRealIpFallback", "hot"),
    ("gateway.auth.identityScopes", "hot"),
    ("gateway.auth.trustedProxy", "hot"),
    ("gateway.publicOrigin", "hot"),
    ("agents.defaults.heartbeat", "hot"),
    ("agents.defaults.model", "hot"),
    ("agents.defaults.models", "hot"),
    ("agents.defaults.workspace", "hot"),
    ("agents.defaults", "hot"),
    ("agents.entries", "hot"),
    ("hooks.gmail", "hot"),
    ("hooks.internal", "hot"),
    ("hooks", "hot"),
    ("models", "hot"),
    ("cron", "hot"),
    ("mcp", "hot"),
    ("tools", "hot"),
    ("plugins", "hot"),
    ("channels", "hot"),
    ("meta", "none"),
    ("wizard", "none"),
    ("logging", "none"),
    ("agents", "none"),
    ("bindings", "none"),
    ("messages", "none"),
    ("session", "none"),
    ("talk", "none"),
    ("skills", "none"),
    ("secrets", "none"),
    ("ui", "none"),
    ("gateway", "restart"),
    ("discovery", "restart"),
)
_REFINEMENT_PREFIXES = tuple(prefix for prefix, _ in _RELOAD_RULES)


class ConfigError(ValueError):
    """A config (file or submitted) failed validation; `issues` as the gateway reports them."""

    def __init__(self, message: str, issues: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.issues = issues or []


# -- hashing ------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_hash_key(state_dir: Path) -> bytes:
    """Per-state-dir HMAC key (the real gateway keeps `config-journal-fingerprint.key` there too)."""
    path = state_dir / "config-journal-fingerprint.key"
    if path.exists():
        return path.read_bytes()
    state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    path.write_bytes(key)
    path.chmod(0o600)
    return key


def config_hash(key: bytes, data: str) -> str:
    return "hmac-sha256:v1:" + _b64(hmac.new(key, data.encode("utf-8"), hashlib.sha256).digest())


# -- env substitution, validation ------------------------------------------------------------------


def substitute_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """`${VAR}` in any string; `$${VAR}` is a literal `${VAR}`. A missing variable is a config error."""
    if isinstance(value, dict):
        return {k: substitute_env(v, env, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def repl(match: re.Match[str]) -> str:
        if match.group(1):
            return "${" + match.group(2) + "}"
        name = match.group(2)
        if name not in env:
            raise ConfigError(
                f'invalid config: {path}: Missing env var "{name}"',
                [{"path": path, "message": f'Missing env var "{name}" referenced at config path: {path}'}],
            )
        return env[name]

    return _ENV_RE.sub(repl, value)


def _unrecognized(obj: Mapping[str, Any], allowed: frozenset[str], path: str) -> list[dict[str, str]]:
    return [{"path": path or "<root>", "message": f'Unrecognized key: "{key}"'} for key in obj if key not in allowed]


def validate(config: Any) -> list[dict[str, str]]:
    """Closed-object checks for the parts of the schema the control plane writes; [] = valid."""
    if not isinstance(config, dict):
        return [{"path": "<root>", "message": "Expected object"}]
    issues = _unrecognized(config, TOP_LEVEL_KEYS, "")
    gateway = config.get("gateway")
    if gateway is None:
        return issues
    if not isinstance(gateway, dict):
        return [*issues, {"path": "gateway", "message": "Expected object"}]
    issues += _unrecognized(gateway, GATEWAY_KEYS, "gateway")
    port = gateway.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        issues.append({"path": "gateway.port", "message": "Expected integer between 1 and 65535"})
    if gateway.get("bind") is not None and gateway.get("bind") not in BIND_VALUES:
        issues.append({"path": "gateway.bind", "message": f"Invalid option: expected one of {BIND_VALUES}"})
    if gateway.get("mode") is not None and gateway.get("mode") not in ("local", "remote"):
        issues.append({"path": "gateway.mode", "message": 'Invalid option: expected one of "local"|"remote"'})
    auth = gateway.get("auth")
    if auth is not None:
        if not isinstance(auth, dict):
            issues.append({"path": "gateway.auth", "message": "Expected object"})
        else:
            issues += _unrecognized(auth, AUTH_KEYS, "gateway.auth")
            if auth.get("mode") is not None and auth.get("mode") not in AUTH_MODES:
                issues.append({"path": "gateway.auth.mode", "message": f"Invalid option: expected one of {AUTH_MODES}"})
    control_ui = gateway.get("controlUi")
    if control_ui is not None:
        if not isinstance(control_ui, dict):
            issues.append({"path": "gateway.controlUi", "message": "Expected object"})
        else:
            issues += _unrecognized(control_ui, CONTROL_UI_KEYS, "gateway.controlUi")
            base = control_ui.get("basePath")
            if base is not None and (not isinstance(base, str) or (base and not base.startswith("/"))):
                issues.append({"path": "gateway.controlUi.basePath", "message": "Expected a path starting with /"})
    proxies = gateway.get("trustedProxies")
    if proxies is not None and (not isinstance(proxies, list) or not all(isinstance(p, str) for p in proxies)):
        issues.append({"path": "gateway.trustedProxies", "message": "Expected array of strings"})
    return issues


def summarize_issues(issues: list[dict[str, str]]) -> str:
    lines = [f"{i['path']}: {i['message']}" for i in issues[:3]]
    hidden = len(issues) - len(lines)
    more = f" (+{hidden} more issue{'s' if hidden != 1 else ''})" if hidden > 0 else ""
    return f"invalid config: {'; '.join(lines)}{more}" if lines else "invalid config"


# -- merge patch ----------------------------------------------------------------------------------------


def _is_id_array(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(e, dict) and isinstance(e.get("id"), str) and e["id"] for e in value
    )


def apply_merge_patch(base: Any, patch: Any, replace_paths: frozenset[str] = frozenset(), path: str = "") -> Any:
    """RFC 7396 plus OpenClaw's rule that arrays of `{id: ...}` objects merge entry-by-id."""
    if not isinstance(patch, dict):
        if isinstance(patch, list) and _is_id_array(patch) and _is_id_array(base) and path not in replace_paths:
            merged = [copy.deepcopy(e) for e in base]
            index = {e["id"]: i for i, e in enumerate(merged)}
            for entry in patch:
                if entry["id"] in index:
                    i = index[entry["id"]]
                    merged[i] = apply_merge_patch(merged[i], entry, replace_paths, f"{path}[]")
                else:
                    merged.append(copy.deepcopy(entry))
            return merged
        return copy.deepcopy(patch)
    result = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        child = f"{path}.{key}" if path else key
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value, replace_paths, child)
    return result


def destructive_array_paths(base: Any, patch: Any, merged: Any, path: str = "") -> list[str]:
    """Array paths whose existing entries the patch would drop (collectDestructiveArrayPatchPaths)."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return []
    merged = merged if isinstance(merged, dict) else {}
    out: list[str] = []
    for key, patch_value in patch.items():
        child = f"{path}.{key}" if path else key
        base_value = base.get(key)
        merged_value = merged.get(key)
        if isinstance(base_value, list):
            if patch_value is None or not isinstance(patch_value, list):
                out.append(child)
                continue
            if isinstance(merged_value, list):
                if _is_id_array(base_value):
                    ids = {e.get("id") for e in merged_value if isinstance(e, dict)}
                    if not all(e["id"] in ids for e in base_value):
                        out.append(child)
                        continue
                elif not _preserves_entries(base_value, merged_value):
                    out.append(child)
                    continue
        elif isinstance(base_value, dict) and not isinstance(patch_value, dict):
            out += array_paths(base_value, child)
            continue
        if isinstance(patch_value, dict):
            out += destructive_array_paths(base_value, patch_value, merged_value, child)
    return out


def _preserves_entries(base: list[Any], merged: list[Any]) -> bool:
    remaining = list(merged)
    for entry in base:
        if entry not in remaining:
            return False
        remaining.remove(entry)
    return True



# -- redaction ------------------------------------------------------------------------------------------


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY_RE.search(key))


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and isinstance(v, str) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_raw(raw: str, source: Any) -> str:
    """Hide literal secrets in the file text; `${VAR}` references are not secrets and stay visible."""
    out = raw
    for secret in sorted(_secret_values(source), key=len, reverse=True):
        if not _ENV_RE.fullmatch(secret):
            out = out.replace(json.dumps(secret), json.dumps(REDACTED))
    return out


def _secret_values(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if is_secret_key(k) and isinstance(v, str) and v:
                yield v
            else:
                yield from _secret_values(v)
    elif isinstance(value, list):
        for v in value:
            yield from _secret_values(v)


def restore_redacted(submitted: Any, current: Any, path: str = "") -> Any:
    """Writes that send the sentinel back keep the stored value (there must be one)."""
    if submitted == REDACTED:
        if current is None:
            raise ConfigError(f"invalid config: {path}: redacted placeholder has no stored value to restore")
        return copy.deepcopy(current)
    if isinstance(submitted, dict):
        cur = current if isinstance(current, dict) else {}
        return {k: restore_redacted(v, cur.get(k), f"{path}.{k}" if path else k) for k, v in submitted.items()}
    if isinstance(submitted, list):
        cur_list = current if isinstance(current, list) else []
        return [
            restore_redacted(v, cur_list[i] if i < len(cur_list) else None, f"{path}[{i}]")
            for i, v in enumerate(submitted)
        ]
    return submitted


# -- diffs and reload plan ------------------------------------------------------------------------------


def diff_leaf_paths(prev: Any, nxt: Any, prefix: str = "") -> list[str]:
    """diffConfigLeafPaths: what a hashless patch would change (used for its error message)."""
    if isinstance(prev, dict) or isinstance(nxt, dict):
        p = prev if isinstance(prev, dict) else {}
        n = nxt if isinstance(nxt, dict) else {}
        keys = list(dict.fromkeys([*p, *n]))
        if not keys:
            return [] if prev == nxt else [prefix or "<root>"]
        return [x for k in keys for x in diff_leaf_paths(p.get(k), n.get(k), f"{prefix}.{k}" if prefix else k)]
    return [] if prev == nxt else [prefix or "<root>"]


def diff_reload_paths(prev: Any, nxt: Any, prefix: str = "") -> list[str]:
    """collectConfigDiffPaths with the reload-rule prefixes as refinement points."""
    if prev == nxt:
        return []
    prev_obj, next_obj = isinstance(prev, dict), isinstance(nxt, dict)
    refine = any(p.startswith(prefix + ".") for p in _REFINEMENT_PREFIXES) if prefix else True
    if (prev_obj and next_obj) or ((prev_obj or next_obj) and refine):
        p = prev if prev_obj else {}
        n = nxt if next_obj else {}
        out: list[str] = []
        for key in dict.fromkeys([*p, *n]):
            if p.get(key) is None and n.get(key) is None:
                continue
            out += diff_reload_paths(p.get(key), n.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [prefix or "<root>"]


def reload_kind(path: str) -> str:
    best: tuple[int, str] | None = None
    for prefix, kind in _RELOAD_RULES:
        if path == prefix or path.startswith(prefix + "."):
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), kind)
    return best[1] if best else "restart"


# -- the store --------------------------------------------------------------------------------------------


@dataclass
class ConfigSnapshot:
    path: Path
    exists: bool
    raw: str
    source: dict[str, Any]  # parsed file, `${VAR}` unexpanded
    resolved: dict[str, Any]  # env substituted
    issues: list[dict[str, str]] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.issues


class ConfigStore:
    """Reads and writes one openclaw.json; the simulator re-reads it on every request (no cache)."""

    def __init__(self, path: Path, state_dir: Path, env: Mapping[str, str] | None = None,
                 sticky: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.sticky = dict(sticky or {})  # test knob: keys every write keeps (SLOPBOX_SIM_STICKY_CONFIG)
        self.state_dir = state_dir
        self.env = env if env is not None else os.environ
        self._key = load_hash_key(state_dir)
        self.applied_hash = ""

    def hash_of(self, raw: str) -> str:
        return config_hash(self._key, raw)

    def revision_hash(self, source: Mapping[str, Any]) -> str:
        return config_hash(self._key, "rev:" + json.dumps(source, sort_keys=True))

    def read(self) -> ConfigSnapshot:
        if not self.path.exists():
            return ConfigSnapshot(self.path, False, "", {}, {})
        raw = self.path.read_text(encoding="utf-8")
        try:
            source = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            issue = {"path": "<root>", "message": f"JSON parse error: {exc.msg} at line {exc.lineno}"}
            return ConfigSnapshot(self.path, True, raw, {}, {}, [issue])
        if not isinstance(source, dict):
            return ConfigSnapshot(self.path, True, raw, {}, {}, [{"path": "<root>", "message": "Expected object"}])
        try:
            resolved = substitute_env(source, self.env)
        except ConfigError as exc:
            return ConfigSnapshot(self.path, True, raw, source, {}, exc.issues)
        return ConfigSnapshot(self.path, True, raw, source, resolved, validate(source))

    def mark_applied(self, snapshot: ConfigSnapshot) -> None:
        self.applied_hash = self.revision_hash(snapshot.source)

    def write(self, source: Mapping[str, Any]) -> ConfigSnapshot:
        data = copy.deepcopy(dict(source))
        if self.sticky:
            data = apply_merge_patch(data, self.sticky)
        meta = data.setdefault("meta", {})
        if isinstance(meta, dict):
            meta["lastTouchedVersion"] = VERSION
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.path)
        return self.read()

    def runtime_config(self, snapshot: ConfigSnapshot) -> dict[str, Any]:
        """The effective config with the defaults the real gateway fills in (then redacted by callers)."""
        base: dict[str, Any] = {
            "agents": {
                "entries": {"main": {}},
                "defaults": {
                    "maxConcurrent": 8,
                    "subagents": {"maxConcurrent": 8, "archiveAfterMinutes": 60},
                    "compaction": {"mode": "safeguard"},
                },
            },
            "commands": {"native": "auto", "nativeSkills": "auto", "restart": True},
            "messages": {"ackReactionScope": "group-mentions"},
        }
        return apply_merge_patch(base, snapshot.resolved)

    def source_with_defaults(self, snapshot: ConfigSnapshot) -> dict[str, Any]:
        merged = copy.deepcopy(snapshot.source)
        agents = merged.setdefault("agents", {})
        if isinstance(agents, dict):
            entries = agents.setdefault("entries", {})
            if isinstance(entries, dict) and not entries:
                entries["main"] = {}
        return merged
