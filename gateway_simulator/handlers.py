"""RPC methods the simulator implements, with the real gateway's params, payloads and errors.

Shapes were captured from a live openclaw 2026.9.6 gateway (channels skipped, no LLM key; `channels.status`
re-captured with channels on and no network). Where the
real gateway runs an agent, the simulator echoes: `chat.send` answers `echo: <message>`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway_simulator.config import (
    VERSION,
    ConfigError,
    apply_merge_patch,
    destructive_array_paths,
    diff_leaf_paths,
    diff_reload_paths,
    redact,
    redact_raw,
    reload_kind,
    restore_redacted,
    substitute_env,
    summarize_issues,
    validate,
)
from gateway_simulator.qr import qr_data_url
from gateway_simulator.server import Connection, RpcError, check_params, invalid, scope_satisfied
from gateway_simulator.state import WORKSPACE_LISTED, WORKSPACE_SETTABLE, DeviceStore, now_ms

if TYPE_CHECKING:
    from gateway_simulator.server import GatewaySimulator

Handler = Callable[[Connection, Any], Awaitable[Any]]
_PATCH_KEYS = frozenset("raw baseHash replacePaths sessionKey deliveryContext threadId note restartDelayMs".split())
_APPLY_KEYS = frozenset("raw baseHash sessionKey deliveryContext threadId note restartDelayMs".split())
_CHAT_SEND_KEYS = frozenset(
    "sessionKey message idempotencyKey agentId sessionId attachments thinking deliver timeoutMs".split()
)
_RATE_LIMIT = 30
_RATE_WINDOW_S = 60.0
_LOGIN_TTL_S = 180.0
_DOCTOR_HINT = (
    "Recommended follow-up: run openclaw doctor --non-interactive in a terminal or approvals-capable OpenClaw surface."
)
EVENT_LOOP = {
    "degraded": False,
    "degradedSinceMs": None,
    "reasons": [],
    "intervalMs": 1000.0,
    "delayP99Ms": 1.0,
    "delayMaxMs": 1.0,
    "utilization": 0.01,
}
AGENT_RUNTIME = {
    "id": "codex",
    "cloudPlacementSupported": False,
    "devicePlacementSupported": False,
    "source": "implicit",
}
WA_SCAN = "Scan this QR in WhatsApp → Linked Devices."


@dataclass
class WebLogin:
    account_id: str
    started: float = field(default_factory=time.monotonic)
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    version: int = 1
    connected: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def qr(self) -> str:
        return qr_data_url(f"{self.secret}:{self.version}")

    def fresh(self) -> bool:
        return time.monotonic() - self.started < _LOGIN_TTL_S

    def bump(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Handlers:
    def __init__(self, sim: GatewaySimulator) -> None:
        self.sim = sim
        self._telegram_started: int | None = None  # when the (simulated) Telegram bot last started
        self._token_started: dict[str, int] = {}  # when a plugin's (simulated) Discord/Slack bot started
        self._table: dict[str, Handler] = {
            "health": self.health,
            "status": self.status,
            "gateway.restart.preflight": self.restart_preflight,
            "gateway.restart.request": self.restart_request,
            "config.get": self.config_get,
            "config.patch": self.config_patch,
            "config.apply": self.config_apply,
            "config.set": self.config_set,
            "config.schema": self.config_schema,
            "agents.list": self.agents_list,
            "agents.files.list": self.agents_files_list,
            "agents.files.get": self.agents_files_get,
            "agents.files.set": self.agents_files_set,
            "channels.status": self.channels_status,
            "channels.logout": self.channels_logout,
            "web.login.start": self.web_login_start,
            "web.login.wait": self.web_login_wait,
            "chat.send": self.chat_send,
            "chat.history": self.chat_history,
            "sessions.list": self.sessions_list,
            "device.pair.list": self.device_pair_list,
            "device.pair.approve": self.device_pair_approve,
            "device.pair.reject": self.device_pair_reject,
            "device.pair.remove": self.device_pair_remove,
            "device.scopes.requestUpgrade": self.device_scopes_request_upgrade,
            "exec.approval.list": self.empty_list,
        }
        self._writes: dict[tuple[str, str], list[float]] = {}
        self._logins: dict[str, WebLogin] = {}

        self._rotator: asyncio.Task[None] | None = None

    # WhatsApp "creds" live where the real plugin keeps them, so a link survives restarts.
    def _creds_path(self, account_id: str) -> Path:
        return self.sim.state_dir / "credentials" / "whatsapp" / account_id / "creds.json"

    def _linked(self, account_id: str) -> dict[str, Any] | None:
        path = self._creds_path(account_id)
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("me")
        except (FileNotFoundError, ValueError, AttributeError):
            return None

    def _link(self, account_id: str, me: dict[str, Any]) -> None:
        path = self._creds_path(account_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"simulated": True, "me": me}), encoding="utf-8")
        path.chmod(0o600)

    def _unlink(self, account_id: str) -> bool:
        path = self._creds_path(account_id)
        if not path.exists():
            return False
        path.unlink()
        return True

    def lookup(self, method: str) -> Handler | None:
        return self._table.get(method)

    def close(self) -> None:
        if self._rotator is not None:
            self._rotator.cancel()

    # -- health / status ---------------------------------------------------------------------------

    def health_payload(self, *, snapshot: bool = False) -> dict[str, Any]:
        sessions = {"path": str(self.sim.chat.path), "count": len(self.sim.chat.sessions), "recent": []}
        channels = self._channel_summaries()
        return {
            "ok": True,
            "ts": now_ms(),
            "durationMs": 1,
            "plugins": {"loaded": self._plugins(), "errors": [], "unavailable": []},
            "configReload": {"hotReloadStatus": "active"},
            "channels": channels,
            "channelOrder": list(channels),
            "channelLabels": {k: v["label"] for k, v in channels.items()},
            "heartbeatSeconds": 1800,
            "defaultAgentId": "main",
            "agents": [
                {
                    "agentId": agent_id,
                    "isDefault": agent_id == "main",
                    "heartbeat": {
                        "enabled": True,
                        "every": "30m",
                        "everyMs": 1_800_000,
                        "prompt": "Gateway simulator heartbeat. If nothing needs attention, reply NO_REPLY.",
                        "target": "owner",
                        "ackMaxChars": 300,
                    },
                    "sessions": sessions,
                }
                for agent_id in self._agent_ids()
            ],
            "sessions": sessions,
            **({} if snapshot else {"modelRuntime": {"degraded": False, "pendingAgents": []}}),
            "eventLoop": EVENT_LOOP,
        }

    def _plugin_on(self, plugin_id: str) -> bool:
        """An external channel plugin installed (`whatsapp_plugin`, `token_plugins`) *and* enabled: like the
        real 2026.9.6 gateway, an installed one is loaded only when `plugins.entries.<id>.enabled` is true."""
        installed = self.sim.options.whatsapp_plugin if plugin_id == "whatsapp" else (
            plugin_id in self.sim.options.token_plugins)
        if not installed:
            return False
        entries = (self.sim.config.read().resolved.get("plugins") or {}).get("entries") or {}
        entry = entries.get(plugin_id) if isinstance(entries, dict) else None
        return isinstance(entry, dict) and entry.get("enabled") is True

    def _whatsapp_on(self) -> bool:
        return self._plugin_on("whatsapp")

    def _plugins(self) -> list[str]:
        plugins = ["anthropic", "device-pair", "memory-core", "openai", "telegram"]
        plugins += [p for p in ("discord", "slack", "whatsapp") if self._plugin_on(p)]
        return sorted(plugins)

    async def health(self, conn: Connection, params: Any) -> Any:
        check_params("health", params, {"probe"})
        payload = self.health_payload()
        self.sim.spawn(conn.event("health", payload))
        return payload

    async def status(self, conn: Connection, params: Any) -> Any:
        check_params("status", params, set())
        return {
            "runtimeVersion": VERSION,
            "heartbeat": {
                "defaultAgentId": "main",
                "agents": [{"agentId": a, "enabled": True} for a in self._agent_ids()],
            },
            "channelSummary": [],
            "queuedSystemEvents": [],
            "tasks": {"total": 0, "active": 0, "terminal": 0, "failures": 0},
            "taskAudit": {"total": 0, "warnings": 0, "errors": 0},
            "sessions": {"count": len(self.sim.chat.sessions), "recent": []},
            "simulator": True,
        }

    async def empty_list(self, conn: Connection, params: Any) -> Any:
        return []

    # -- restart ------------------------------------------------------------------------------------

    @staticmethod
    def _preflight() -> dict[str, Any]:
        counts = dict.fromkeys(
            ("queueSize", "pendingReplies", "embeddedRuns", "cronRuns", "backgroundExecSessions", "rootRequests"), 0
        )
        counts.update(activeTasks=0, totalActive=0)
        return {"safe": True, "counts": counts, "blockers": [], "summary": "safe to restart now"}

    async def restart_preflight(self, conn: Connection, params: Any) -> Any:
        check_params("gateway.restart.preflight", params, set())
        return self._preflight()

    async def restart_request(self, conn: Connection, params: Any) -> Any:
        p = check_params("gateway.restart.request", params, {"reason", "skipDeferral", "delayMs", "note"})
        restart = self.sim.schedule_restart(str(p.get("reason") or "gateway.restart.request"))
        return {"ok": True, "status": "scheduled", "preflight": self._preflight(), "restart": restart}

    # -- config -------------------------------------------------------------------------------------

    def _rate_limit(self, conn: Connection, method: str) -> None:
        key = (method, conn.device_id or conn.ingress.client_ip or "?")
        now = time.monotonic()
        window = [t for t in self._writes.get(key, []) if now - t < _RATE_WINDOW_S]
        if len(window) >= _RATE_LIMIT:
            retry_ms = int((_RATE_WINDOW_S - (now - window[0])) * 1000)
            raise RpcError(
                "UNAVAILABLE",
                f"rate limit exceeded for {method}; retry after {max(1, retry_ms // 1000)}s",
                retryable=True,
                retryAfterMs=retry_ms,
                details={"method": method, "limit": f"{_RATE_LIMIT} per {int(_RATE_WINDOW_S)}s"},
            )
        window.append(now)
        self._writes[key] = window

    async def config_get(self, conn: Connection, params: Any) -> Any:
        check_params("config.get", params, set())
        cfg = self.sim.config
        snap = cfg.read()
        source = cfg.source_with_defaults(snap) if snap.valid else snap.source
        runtime = redact(cfg.runtime_config(snap)) if snap.valid else {}
        revision = cfg.revision_hash(snap.source)
        return {
            "path": str(snap.path),
            "includedPaths": [],
            "includeProvenance": [],
            "agentRosterIncludeOwned": False,
            "bindingsIncludeOwned": False,
            "exists": snap.exists,
            "raw": redact_raw(snap.raw, snap.source) if snap.exists else None,
            "parsed": json.loads(redact_raw(json.dumps(snap.source), snap.source)),
            "sourceConfig": redact(source),
            "resolved": redact(source),
            "valid": snap.valid,
            "runtimeConfig": runtime,
            "config": runtime,
            "hash": cfg.hash_of(snap.raw),
            "issues": snap.issues,
            "warnings": [],
            "legacyIssues": [],
            "configRevisionHash": revision,
            "appliedConfigHash": cfg.applied_hash,
        }

    def _check_base_hash(self, params: dict[str, Any], snap: Any) -> None:
        if not snap.exists:
            return
        base = params.get("baseHash")
        if not isinstance(base, str) or not base.strip():
            raise invalid("config base hash required; re-run config.get and retry")
        if base.strip() != self.sim.config.hash_of(snap.raw):
            raise invalid("config changed since last load; re-run config.get and retry")

    @staticmethod
    def _parse_raw(method: str, params: dict[str, Any]) -> Any:
        raw = params.get("raw")
        if not isinstance(raw, str):
            raise invalid(f"invalid {method} params: raw (string) required")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise invalid(f"JSON5: invalid input at line {exc.lineno} column {exc.colno}: {exc.msg}") from None

    def _validated(self, candidate: dict[str, Any]) -> None:
        issues = validate(candidate)
        if not issues:
            try:
                substitute_env(candidate, self.sim.config.env)
            except ConfigError as exc:
                issues = exc.issues
        if issues:
            raise invalid(summarize_issues(issues), details={"issues": issues})

    async def _commit(
        self, conn: Connection, method: str, params: dict[str, Any], prev: Any, new_source: dict[str, Any]
    ) -> dict[str, Any]:
        sim = self.sim
        old_auth = sim.auth_settings(prev)
        changed = diff_reload_paths(prev.resolved, substitute_env(new_source, sim.config.env))
        snap = sim.config.write(new_source)
        kinds = {reload_kind(p) for p in changed}
        requires_restart = "restart" in kinds
        if not requires_restart:
            sim.config.mark_applied(snap)
        payload = {
            "ok": True,
            "path": str(snap.path),
            "hash": sim.config.hash_of(snap.raw),
            "config": redact(sim.config.source_with_defaults(snap)),
            **({"changedPaths": changed} if method == "config.patch" else {}),
            "sentinel": {
                "persisted": True,
                "payload": {
                    "kind": "config-patch" if method == "config.patch" else "config-apply",
                    "status": "ok",
                    "ts": now_ms(),
                    "message": params.get("note"),
                    "doctorHint": _DOCTOR_HINT,
                    "stats": {"mode": method, "root": str(snap.path), "requiresRestart": requires_restart},
                },
            },
        }
        sim.spawn(sim.broadcast("config.changed", {"path": str(snap.path), "hash": payload["hash"], "ts": now_ms()}))
        if not requires_restart and any(p.split(".")[0] in ("channels", "plugins") for p in changed):
            await self._reload_channels(method)
        if requires_restart:
            delay = params.get("restartDelayMs")
            sim.schedule_restart(method, int(delay) if isinstance(delay, int | float) else 500)
        elif sim.auth_settings(snap) != old_auth:

            async def later() -> None:
                await asyncio.sleep(0.05)  # after the response frame, as the real queueMicrotask
                await sim.disconnect_shared_auth()

            sim.spawn(later())
        return payload

    async def _reload_channels(self, method: str) -> None:
        """The real gateway answers a channel change after reloading the channel (`channel_reload_s`);
        a second write during that reload supersedes it and the gateway restarts to recover."""
        sim = self.sim
        if sim.options.channel_reload_s <= 0:
            return
        running = sim.channel_reload
        if running is not None and not running.done():

            async def recover() -> None:  # after the reload in progress has answered (the drain waits for it)
                await asyncio.wait([running])
                sim.schedule_restart("hot reload recovery: runtime commit")

            sim.spawn(recover())
            raise RpcError("UNAVAILABLE", f"{method} persisted and updated the active Gateway, but a recovery restart "
                           "is required; wait for the Gateway to restart, then run config.get to confirm the active "
                           "revision")
        sim.channel_reload = asyncio.ensure_future(asyncio.sleep(sim.options.channel_reload_s))
        await sim.channel_reload

    async def config_patch(self, conn: Connection, params: Any) -> Any:
        p = check_params("config.patch", params, _PATCH_KEYS, ("raw",))
        hashless = not (isinstance(p.get("baseHash"), str) and p["baseHash"].strip())
        snap = self.sim.config.read()
        if not hashless:
            self._check_base_hash(p, snap)
        if not snap.valid:
            raise invalid(f"{summarize_issues(snap.issues)}; fix (openclaw doctor) before patching")
        patch = self._parse_raw("config.patch", p)
        if not isinstance(patch, dict):
            raise invalid("config.patch raw must be an object")
        ui = patch.get("ui")
        if hashless and ui is not None and (not isinstance(ui, dict) or not isinstance(ui.get("prefs", {}), dict)):
            raise invalid("config base hash required; re-run config.get and retry")
        replace_paths = frozenset(str(x) for x in p.get("replacePaths") or [])
        merged = apply_merge_patch(snap.source, patch, replace_paths)
        try:
            merged = restore_redacted(merged, snap.source)
        except ConfigError as exc:
            raise invalid(exc.message) from None
        destructive = [x for x in destructive_array_paths(snap.source, patch, merged) if x not in replace_paths]
        if destructive:
            raise invalid(
                f"config.patch would remove entries from array path(s): {', '.join(destructive)}. Pass replacePaths "
                "with the exact path(s) when this is intentional, or use config.apply for full-config replacement."
            )
        leaf = diff_leaf_paths(snap.source, merged)
        if hashless and not all(x == "ui.prefs" or x.startswith("ui.prefs.") for x in leaf):
            guarded = [x for x in leaf if not (x == "ui.prefs" or x.startswith("ui.prefs."))]
            raise invalid(
                f"config base hash required for {', '.join(guarded)}; re-run config.get and retry with baseHash"
            )
        if not leaf:
            return {
                "ok": True,
                "noop": True,
                "changedPaths": [],
                "path": str(snap.path),
                "config": redact(self.sim.config.source_with_defaults(snap)),
            }
        self._validated(merged)
        self._rate_limit(conn, "config.patch")
        return await self._commit(conn, "config.patch", p, snap, merged)

    async def config_apply(self, conn: Connection, params: Any) -> Any:
        p = check_params("config.apply", params, _APPLY_KEYS, ("raw",))
        return await self._replace(conn, "config.apply", p)

    async def config_set(self, conn: Connection, params: Any) -> Any:
        p = check_params("config.set", params, {"raw", "baseHash"}, ("raw",))
        return await self._replace(conn, "config.set", p)

    async def _replace(self, conn: Connection, method: str, p: dict[str, Any]) -> Any:
        snap = self.sim.config.read()
        self._check_base_hash(p, snap)
        submitted = self._parse_raw(method, p)
        if not isinstance(submitted, dict):
            raise invalid(f"{method} raw must be an object")
        try:
            submitted = restore_redacted(submitted, snap.source)
        except ConfigError as exc:
            raise invalid(exc.message) from None
        self._validated(submitted)
        if method == "config.set":
            dropped = sorted(set(self._entries(snap.source)) - set(self._entries(submitted)))
            if dropped:
                raise invalid(
                    f"config.set would remove existing agent entries: {', '.join(dropped)}. Use the agents.delete "
                    "RPC or `openclaw agents delete <id>` for intentional deletion."
                )
        self._rate_limit(conn, method)
        payload = await self._commit(conn, method, p, snap, submitted)
        if method == "config.set":
            payload.pop("sentinel", None)
        return payload

    @staticmethod
    def _entries(source: dict[str, Any]) -> list[str]:
        agents = source.get("agents") if isinstance(source.get("agents"), dict) else {}
        entries = agents.get("entries") if isinstance(agents, dict) else None
        return list(entries) if isinstance(entries, dict) else []

    async def config_schema(self, conn: Connection, params: Any) -> Any:
        check_params("config.schema", params, set())
        schema = {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": False,
            "properties": {key: {"type": "object"} for key in sorted(_top_level_keys())},
        }
        return {"schema": schema, "uiHints": {}, "version": VERSION, "generatedAt": now_ms()}

    # -- agents ------------------------------------------------------------------------------------

    def _agent_ids(self) -> list[str]:
        snap = self.sim.config.read()
        ids = self._entries(snap.source) or ["main"]
        return ids if "main" in ids else ["main", *ids]

    def _agent_root(self, agent_id: Any) -> Any:
        if not isinstance(agent_id, str) or agent_id not in self._agent_ids():
            raise invalid(f'agent "{agent_id}" not found')
        return self.sim.workspace.workspace(agent_id, self.sim.config.read().resolved)

    async def agents_list(self, conn: Connection, params: Any) -> Any:
        check_params("agents.list", params, set())
        resolved = self.sim.config.read().resolved
        agents = [
            {
                "id": agent_id,
                "workspace": str(self.sim.workspace.workspace(agent_id, resolved)),
                "workspaceGit": False,
                "agentRuntime": AGENT_RUNTIME,
                "thinkingDefault": "medium",
                "model": {"primary": "openai/gpt-6-astra"},
                "defaultPermissionMode": "full",
            }
            for agent_id in self._agent_ids()
        ]
        return {
            "defaultId": "main",
            "ownership": "sole",
            "selectionRequired": False,
            "mainKey": "main",
            "scope": "per-sender",
            "agents": agents,
        }

    async def agents_files_list(self, conn: Connection, params: Any) -> Any:
        p = check_params("agents.files.list", params, {"agentId"}, ("agentId",))
        root = self._agent_root(p["agentId"])
        files = [self.sim.workspace.describe(root, name, content=False) for name in WORKSPACE_LISTED]
        return {"agentId": p["agentId"], "workspace": str(root), "files": files}

    def _file_name(self, name: Any) -> str:
        if not isinstance(name, str) or name not in WORKSPACE_SETTABLE:
            raise invalid(f'unsupported file "{name}"')
        return name

    async def agents_files_get(self, conn: Connection, params: Any) -> Any:
        p = check_params("agents.files.get", params, {"agentId", "name"}, ("agentId", "name"))
        root = self._agent_root(p["agentId"])
        name = self._file_name(p["name"])
        return {
            "agentId": p["agentId"],
            "workspace": str(root),
            "file": self.sim.workspace.describe(root, name, content=True),
        }

    async def agents_files_set(self, conn: Connection, params: Any) -> Any:
        p = check_params(
            "agents.files.set", params, {"agentId", "name", "content", "expectedHash"}, ("agentId", "name", "content")
        )
        root = self._agent_root(p["agentId"])
        name = self._file_name(p["name"])
        if not isinstance(p["content"], str):
            raise invalid("invalid agents.files.set params: at /content: must be string")
        current = self.sim.workspace.describe(root, name, content=False)
        expected = p.get("expectedHash")
        if expected is not None and expected != current.get("hash"):
            details = {"type": "agent_file_conflict", "name": name, "currentHash": current.get("hash")}
            raise invalid(f'agent file "{name}" changed since it was read', details=details)
        self.sim.workspace.write(root, name, p["content"])
        file = self.sim.workspace.describe(root, name, content=True)
        return {"ok": True, "agentId": p["agentId"], "workspace": str(root), "file": file}

    # -- channels / WhatsApp QR --------------------------------------------------------------------

    def _channel_summaries(self) -> dict[str, dict[str, Any]]:
        return {k: v[0] for k, v in self._channels().items()}

    def _telegram(self, telegram: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(channel summary, default account) as 2026.9.6 reports a bot that cannot reach Telegram.

        Channels on: a token makes it configured and started (`lifecycle: starting`), never
        connected. `OPENCLAW_SKIP_CHANNELS=1`: the gateway leaves `channels` out of its runtime
        config, so even a stored token reads as missing and nothing starts.
        """
        skipped = self.sim.options.env.get("OPENCLAW_SKIP_CHANNELS", "").strip().lower() in ("1", "true", "yes", "on")
        token = None if skipped else telegram.get("botToken") or telegram.get("tokenFile")
        enabled = telegram.get("enabled") is not False
        running = bool(token) and enabled
        if running and self._telegram_started is None:
            self._telegram_started = now_ms()
        elif not running:
            self._telegram_started = None
        source = "none" if not token else "tokenFile" if telegram.get("tokenFile") else "config"
        summary = {"configured": bool(token), "running": running, "lastStartAt": self._telegram_started,
                   "lastStopAt": None, "lastError": None, "tokenSource": source, "lastProbeAt": None,
                   "mode": "polling"}
        account: dict[str, Any] = {
            "accountId": "default", "enabled": enabled, "lastStartAt": self._telegram_started, "lastStopAt": None,
            "lastInboundAt": None, "lastOutboundAt": None, "tokenSource": source,
            "tokenStatus": "available" if token else "missing", "mode": "polling",
            "allowUnmentionedGroups": False, "configured": bool(token), "running": running, "lastError": None}
        if running:
            account.update(restartPending=False, reconnectAttempts=0, lifecycle="starting", connected=False)
        elif not token:
            account["stateReason"] = "not configured"
        return summary, account

    def _channels(self) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        """kind -> (summary with its label, default account snapshot), for the channels this gateway runs."""
        channels_cfg = self.sim.config.read().resolved.get("channels")
        channels_cfg = channels_cfg if isinstance(channels_cfg, dict) else {}
        out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        # Discord and Slack are not bundled with 2026.9.6: without their installed, enabled plugin (`token_plugins`)
        # their config is accepted and nothing runs them.
        telegram = channels_cfg.get("telegram")
        if isinstance(telegram, dict):
            summary, account = self._telegram(telegram)
            out["telegram"] = ({"label": "Telegram", **summary}, account)
        else:
            self._telegram_started = None
        for kind in ("discord", "slack"):
            block = channels_cfg.get(kind)
            if isinstance(block, dict) and self._plugin_on(kind):
                out[kind] = self._offline_token_channel(kind, block)
            else:
                self._token_started.pop(kind, None)
        if self._whatsapp_on():
            linked = self._linked("default")
            entry: dict[str, Any] = {
                "label": "WhatsApp",
                "configured": isinstance(channels_cfg.get("whatsapp"), dict) or linked is not None,
                "linked": linked is not None,
                "running": linked is not None,
                "connected": linked is not None,
            }
            if linked:
                entry["self"] = linked
            out["whatsapp"] = (entry, {"accountId": "default", **{k: v for k, v in entry.items() if k != "label"}})
        return out

    def _offline_token_channel(self, kind: str, block: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Discord or Slack run by its plugin on a machine that cannot reach the service, in the shapes
        2026.9.6 reported for a made-up token here: Discord's bot gives up (not running, its error kept),
        Slack's socket mode keeps retrying (running, never connected)."""
        started = self._token_started.setdefault(kind, now_ms())
        if kind == "discord":
            error = "Failed to resolve Discord application id: fetch failed | getaddrinfo ENOTFOUND discord.com"
            summary = {"configured": True, "running": False, "lastStartAt": started, "lastStopAt": started,
                       "lastError": error, "tokenSource": "config", "lastProbeAt": None}
            account = {"accountId": "default", "enabled": block.get("enabled") is not False, "lastStartAt": started,
                       "lastStopAt": started, "restartPending": True, "reconnectAttempts": 1,
                       "lifecycle": "recovering", "tokenSource": "config", "tokenStatus": "available",
                       "configured": True, "running": False, "connected": False, "lastError": error}
            return {"label": "Discord", **summary}, account
        error = ("A request error occurred: fetch failed; cause: getaddrinfo ENOTFOUND slack.com; "
                 "code: slack_webapi_request_error")
        summary = {"configured": True, "botTokenSource": "config", "appTokenSource": "config", "running": True,
                   "lastStartAt": started, "lastStopAt": None, "lastError": error, "lastProbeAt": None}
        account = {"accountId": "default", "enabled": block.get("enabled") is not False, "lastStartAt": started,
                   "lastStopAt": None, "restartPending": False, "reconnectAttempts": 0, "lifecycle": "recovering",
                   "botTokenSource": "config", "appTokenSource": "config", "configured": True, "running": True,
                   "connected": False, "lastError": error}
        return {"label": "Slack", **summary}, account

    async def channels_status(self, conn: Connection, params: Any) -> Any:
        p = check_params("channels.status", params, {"probe", "timeoutMs", "channel"})
        listed = self._channels()
        if p.get("channel") is not None:
            listed = {k: v for k, v in listed.items() if k == p["channel"]}
        channels = {k: {kk: vv for kk, vv in v[0].items() if kk != "label"} for k, v in listed.items()}
        return {
            "ts": now_ms(),
            "channelOrder": list(listed),
            "channelLabels": {k: v[0]["label"] for k, v in listed.items()},
            "channelDetailLabels": {},
            "channelSystemImages": {},
            "channelMeta": [],
            "eventLoop": EVENT_LOOP,
            "channels": channels,
            "channelAccounts": {k: [v[1]] for k, v in listed.items()},
            "channelDefaultAccountId": dict.fromkeys(channels, "default"),
            "statusIssues": [],
        }

    async def channels_logout(self, conn: Connection, params: Any) -> Any:
        p = check_params("channels.logout", params, {"channel", "accountId"}, ("channel",))
        if p["channel"] != "whatsapp" or not self._whatsapp_on():
            raise invalid("invalid channels.logout channel")
        account = str(p.get("accountId") or "default")
        cleared = self._unlink(account)
        self._logins.pop(account, None)
        return {"channel": "whatsapp", "accountId": account, "cleared": cleared, "loggedOut": cleared}

    def _web_provider(self, params: dict[str, Any]) -> None:
        channel = params.get("channel")
        if not self._whatsapp_on() or (channel is not None and str(channel).lower() != "whatsapp"):
            raise invalid("web login provider is not available")

    def _ensure_rotator(self) -> None:
        if self._rotator is None or self._rotator.done():
            self._rotator = asyncio.create_task(self._rotate_qrs())

    async def _rotate_qrs(self) -> None:
        while self._logins:
            await asyncio.sleep(self.sim.options.qr_rotate_s)
            for login in list(self._logins.values()):
                if not login.connected:
                    login.version += 1
                    login.bump()

    def complete_web_login(self, account_id: str = "default") -> bool:
        """Simulate the phone scanning the current QR (test hook; no real-gateway equivalent)."""
        login = self._logins.get(account_id)
        if login is None or not login.fresh():
            return False
        login.connected = True
        login.bump()
        return True

    async def web_login_start(self, conn: Connection, params: Any) -> Any:
        p = check_params("web.login.start", params, {"channel", "accountId", "force", "timeoutMs", "verbose"})
        self._web_provider(p)
        account = str(p.get("accountId") or "default")
        linked = self._linked(account)
        if linked and not p.get("force"):
            return {"message": f"WhatsApp is already linked ({linked['e164']}). Say “relink” if you want a fresh QR."}
        existing = self._logins.get(account)
        if existing and existing.fresh() and not existing.connected and not p.get("force"):
            return {"qrDataUrl": existing.qr, "message": "QR already active. Scan it in WhatsApp → Linked Devices."}
        login = WebLogin(account)
        self._logins[account] = login
        self._ensure_rotator()
        return {"qrDataUrl": login.qr, "message": WA_SCAN}

    async def web_login_wait(self, conn: Connection, params: Any) -> Any:
        p = check_params(
            "web.login.wait", params, {"channel", "accountId", "sessionKey", "timeoutMs", "currentQrDataUrl"}
        )
        self._web_provider(p)
        account = str(p.get("accountId") or "default")
        login = self._logins.get(account)
        if login is None:
            return {"connected": False, "message": "No active WhatsApp login in progress."}
        if not login.fresh():
            self._logins.pop(account, None)
            return {"connected": False, "message": "The login QR expired. Ask me to generate a new one."}
        timeout_ms = p.get("timeoutMs") if isinstance(p.get("timeoutMs"), int | float) else 120_000
        deadline = time.monotonic() + max(1.0, timeout_ms / 1000)
        current = p.get("currentQrDataUrl")
        while True:
            if login.connected:
                self._logins.pop(account, None)
                self._link(account, {"e164": "+15550000000", "jid": "15550000000@s.whatsapp.net"})
                return {"connected": True, "message": "✅ Linked! WhatsApp is ready."}
            if current and login.qr != current:
                return {
                    "connected": False,
                    "message": "QR refreshed. Scan the latest code in WhatsApp → Linked Devices.",
                    "qrDataUrl": login.qr,
                }
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {
                    "connected": False,
                    "message": "Still waiting for the QR scan. Let me know when you’ve scanned it.",
                }
            changed = login.changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                continue

    # -- chat --------------------------------------------------------------------------------------

    async def chat_send(self, conn: Connection, params: Any) -> Any:
        p = check_params("chat.send", params, _CHAT_SEND_KEYS, ("sessionKey", "message", "idempotencyKey"))
        if not isinstance(p["message"], str) or "\x00" in p["message"]:
            raise invalid("message must not contain null bytes")
        key = str(p["sessionKey"])
        run_id = str(p["idempotencyKey"])
        session = self.sim.chat.session(key)
        if run_id in session["runs"]:
            return {"runId": run_id, "status": session["runs"][run_id]}
        session["runs"][run_id] = "started"
        self.sim.chat.append(
            key,
            {
                "role": "user",
                "content": p["message"],
                "timestamp": now_ms(),
                "idempotencyKey": f"{run_id}:user",
                "__openclaw": {"senderIsOwner": True},
            },
        )
        self.sim.spawn(self._echo_run(key, run_id, p["message"]))
        return {"runId": run_id, "status": "started"}

    async def _echo_run(self, key: str, run_id: str, text: str) -> None:
        sim = self.sim
        reply = f"echo: {text}"
        agent_id = key.split(":")[1] if key.startswith("agent:") and key.count(":") >= 2 else "main"
        seq = 0

        def nxt() -> int:
            nonlocal seq
            seq += 1
            return seq

        await asyncio.sleep(0)
        base = {"runId": run_id, "sessionKey": key}
        await sim.broadcast(
            "chat",
            {**base, "agentId": agent_id, "seq": nxt(), "state": "status", "phase": "preparing_workspace"},
            scope="operator.read",
        )
        await sim.broadcast(
            "agent",
            {
                **base,
                "agentId": agent_id,
                "stream": "lifecycle",
                "data": {"phase": "start"},
                "seq": seq,
                "ts": now_ms(),
            },
            scope="operator.read",
        )
        message = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
        await sim.broadcast(
            "chat",
            {**base, "seq": nxt(), "state": "delta", "deltaText": reply, "replace": True, "message": message},
            scope="operator.read",
        )
        stored = sim.chat.append(
            key, {**copy.deepcopy(message), "timestamp": now_ms(), "__openclaw": {"runId": run_id}}
        )
        await sim.broadcast(
            "chat",
            {
                **base,
                "seq": nxt(),
                "state": "final",
                "message": {**message, "timestamp": stored["timestamp"]},
                "stopReason": "stop",
            },
            scope="operator.read",
        )
        await sim.broadcast(
            "agent",
            {**base, "agentId": agent_id, "stream": "lifecycle", "data": {"phase": "end"}, "seq": seq, "ts": now_ms()},
            scope="operator.read",
        )
        sim.chat.session(key)["runs"][run_id] = "ok"
        sim.chat.save()

    async def chat_history(self, conn: Connection, params: Any) -> Any:
        p = check_params(
            "chat.history",
            params,
            {"sessionKey", "limit", "cursor", "offset", "maxBytes", "messageId", "sessionId"},
            ("sessionKey",),
        )
        key = str(p["sessionKey"])
        session = self.sim.chat.sessions.get(key)
        messages = list(session["messages"]) if session else []
        limit = p.get("limit")
        shown = messages[-int(limit) :] if isinstance(limit, int) and limit > 0 else messages
        out: dict[str, Any] = {"sessionKey": key}
        if session:
            out["sessionId"] = session["sessionId"]
        out.update(
            messages=shown,
            pendingInputs={"items": [], "total": 0},
            hasMore=len(shown) < len(messages),
            totalMessages=len(messages),
            defaults={
                "modelProvider": "openai",
                "model": "gpt-6-astra",
                "contextTokens": 200000,
                "agentRuntime": AGENT_RUNTIME,
                "modelSelectionTarget": "session",
            },
            sessionInfo={"key": key, "agentId": "main", "isMain": key == "agent:main:main", "hasActiveRun": False},
        )
        return out

    async def sessions_list(self, conn: Connection, params: Any) -> Any:
        check_params("sessions.list", params, {"limit", "agentId", "includeArchived", "cursor"})
        sessions = [
            {"key": k, "sessionId": s["sessionId"], "agentId": "main"} for k, s in self.sim.chat.sessions.items()
        ]
        return {"sessions": sessions, "count": len(sessions), "hasMore": False}

    # -- device pairing ----------------------------------------------------------------------------

    def _connected_ids(self) -> set[str]:
        return {c.device_id for c in self.sim.connections if c.authenticated and c.device_id}

    async def device_pair_list(self, conn: Connection, params: Any) -> Any:
        check_params("device.pair.list", params, set())
        store = self.sim.devices
        connected = self._connected_ids()
        return {
            "pending": list(store.pending.values()),
            "paired": [
                DeviceStore.public_record(r, r["deviceId"] in connected)
                for r in sorted(store.paired.values(), key=lambda r: r.get("approvedAtMs", 0), reverse=True)
            ],
        }

    async def device_pair_approve(self, conn: Connection, params: Any) -> Any:
        p = check_params("device.pair.approve", params, {"requestId"}, ("requestId",))
        request = self.sim.devices.pending.get(str(p["requestId"]))
        if request is None:
            raise invalid("unknown requestId")
        for scope in request.get("scopes", []):
            if not scope_satisfied(scope, conn.scopes):
                raise invalid(f"missing scope: {scope}")
        record = self.sim.devices.approve(str(p["requestId"]))
        assert record is not None
        device = DeviceStore.public_record(record, False)
        device.pop("connected", None)
        await self.sim.broadcast(
            "device.pair.resolved",
            {"requestId": p["requestId"], "deviceId": record["deviceId"], "decision": "approved", "ts": now_ms()},
            scope="operator.pairing",
        )
        return {"requestId": p["requestId"], "device": device}

    async def device_pair_reject(self, conn: Connection, params: Any) -> Any:
        p = check_params("device.pair.reject", params, {"requestId"}, ("requestId",))
        request = self.sim.devices.reject(str(p["requestId"]))
        if request is None:
            raise invalid("unknown requestId")
        await self.sim.broadcast(
            "device.pair.resolved",
            {"requestId": p["requestId"], "deviceId": request["deviceId"], "decision": "rejected", "ts": now_ms()},
            scope="operator.pairing",
        )
        return {"requestId": p["requestId"], "deviceId": request["deviceId"]}

    async def device_pair_remove(self, conn: Connection, params: Any) -> Any:
        p = check_params("device.pair.remove", params, {"deviceId"}, ("deviceId",))
        record = self.sim.devices.paired.pop(str(p["deviceId"]), None)
        if record is None:
            raise invalid("unknown deviceId")
        self.sim.devices.save()
        for other in [c for c in self.sim.connections if c.device_id == p["deviceId"]]:
            self.sim.spawn(other.close(4001, "client invalidated: device-removed"))
        return {"deviceId": p["deviceId"], "removedAtMs": now_ms()}

    async def device_scopes_request_upgrade(self, conn: Connection, params: Any) -> Any:
        p = check_params("device.scopes.requestUpgrade", params, {"scopes"}, ("scopes",))
        if conn.device_id is None or conn.device_id not in self.sim.devices.paired:
            raise invalid("device identity required for scope upgrade")
        record = self.sim.devices.paired[conn.device_id]
        info = {k: record[k] for k in ("deviceId", "publicKey", "platform", "clientId", "clientMode") if k in record}
        scopes = sorted(set(record.get("scopes", [])) | {str(s) for s in p["scopes"]})
        request, created = self.sim.devices.request(
            {**info, "role": "operator", "roles": ["operator"], "scopes": scopes}, is_repair=True
        )
        if created:
            await self.sim.broadcast("device.pair.requested", request, scope="operator.pairing")
        return {"requestId": request["requestId"]}


def _top_level_keys() -> frozenset[str]:
    from gateway_simulator.config import TOP_LEVEL_KEYS

    return TOP_LEVEL_KEYS
