"""The OpenClaw gateway SIMULATOR: an aiohttp server speaking a subset of protocol v4.

Not OpenClaw. It stands in for `openclaw gateway run` where Node/OpenClaw are not installed, and it
is launched the same way. Frames, error codes, close codes and HTTP bodies follow what a live
openclaw 2026.9.6 gateway sends (shared/reference/openclaw-gateway.md, plus captures made against
the real gateway); behaviour beyond that subset answers UNAVAILABLE "not simulated".

Layout: this module owns the lifecycle (listen, drain, restart), HTTP routes, the WS handshake and
request dispatch; `handlers.py` implements the RPC methods; `config.py` and `state.py` persist.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from gateway_simulator import protocol_data
from gateway_simulator.config import VERSION, ConfigSnapshot, ConfigStore, summarize_issues
from gateway_simulator.options import DEFAULT_PORT, SimulatorOptions
from gateway_simulator.state import ChatStore, DeviceStore, WorkspaceStore, now_ms
from gateway_simulator.tls import TlsError, server_context

log = logging.getLogger("gateway_simulator")

BUILD_ID = "2026.9.6-simulator"
PREAUTH_MAX_BYTES = 65_536
MAX_PAYLOAD = 26_214_400
CLIENT_IDS = frozenset(
    "webchat-ui openclaw-control-ui openclaw-browser-copilot openclaw-tui webchat cli gateway-client "
    "openclaw-macos openclaw-linux openclaw-ios openclaw-watchos openclaw-android node-host openclaw-worker "
    "test fingerprint openclaw-probe".split()
)
CLIENT_MODES = frozenset("webchat ui cli backend node worker probe test".split())
CONNECT_KEYS = frozenset(
    "minProtocol maxProtocol client caps commands permissions pathEnv role scopes modelCatalog device auth "
    "locale userAgent computerUse workerRuns".split()
)
CLIENT_KEYS = frozenset(
    "id version platform mode displayName buildId deviceFamily modelIdentifier timeZone instanceId".split()
)
AUTH_KEYS = frozenset(
    "token password deviceToken bootstrapToken approvalRuntimeToken agentRuntimeIdentityToken".split()
)
DEVICE_KEYS = frozenset("id publicKey signature signedAt nonce".split())
REQ_KEYS = frozenset("type id method params traceparent expectedProfileId".split())
SCOPE_ADMIN = "operator.admin"
HTTP_TOOL_DENY = frozenset(
    "exec spawn shell fs_write fs_delete fs_move apply_patch sessions_spawn sessions_send cron gateway nodes".split()
)
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_UI_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'",
}
_UNAUTHORIZED = {"error": {"message": "Unauthorized", "type": "unauthorized"}}
_DRAINING = {
    "error": {
        "message": "Gateway is temporarily unavailable while suspending or restarting",
        "type": "service_unavailable",
        "code": "gateway_unavailable",
    }
}
_PROXY_ATTRIBUTION = {
    "error": {
        "message": "Proxy client attribution is required. Configure gateway.trustedProxies narrowly and make the "
        "proxy overwrite or safely rebuild forwarded client headers.",
        "type": "proxy_attribution_required",
    }
}


def scope_satisfied(required: str, granted: list[str] | set[str] | tuple[str, ...]) -> bool:
    """admin satisfies every scope; write satisfies read and talk (reference §1.3)."""
    have = set(granted)
    if required in have or SCOPE_ADMIN in have:
        return True
    return "operator.write" in have and required in ("operator.read", "operator.talk")


def error_shape(code: str, message: str, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    for key in ("details", "retryable", "retryAfterMs"):
        if extra.get(key) is not None:
            err[key] = extra[key]
    return err


class RpcError(Exception):
    """Raised by handlers; becomes an `ok:false` response."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.shape = error_shape(code, message, **extra)


def invalid(message: str, **extra: Any) -> RpcError:
    return RpcError("INVALID_REQUEST", message, **extra)


