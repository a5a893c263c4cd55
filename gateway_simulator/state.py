"""Persistent simulator state under OPENCLAW_STATE_DIR: device pairing, workspace files, chat history.

Everything is plain JSON (the real gateway uses SQLite whose schema is private), written atomically,
so that a simulated "restart" or a new process on the same state dir finds it again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

WORKSPACE_LISTED = ("AGENTS.md", "SOUL.md", "USER.md", "BOOTSTRAP.md", "MEMORY.md")
WORKSPACE_SETTABLE = frozenset((*WORKSPACE_LISTED, "IDENTITY.md"))
# As the real gateway reports them for a fresh workspace.
_EXPECTED_ABSENT = {"AGENTS.md": False, "SOUL.md": True, "USER.md": True, "BOOTSTRAP.md": False, "MEMORY.md": True}


def now_ms() -> int:
    return int(time.time() * 1000)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return copy.deepcopy(default)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)


class DeviceStore:
    """Paired devices (with their operator tokens) and pending pairing requests."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state" / "gateway-simulator-devices.json"
        data = _read_json(self.path, {"paired": {}, "pending": {}})
        self.paired: dict[str, dict[str, Any]] = data.get("paired", {})
        self.pending: dict[str, dict[str, Any]] = data.get("pending", {})
        self._import_legacy(state_dir / "devices" / "paired.json")

    def _import_legacy(self, legacy: Path) -> None:
        """The seeded `devices/paired.json` the real gateway imports once at startup (reference §6.2)."""
        if not legacy.exists():
            return
        try:
            records = json.loads(legacy.read_text(encoding="utf-8"))
        except ValueError:
            return
        if isinstance(records, dict):
            for device_id, record in records.items():
                if isinstance(record, dict) and device_id not in self.paired:  # existing rows win
                    self.paired[device_id] = dict(record, deviceId=device_id)
        legacy.rename(legacy.with_name("paired.json.migrated"))
        self.save()

    def save(self) -> None:
        _write_json(self.path, {"paired": self.paired, "pending": self.pending})

    def token_for(self, device_id: str, role: str = "operator") -> dict[str, Any] | None:
        record = self.paired.get(device_id)
        token = (record or {}).get("tokens", {}).get(role)
        return token if isinstance(token, dict) and not token.get("revokedAtMs") else None

    def request(self, info: dict[str, Any], *, is_repair: bool) -> tuple[dict[str, Any], bool]:
        """Create (or refresh) the pending request for a device; returns (request, created)."""
        for request in self.pending.values():
            if request["deviceId"] == info["deviceId"]:
                request.update(info, ts=now_ms())
                self.save()
                return request, False
        request = {"requestId": str(uuid.uuid4()), **info, "silent": False, "isRepair": is_repair, "ts": now_ms()}
        self.pending[request["requestId"]] = request
        self.save()
        return request, True

    def approve(self, request_id: str, approved_via: str = "owner") -> dict[str, Any] | None:
        request = self.pending.pop(request_id, None)
        if request is None:
            return None
        record = self.pair(request, approved_via=approved_via)
        self.save()
        return record

    def pair(self, info: dict[str, Any], *, approved_via: str) -> dict[str, Any]:
        """Record an approval and (re)issue the operator token, keeping the old one if it still covers."""
        ts = now_ms()
        device_id = info["deviceId"]
        existing = self.paired.get(device_id, {})
        scopes = list(info.get("scopes", []))
        keep = ("deviceId", "publicKey", "displayName", "platform", "deviceFamily", "clientId", "clientMode")
        record = {k: info[k] for k in keep if info.get(k) is not None}
        record.update(
            role=info.get("role", "operator"),
            roles=info.get("roles", ["operator"]),
            scopes=scopes,
            approvedScopes=sorted(set(scopes) | set(existing.get("approvedScopes", []))),
            approvedVia=approved_via,
            createdAtMs=existing.get("createdAtMs", ts),
            approvedAtMs=ts,
        )
        if info.get("remoteIp"):
            record["remoteIp"] = info["remoteIp"]
        token = existing.get("tokens", {}).get("operator")
        if not token or not set(scopes) <= set(token.get("scopes", [])):
            token = {
                "token": secrets.token_urlsafe(32),
                "role": "operator",
                "scopes": sorted(scopes),
                "createdAtMs": ts,
            }
        record["tokens"] = {"operator": token}
        self.paired[device_id] = record
        self.save()
        return record

    def reject(self, request_id: str) -> dict[str, Any] | None:
        request = self.pending.pop(request_id, None)
        if request is not None:
            self.save()
        return request

    def touch(self, device_id: str) -> None:
        record = self.paired.get(device_id)
        if record is None:
            return
        ts = now_ms()
        record["lastSeenAtMs"] = ts
        record["lastSeenReason"] = "connect"
        if "operator" in record.get("tokens", {}):
            record["tokens"]["operator"]["lastUsedAtMs"] = ts
        self.save()

    @staticmethod
    def public_record(record: dict[str, Any], connected: bool) -> dict[str, Any]:
        """What device.pair.list shows: token metadata, never the token itself."""
        out = {k: v for k, v in record.items() if k not in ("tokens", "approvedScopes")}
        out["connected"] = connected
        out["tokens"] = [
            {k: v for k, v in token.items() if k != "token"} for token in record.get("tokens", {}).values()
        ]
        return out


class WorkspaceStore:
    """The agent bootstrap files behind agents.files.*."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def workspace(self, agent_id: str, config: dict[str, Any]) -> Path:
        agents = config.get("agents") if isinstance(config.get("agents"), dict) else {}
        entry = (agents.get("entries") or {}).get(agent_id) or {}
        configured = entry.get("workspace") if isinstance(entry, dict) else None
        if agent_id == "main":
            configured = configured or (agents.get("defaults") or {}).get("workspace")
        if isinstance(configured, str) and configured:
            return Path(configured).expanduser()
        return self.state_dir / ("workspace" if agent_id == "main" else f"workspace-{agent_id}")

    @staticmethod
    def describe(root: Path, name: str, *, content: bool) -> dict[str, Any]:
        path = root / name
        info: dict[str, Any] = {"name": name, "path": str(path)}
        if not path.exists():
            info.update(missing=True, expectedAbsent=_EXPECTED_ABSENT.get(name, False))
            return info
        data = path.read_bytes()
        info.update(
            missing=False,
            size=len(data),
            updatedAtMs=int(path.stat().st_mtime * 1000),
            hash=hashlib.sha256(data).hexdigest(),
        )
        if content:
            info["content"] = data.decode("utf-8", errors="replace")
        return info

    @staticmethod
    def write(root: Path, name: str, text: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(root / name)


class ChatStore:
    """Transcript per session key, enough for chat.history round trips."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state" / "gateway-simulator-chat.json"
        self.sessions: dict[str, dict[str, Any]] = _read_json(self.path, {})

    def session(self, key: str) -> dict[str, Any]:
        return self.sessions.setdefault(key, {"sessionId": str(uuid.uuid4()), "messages": [], "runs": {}})

    def append(self, key: str, message: dict[str, Any]) -> dict[str, Any]:
        session = self.session(key)
        seq = len(session["messages"]) + 1
        meta = dict(message.pop("__openclaw", {}), id=str(uuid.uuid4()), seq=seq, recordTimestampMs=now_ms())
        stored = {**message, "__openclaw": meta}
        session["messages"].append(stored)
        _write_json(self.path, self.sessions)
        return stored

    def save(self) -> None:
        _write_json(self.path, self.sessions)