def check_params(
    method: str, params: Any, allowed: set[str] | frozenset[str], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Closed-object param validation with the real gateway's message shapes."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise invalid(f"invalid {method} params: must be object")
    for key in required:
        if key not in params:
            raise invalid(f"invalid {method} params: must have required property '{key}'")
    for key in params:
        if key not in allowed:
            raise invalid(f"invalid {method} params: at root: unexpected property '{key}'")
    return params


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host.lower() in ("localhost",) or host.lower().endswith(".localhost")


def _ip_in(ip: str, entries: list[str]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for entry in entries:
        try:
            if addr in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


@dataclass
class Ingress:
    """Who is on the other end, decided like src/gateway/ingress-attribution.ts."""

    kind: str  # direct-local | direct-remote | trusted-proxy
    client_ip: str | None

    @property
    def local(self) -> bool:
        return self.kind == "direct-local"


def attribute(request: web.BaseRequest, trusted: list[str]) -> Ingress | None:
    """None = proxy-shaped traffic we cannot attribute (answer 403 before any auth)."""
    peer = request.remote or ""
    headers = request.headers
    proxy_headers = any(
        h in headers for h in ("Forwarded", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")
    )
    if proxy_headers:
        if not _ip_in(peer, trusted):
            return None
        hops = [h.strip() for h in headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        client = next((h for h in reversed(hops) if not _ip_in(h, trusted)), None)
        if client is None or _is_loopback(client):
            return None
        return Ingress("trusted-proxy", client)
    if _is_loopback(peer):
        host = (urlsplit("//" + request.host).hostname if request.host else None) or ""
        return Ingress("direct-local" if _is_loopback(host) else "direct-remote", peer)
    return Ingress("direct-remote", peer)


@dataclass(eq=False)
class Connection:
    ws: web.WebSocketResponse
    conn_id: str
    ingress: Ingress
    origin: str | None
    nonce: str = field(default_factory=lambda: str(uuid.uuid4()))
    challenge_ts: int = field(default_factory=now_ms)
    client: dict[str, Any] = field(default_factory=dict)
    role: str = "operator"
    scopes: list[str] = field(default_factory=list)
    auth_method: str | None = None
    device_id: str | None = None
    uses_shared_auth: bool = False
    authenticated: bool = False
    seq: int = 0

    async def send(self, frame: Mapping[str, Any]) -> None:
        if self.ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))

    async def event(self, name: str, payload: Any) -> None:
        self.seq += 1
        await self.send({"type": "event", "event": name, "payload": payload, "seq": self.seq})

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=code, message=reason[:120].encode())


class GatewaySimulator:
    """One simulated gateway process: config, state, listener, connections."""

    def __init__(self, options: SimulatorOptions) -> None:
        from gateway_simulator.handlers import Handlers  # cycle: handlers use the simulator

        self.options = options
        self.state_dir = options.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = ConfigStore(options.resolved_config_path, self.state_dir, options.env, options.sticky_config)
        self.devices = DeviceStore(self.state_dir)
        self.workspace = WorkspaceStore(self.state_dir)
        self.chat = ChatStore(self.state_dir)
        self.handlers = Handlers(self)
        self.connections: set[Connection] = set()
        self.port: int = 0
        self.host = "127.0.0.1"
        self.boot_id = str(uuid.uuid4())
        self._started_at = time.monotonic()
        self._ready_at: float | None = None
        self._phase = "stopped"  # starting | ready | draining | stopped
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.cert_sha256: str | None = None  # set when `gateway.tls.enabled` (HTTPS/WSS listener)
        self._tls_on = False
        self._tick_task: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._last_restart = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopped = asyncio.Event()
        self._ephemeral_token: str | None = None
        self.restart_count = 0
        self.channel_reload: asyncio.Future[None] | None = None  # the channel reload in progress (`channel_reload_s`)

    @property
    def reloading_channels(self) -> bool:
        return self.channel_reload is not None and not self.channel_reload.done()

    # -- configuration ---------------------------------------------------------------------------

    def snapshot(self) -> ConfigSnapshot:
        return self.config.read()

    def gateway_cfg(self, snap: ConfigSnapshot | None = None) -> dict[str, Any]:
        gw = (snap or self.snapshot()).resolved.get("gateway")
        return gw if isinstance(gw, dict) else {}

    def auth_settings(self, snap: ConfigSnapshot | None = None) -> tuple[str, str | None, str | None]:
        """(mode, token, password) with CLI > config > env precedence."""
        auth = self.gateway_cfg(snap).get("auth") or {}
        env = self.options.env
        token = self.options.token or auth.get("token") or env.get("OPENCLAW_GATEWAY_TOKEN") or None
        password = self.options.password or auth.get("password") or env.get("OPENCLAW_GATEWAY_PASSWORD") or None
        mode = self.options.auth_mode or auth.get("mode") or ("password" if password and not token else "token")
        if mode == "token" and not token:
            self._ephemeral_token = self._ephemeral_token or secrets.token_urlsafe(24)
            token = self._ephemeral_token
        return mode, token, password

    @property
    def token(self) -> str | None:
        return self.auth_settings()[1]

    def trusted_proxies(self) -> list[str]:
        proxies = self.gateway_cfg().get("trustedProxies")
        return [p for p in proxies if isinstance(p, str)] if isinstance(proxies, list) else []

    def control_ui(self) -> dict[str, Any]:
        ui = self.gateway_cfg().get("controlUi")
        return ui if isinstance(ui, dict) else {}

    def base_path(self) -> str:
        base = self.control_ui().get("basePath") or ""
        return base.rstrip("/") if isinstance(base, str) else ""

    def _resolve_listen(self) -> tuple[str, int]:
        gw = self.gateway_cfg()
        env_port = self.options.env.get("OPENCLAW_GATEWAY_PORT")
        if self.port:  # keep the port across in-process restarts
            port = self.port
        elif self.options.port is not None:
            port = self.options.port
        elif env_port:
            port = int(env_port)
        else:
            port = int(gw.get("port") or DEFAULT_PORT)
        bind = self.options.bind or gw.get("bind") or "loopback"
        host = {"loopback": "127.0.0.1", "lan": "0.0.0.0"}.get(bind, "127.0.0.1")
        if bind == "custom":
            host = self.options.bind_host or str(gw.get("customBindHost") or "127.0.0.1")
        return host, port

    def preflight(self) -> str | None:
        """Why the gateway would refuse to start (exit 78), or None."""
        snap = self.snapshot()
        if not snap.valid:
            return f"Invalid config at {snap.path}: {summarize_issues(snap.issues)}"
        if not self.options.allow_unconfigured:
            mode = self.gateway_cfg(snap).get("mode")
            if not snap.exists:
                return (
                    "Gateway start blocked: no config found. Set gateway.mode=local in openclaw.json or pass "
                    "--allow-unconfigured."
                )
            if mode != "local":
                return (
                    "Gateway start blocked: existing config is missing gateway.mode. Set gateway.mode=local "
                    "manually, or pass --allow-unconfigured."
                    if mode is None
                    else f"Gateway start blocked: gateway.mode is {mode!r}; set gateway.mode=local."
                )
        host, _ = self._resolve_listen()
        mode, token, password = self.auth_settings(snap)
        if not _is_loopback(host) and mode == "none":
            return "Refusing to bind the gateway to a non-loopback address without auth."
        return None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        """starting | ready | draining | stopped."""
        return "ready" if self.ready else self._phase

    @property
    def ready(self) -> bool:
        if self._phase != "starting":
            return self._phase == "ready"
        if self.options.never_ready or self._ready_at is None:
            return False
        if time.monotonic() >= self._ready_at:
            self._phase = "ready"
            return True
        return False

    @property
    def url(self) -> str:
        return f"{'wss' if self._tls_on else 'ws'}://{self._client_host()}:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"{'https' if self._tls_on else 'http'}://{self._client_host()}:{self.port}"

    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    async def start(self) -> None:
        problem = self.preflight()
        if problem:
            raise SimulatorStartError(problem)
        await self._listen(startup_s=self.options.ready_after_s)
        self._tick_task = asyncio.create_task(self._ticker())

    async def _listen(self, *, startup_s: float) -> None:
        self.config.mark_applied(self.snapshot())
        self.host, port = self._resolve_listen()
        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch_http)
        try:
            tls = server_context(self.gateway_cfg().get("tls"), self.state_dir, self.options.env)
        except TlsError as exc:
            raise SimulatorStartError(str(exc)) from None
        self._tls_on = tls is not None
        self.cert_sha256 = tls[1] if tls else None
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, port, reuse_address=True,
                                 ssl_context=tls[0] if tls else None)
        await self._site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else port
        self._started_at = time.monotonic()
        self._ready_at = self._started_at + max(0.0, startup_s)
        self._phase = "starting"
        log.info("gateway simulator listening on %s:%s (state %s)", self.host, self.port, self.state_dir)

    async def _unlisten(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._site = None

    async def stop(self) -> None:
        """Graceful stop (SIGTERM): terminal `shutdown` event, close 1012, stop listening."""
        if self._phase == "stopped":
            return
        for task in (self._tick_task, self._restart_task):
            if task is not None:
                task.cancel()
        await self._drain("gateway stopping", None)
        await self._unlisten()
        for task in list(self._tasks):
            task.cancel()
        self.handlers.close()
        self._phase = "stopped"
        self.stopped.set()

    async def _drain(self, reason: str, restart_expected_ms: int | None) -> None:
        self._phase = "draining"
        conns = [c for c in self.connections if c.authenticated]
        payload: dict[str, Any] = {"reason": reason}
        if restart_expected_ms is not None:  # a stopping gateway sends the reason only
            payload["restartExpectedMs"] = restart_expected_ms
        await asyncio.gather(*(c.event("shutdown", payload) for c in conns))
        await asyncio.gather(*(c.close(1012, "service restart") for c in list(self.connections)))

    def schedule_restart(self, reason: str, delay_ms: int = 0) -> dict[str, Any]:
        """In-process restart (SIGUSR2 semantics): drain, drop the listener, come back on the same port."""
        coalesced = self._restart_task is not None and not self._restart_task.done()
        cooldown = 0.0
        if not coalesced:
            since = time.monotonic() - self._last_restart
            if self._last_restart and since < self.options.restart_cooldown_s:
                cooldown = self.options.restart_cooldown_s - since
            self._restart_task = asyncio.create_task(self._restart(reason, delay_ms / 1000 + cooldown))
        return {
            "ok": True,
            "pid": os.getpid(),
            "signal": "SIGUSR2",
            "reason": reason,
            "mode": "emit",
            "cooldownMsApplied": int(cooldown * 1000),
            "delayMs": int(delay_ms + cooldown * 1000),
            "coalesced": coalesced,
            "emitHooksQueued": False,
        }

    async def _restart(self, reason: str, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        log.info("gateway simulator restarting (%s)", reason)
        expected = int((self.options.restart_drain_s + self.options.restart_down_s) * 1000) or 1500
        await self._drain("gateway restarting", expected)
        await asyncio.sleep(self.options.restart_drain_s)  # upgrades answer 503 meanwhile
        await self._unlisten()
        self.connections.clear()
        await asyncio.sleep(self.options.restart_down_s)  # connection refused meanwhile
        self.boot_id = str(uuid.uuid4())
        self.devices = DeviceStore(self.state_dir)
        self.chat = ChatStore(self.state_dir)
        self._last_restart = time.monotonic()
        self.restart_count += 1
        await self._listen(startup_s=self.options.restart_startup_s)

    async def _ticker(self) -> None:
        interval = self.options.tick_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            ts = now_ms()
            for conn in [c for c in self.connections if c.authenticated]:
                await conn.event("tick", {"ts": ts})

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def broadcast(self, name: str, payload: Any, *, scope: str | None = None) -> None:
        for conn in [c for c in self.connections if c.authenticated and c.role == "operator"]:
            if scope is None or scope_satisfied(scope, conn.scopes):
                await conn.event(name, payload)

    async def disconnect_shared_auth(self) -> None:
        for conn in [c for c in self.connections if c.uses_shared_auth]:
            await conn.close(4001, "gateway auth changed")

    # -- HTTP ------------------------------------------------------------------------------------

    async def _dispatch_http(self, request: web.Request) -> web.StreamResponse:
        ingress = attribute(request, self.trusted_proxies())
        if ingress is None:
            return web.json_response(_PROXY_ATTRIBUTION, status=403, headers={"Connection": "close"})
        path = request.path
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if self._phase == "draining":
                return web.Response(
                    status=503, text="Gateway websocket admission closed", headers={"Connection": "close"}
                )
            return await self._websocket(request, ingress)
        if request.method in ("GET", "HEAD"):
            if path in ("/health", "/healthz"):
                return _json({"ok": True, "status": "live"})
            if path in ("/ready", "/readyz"):
                return self._readiness()
            if path in ("/startup", "/startupz"):
                return self._startup(ingress)
        if self._phase == "draining":
            return _json(_DRAINING, status=503, headers={"Retry-After": "1"})
        if path == "/tools/invoke":
            if request.method != "POST":
                return web.Response(status=405, text="Method Not Allowed")
            return await self._tools_invoke(request)
        if path.startswith("/__simulator__/"):
            return await self._simulator_route(request, ingress)
        return await self._control_ui(request)

    def _uptime_ms(self) -> int:
        return int((time.monotonic() - self._started_at) * 1000)

    def _readiness(self) -> web.Response:
        from gateway_simulator.handlers import EVENT_LOOP as event_loop

        if self._phase == "draining":
            body = {"ready": False, "failing": ["gateway-draining"], "uptimeMs": self._uptime_ms()}
        elif not self.ready:
            body = {"ready": False, "failing": ["startup-sidecars"], "uptimeMs": self._uptime_ms()}
        else:
            body = {"ready": True, "failing": [], "uptimeMs": self._uptime_ms()}
        return _json({**body, "eventLoop": event_loop}, status=200 if body["ready"] else 503)

    def _startup(self, ingress: Ingress) -> web.Response:
        if self._phase == "draining":
            return _json({"ok": False, "status": "draining"}, status=503)
        if not self.ready:
            return _json({"ok": False, "status": "starting", "pendingReason": "startup-sidecars"}, status=503)
        body: dict[str, Any] = {"ok": True, "status": "started"}
        if ingress.local:
            body["version"] = VERSION
        body["uptimeMs"] = self._uptime_ms()
        return _json(body)

    def http_authorized(self, request: web.Request, *, allow_device_tokens: bool = False) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        presented = header[7:].strip()
        mode, token, password = self.auth_settings()
        if mode == "none":
            return True
        for secret in (token, password):
            if secret and hmac.compare_digest(presented.encode(), secret.encode()):
                return True
        if allow_device_tokens:
            for record in self.devices.paired.values():
                tok = (record.get("tokens") or {}).get("operator") or {}
                if tok.get("token") and hmac.compare_digest(presented.encode(), str(tok["token"]).encode()):
                    return True
        return False

    async def _tools_invoke(self, request: web.Request) -> web.Response:
        if not self.http_authorized(request):
            return _json(_UNAUTHORIZED, status=401)
        try:
            body = await request.json()
        except ValueError as exc:
            return _json({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
        tool = body.get("tool") if isinstance(body, dict) else None
        if not isinstance(tool, str) or not tool:
            return _json({"error": {"message": "tool is required", "type": "invalid_request_error"}}, status=400)
        deny = set(HTTP_TOOL_DENY) | set((self.gateway_cfg().get("tools") or {}).get("deny") or [])
        if tool in deny or tool != "sessions_list":
            return _json({"ok": False, "error": {"type": "not_found", "message": f"Tool not available: {tool}"}}, 404)
        sessions = [
            {"key": key, "sessionId": s["sessionId"], "agentId": "main", "kind": "main", "archived": False}
            for key, s in self.chat.sessions.items()
        ]
        details = {"count": len(sessions), "sessions": sessions, "hasMore": False, "limitApplied": 100}
        text = json.dumps(details, indent=2)
        return _json({"ok": True, "result": {"content": [{"type": "text", "text": text}], "details": details}})

    async def _control_ui(self, request: web.Request) -> web.StreamResponse:
        base = self.base_path()
        path = request.path
        if request.method not in ("GET", "HEAD") or not self.control_ui().get("enabled", True):
            return web.Response(status=404, text="Not Found", headers=_SECURITY_HEADERS)
        if base and not (path == base or path.startswith(base + "/")):
            return web.Response(status=404, text="Not Found", headers=_SECURITY_HEADERS)
        if base and path == base:
            raise web.HTTPFound(base + "/")
        if path == f"{base}/control-ui-config.json":
            if not self.http_authorized(request, allow_device_tokens=True):
                return _json(_UNAUTHORIZED, status=401, headers=_UI_HEADERS)
            return _json(self._control_ui_config(), headers=_UI_HEADERS)
        return web.Response(
            text=_control_ui_html(base), content_type="text/html", headers={**_SECURITY_HEADERS, **_UI_HEADERS}
        )

    def _control_ui_config(self) -> dict[str, Any]:
        identity = self.workspace.workspace("main", self.snapshot().resolved) / "IDENTITY.md"
        name = "Assistant"
        if identity.exists():
            for line in identity.read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip().lower().lstrip("-* ") == "name" and value.strip():
                    name = value.strip()
                    break
        terminal = (self.gateway_cfg().get("terminal") or {}).get("enabled", True)
        return {
            "basePath": self.base_path(),
            "assistantName": name,
            "assistantAvatar": name[:1].upper(),
            "assistantAgentId": "main",
            "serverVersion": VERSION,
            "serverBuildId": BUILD_ID,
            "embedSandbox": "scripts",
            "terminalEnabled": bool(terminal),
        }

    async def _simulator_route(self, request: web.Request, ingress: Ingress) -> web.Response:
        """Test-only controls, loopback + gateway token only (they do not exist on a real gateway)."""
        if not ingress.local or not self.http_authorized(request):
            return _json(_UNAUTHORIZED, status=401)
        if request.method == "POST" and request.path == "/__simulator__/whatsapp/scan":
            account = request.query.get("accountId") or "default"
            ok = self.handlers.complete_web_login(account)
            return _json({"ok": ok})
        if request.method == "POST" and request.path == "/__simulator__/restart":
            return _json(self.schedule_restart("simulator"))
        return web.Response(status=404, text="Not Found")

    # -- WebSocket -------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request, ingress: Ingress) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_PAYLOAD, autoping=True, heartbeat=25.0)
        await ws.prepare(request)
        conn = Connection(ws, str(uuid.uuid4()), ingress, request.headers.get("Origin"))
        self.connections.add(conn)
        try:
            await conn.send(
                {
                    "type": "event",
                    "event": "connect.challenge",
                    "payload": {
                        "nonce": conn.nonce,
                        "ts": conn.challenge_ts,
                        "capabilities": ["model-catalog-snapshot"],
                    },
                }
            )
            handshake = asyncio.create_task(self._handshake_timeout(conn))
            try:
                async for msg in ws:
                    if msg.type != WSMsgType.TEXT:
                        if msg.type == WSMsgType.BINARY and not conn.authenticated:
                            await conn.close(1008, "invalid request frame")
                        continue
                    if not conn.authenticated:
                        await self._preauth_frame(conn, request, msg.data)
                        if conn.authenticated:
                            handshake.cancel()
                    else:
                        self.spawn(self._request_frame(conn, msg.data))
            finally:
                handshake.cancel()
        finally:
            self.connections.discard(conn)
        return ws

    async def _handshake_timeout(self, conn: Connection) -> None:
        await asyncio.sleep(self.options.handshake_timeout_ms / 1000)
        if not conn.authenticated:
            await conn.close(1008, "connect challenge timeout")

    async def _preauth_frame(self, conn: Connection, request: web.Request, data: str) -> None:
        if len(data.encode()) > PREAUTH_MAX_BYTES:
            await conn.close(1009, "preauth payload too large")
            return
        try:
            frame = json.loads(data)
        except ValueError:
            await conn.ws.close()  # the real gateway closes without a code here (seen as 1000)
            return
        frame_error = validate_request_frame(frame)
        if frame_error is not None:
            await conn.close(1008, "invalid request frame")
            return
        if frame["method"] != "connect":
            message = "invalid handshake: first request must be connect"
            await conn.send(
                {"type": "res", "id": frame["id"], "ok": False, "error": error_shape("INVALID_REQUEST", message)}
            )
            await conn.close(1008, message)
            return
        params = frame.get("params")
        problem = validate_connect_params(params)
        if problem is not None:
            message = f"invalid connect params: {problem}"
            await conn.send(
                {"type": "res", "id": frame["id"], "ok": False, "error": error_shape("INVALID_REQUEST", message)}
            )
            await conn.close(1008, message)
            return
        from gateway_simulator.handshake import run_connect

        await run_connect(self, conn, request, frame["id"], params)

    async def _request_frame(self, conn: Connection, data: str) -> None:
        try:
            frame = json.loads(data)
        except ValueError:
            log.warning("parse error on %s: non-JSON frame ignored", conn.conn_id)
            return
        problem = validate_request_frame(frame)
        if problem is not None:
            rid = frame.get("id") if isinstance(frame, dict) and isinstance(frame.get("id"), str) else "invalid"
            await conn.send(
                {
                    "type": "res",
                    "id": rid,
                    "ok": False,
                    "error": error_shape("INVALID_REQUEST", f"invalid request frame: {problem}"),
                }
            )
            return
        method: str = frame["method"]
        try:
            payload = await self._call(conn, method, frame.get("params"))
        except RpcError as exc:
            await conn.send({"type": "res", "id": frame["id"], "ok": False, "error": exc.shape})
            return
        except Exception as exc:  # the real gateway answers UNAVAILABLE with the error text
            log.exception("handler %s failed", method)
            await conn.send(
                {"type": "res", "id": frame["id"], "ok": False, "error": error_shape("UNAVAILABLE", str(exc))}
            )
            return
        await conn.send({"type": "res", "id": frame["id"], "ok": True, "payload": payload})

    async def _call(self, conn: Connection, method: str, params: Any) -> Any:
        required = protocol_data.METHOD_SCOPES.get(method)
        handler = self.handlers.lookup(method)
        if required is None and handler is None:
            raise invalid(f"unknown method: {method}")
        if (required == "node") != (conn.role == "node"):
            raise invalid(f"unauthorized role: {conn.role}")
        if method != "health" and required is not None and not scope_satisfied(required, conn.scopes):
            raise RpcError(
                "FORBIDDEN",
                f"missing scope: {required}",
                details={"code": "MISSING_SCOPE", "missingScope": required, "requiredScopes": [required]},
            )
        if handler is None:
            raise RpcError("UNAVAILABLE", f"gateway simulator: {method} is not simulated", details={"simulator": True})
        return await handler(conn, params)

    # -- hello-ok --------------------------------------------------------------------------------

    def hello_snapshot(self, conn: Connection) -> dict[str, Any]:
        snap = self.snapshot()
        mode, _, _ = self.auth_settings(snap)
        out: dict[str, Any] = {
            "suspension": {"phase": "accepting"},
            "presence": [
                {
                    "host": os.uname().nodename,
                    "version": VERSION,
                    "platform": "linux",
                    "deviceFamily": "Linux",
                    "mode": "gateway",
                    "reason": "self",
                    "instanceId": self.boot_id,
                    "text": f"Gateway simulator · app {VERSION} · mode gateway",
                    "ts": now_ms(),
                }
            ],
            "health": self.handlers.health_payload(snapshot=True),
            "stateVersion": {"presence": 1, "health": 1},
            "uptimeMs": self._uptime_ms(),
            "appliedConfigHash": self.config.applied_hash,
            "sessionDefaults": {
                "defaultAgentId": "main",
                "modelConfigured": False,
                "ownership": "sole",
                "selectionRequired": False,
                "mainKey": "main",
                "mainSessionKey": "agent:main:main",
                "scope": "per-sender",
            },
        }
        if scope_satisfied(SCOPE_ADMIN, conn.scopes):  # the real gateway shows these to admins only
            out.update(
                updateSchedule={"channel": "stable", "autoEnabled": False},
                configPath=str(self.config.path),
                stateDir=str(self.state_dir),
                authMode=mode,
            )
        return out

    def hello_ok(self, conn: Connection, auth: dict[str, Any], request_host: str | None) -> dict[str, Any]:
        hello: dict[str, Any] = {
            "type": "hello-ok",
            "protocol": 4,
            "server": {
                "version": VERSION,
                "buildId": BUILD_ID,
                "bootId": self.boot_id,
                "controlUiBuildSource": "bundled",
                "connId": conn.conn_id,
            },
            "features": {
                "methods": list(protocol_data.ADVERTISED_METHODS),
                "events": list(protocol_data.ADVERTISED_EVENTS),
                "capabilities": list(protocol_data.FEATURE_CAPABILITIES),
            },
            "snapshot": self.hello_snapshot(conn),
        }
        if scope_satisfied("operator.read", conn.scopes):
            hello.update(protocol_data.CONTROL_UI_EXTRAS)
        scheme = "https" if conn.ingress.kind == "trusted-proxy" else "http"
        cap = base64.urlsafe_b64encode(secrets.token_bytes(18)).decode()
        hello["pluginSurfaceUrls"] = {
            "canvas": f"{scheme}://{request_host or self._client_host()}/__openclaw__/cap/{cap}"
        }
        hello.update(
            {
                "auth": auth,
                "policy": {
                    "maxPayload": MAX_PAYLOAD,
                    "maxBufferedBytes": 52_428_800,
                    "tickIntervalMs": self.options.tick_interval_ms,
                    "attachments": {"maxBytes": 19_464_192, "maxImageBytes": 6_291_456},
                    "allowedSessionVisibilities": ["shared", "read-only", "suggest", "draft"],
                    "hasMultipleSessionSharingIdentities": False,
                },
            }
        )
        return hello

    def recovery_scope(self, conn: Connection) -> str:
        seed = conn.device_id or "shared-auth"
        return (
            base64.urlsafe_b64encode(hashlib.sha256(f"{self.boot_id}:{seed}".encode()).digest()).rstrip(b"=").decode()
        )


class SimulatorStartError(RuntimeError):
    """The simulated gateway refuses to start (the CLI exits 78, like the real one)."""


def validate_request_frame(frame: Any) -> str | None:
    """The RequestFrame schema check, with ajv-like messages."""
    if not isinstance(frame, dict):
        return "must be object"
    problems = [f"must have required property '{key}'" for key in ("type", "id", "method") if key not in frame]
    problems += [f"at root: unexpected property '{key}'" for key in frame if key not in REQ_KEYS]
    if "type" in frame and frame["type"] != "req":
        problems.append("at /type: must be equal to constant")
    if "id" in frame and (not isinstance(frame["id"], str) or not frame["id"]):
        problems.append("at /id: must be a non-empty string")
    if "method" in frame and (not isinstance(frame["method"], str) or not frame["method"]):
        problems.append("at /method: must be a non-empty string")
    if "params" in frame and frame["params"] is not None and not isinstance(frame["params"], dict | list):
        problems.append("at /params: must be object")
    return "; ".join(problems) if problems else None


def validate_connect_params(params: Any) -> str | None:
    if not isinstance(params, dict):
        return "must be object"
    for key in ("minProtocol", "maxProtocol", "client"):
        if key not in params:
            return f"must have required property '{key}'"
    for key in params:
        if key not in CONNECT_KEYS:
            return f"at root: unexpected property '{key}'"
    for key in ("minProtocol", "maxProtocol"):
        if isinstance(params[key], bool) or not isinstance(params[key], int):
            return f"at /{key}: must be integer"
    client = params["client"]
    if not isinstance(client, dict):
        return "at /client: must be object"
    for key in ("id", "version", "platform", "mode"):
        if key not in client:
            return f"at /client: must have required property '{key}'"
    for key in client:
        if key not in CLIENT_KEYS:
            return f"at /client: unexpected property '{key}'"
    if client["id"] not in CLIENT_IDS:
        return "at /client/id: must be equal to one of the allowed values"
    if client["mode"] not in CLIENT_MODES:
        return "at /client/mode: must be equal to one of the allowed values"
    scopes = params.get("scopes")
    if scopes is not None and (not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes)):
        return "at /scopes: must be array of strings"
    auth = params.get("auth")
    if auth is not None:
        if not isinstance(auth, dict):
            return "at /auth: must be object"
        for key in auth:
            if key not in AUTH_KEYS:
                return f"at /auth: unexpected property '{key}'"
    device = params.get("device")
    if device is not None:
        if not isinstance(device, dict):
            return "at /device: must be object"
        for key in ("id", "publicKey", "signature", "signedAt"):
            if key not in device:
                return f"at /device: must have required property '{key}'"
        for key in device:
            if key not in DEVICE_KEYS:
                return f"at /device: unexpected property '{key}'"
    return None


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers={**_SECURITY_HEADERS, **(headers or {})})


def _control_ui_html(base: str) -> str:
    return f"""<!doctype html>
<html data-openclaw-control-ui-base-path="{base}" data-openclaw-simulator="true" lang="en">
  <head><meta charset="UTF-8" /><title>OpenClaw Control (gateway simulator)</title></head>
  <body>
    <main>
      <h1>OpenClaw Control</h1>
      <p>This is the Slopbox <strong>gateway simulator</strong>, not OpenClaw. It speaks a subset of
      gateway protocol v4 for development and tests; there is no real Control UI here.</p>
    </main>
  </body>
</html>
"""


def _prepare_state_dir(state: Path, config: Mapping[str, Any] | None) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (state / "openclaw.json").write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")
    return state


@contextlib.asynccontextmanager
async def run_simulator(
    state_dir: Path | str,
    *,
    port: int = 0,
    token: str | None = None,
    config: Mapping[str, Any] | None = None,
    **knobs: Any,
) -> AsyncIterator[GatewaySimulator]:
    """Run a simulator in this event loop for tests: `async with run_simulator(tmp) as sim: sim.url`.

    `config` (if given) is written to `<state_dir>/openclaw.json` first; without one the gateway
    runs as with `--allow-unconfigured`. `knobs` are SimulatorOptions fields (e.g. ready_after_s).
    """
    state = _prepare_state_dir(Path(state_dir), config)
    env = dict(knobs.pop("env", None) or os.environ)
    options = SimulatorOptions(
        state_dir=state,
        port=port,
        token=token,
        allow_unconfigured=knobs.pop("allow_unconfigured", config is None),
        env=env,
        **knobs,
    )
    sim = GatewaySimulator(options)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()
