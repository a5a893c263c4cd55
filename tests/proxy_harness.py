"""Shared harness for the proxy tests (no tests here): seeded rows, a gateway, the proxy, a browser.

`seed_gateway_user` writes what provisioning would have written (user, Auth.js session, agent
with an encrypted gateway token, a running VPS row with a UI-relay key) pointing at any gateway
address; `ProxyEnv` runs the real proxy (`proxy.app.serve`) on free loopback ports; `Browser`
speaks the Control UI's handshake with its own Ed25519 device. The gateway simulator is started
with the config our renderer produces for a local VM, so origins and base path are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import WSMsgType, web

from db.encryption import configure_keys
from db.models import Agent
from gateway_simulator.server import GatewaySimulator, run_simulator
from openclaw import render
from openclaw.agent_env import gateway_env, render_input
from openclaw.device import DeviceIdentity
from openclaw.relay import RELAY_CLIENT, RELAY_SCOPES, relay_origin
from openclaw.rpc import GatewayClient
from proxy.app import RunningProxy, serve
from proxy.config import ProxyConfig
from proxy.egress import EgressPolicy
from settings import Settings
from tests.conftest import API_KEY, free_port
from tests.helpers import make_user

__test__ = False

BROWSER_SCOPES = ["operator.admin", "operator.read", "operator.write", "operator.approvals",
                  "operator.questions", "operator.pairing"]
TEST_CONFIG = ProxyConfig(auth_cache_ttl_s=0.0, flush_interval_s=3600.0, enforcement_cache_ttl_s=0.0,
                          forward_credentials_ttl_s=0.0, forward_idle_timeout_s=10.0)


@dataclass
class Seeded:
    user_id: uuid.UUID
    agent_id: uuid.UUID
    vps_id: uuid.UUID
    session: str = field(repr=False)
    gateway_token: str = field(repr=False)
    relay: DeviceIdentity

    @property
    def cookie(self) -> dict[str, str]:
        return {"Cookie": f"authjs.session-token={self.session}"}


def add_session(sql: psycopg.Connection, user_id: uuid.UUID, *, expires_in: timedelta = timedelta(days=30)) -> str:
    token = str(uuid.uuid4())
    sql.execute('INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (%s, %s, %s)',
                (user_id, datetime.now(UTC) + expires_in, token))
    return token


def seed_gateway_user(sql: psycopg.Connection, settings: Settings, *, host: str = "127.0.0.1", port: int,
                      state: str = "running", plan: str = "starter", gateway_token: str | None = None,
                      user_id: uuid.UUID | None = None) -> Seeded:
    """A user with a session and an agent whose VPS row points at host:port (provider local)."""
    ring = configure_keys(settings.secret_keys())
    user = user_id or make_user(sql, plan=plan)
    token = gateway_token or secrets.token_urlsafe(32)
    relay = DeviceIdentity.generate()
    config_id = sql.execute("SELECT id FROM vps_configs WHERE name = 'local-small'").fetchone()[0]  # type: ignore[index]
    vps_id = sql.execute(
        "INSERT INTO vpses (user_id, vps_config_id, provider, provider_ref, state, host, gateway_port,"
        " relay_device_key) VALUES (%s, %s, 'local', %s, %s, %s, %s, %s) RETURNING id",
        (user, config_id, f"test-{uuid.uuid4().hex[:8]}", state, host, port,
         ring.encrypt(relay.private_pem().decode()))).fetchone()[0]  # type: ignore[index]
    agent_id = sql.execute(
        "INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) VALUES (%s, %s, %s, %s, %s)"
        " RETURNING id", (user, f"molty-{uuid.uuid4().hex[:6]}", ring.encrypt(token), token[-4:], vps_id),
    ).fetchone()[0]  # type: ignore[index]
    return Seeded(user_id=user, agent_id=agent_id, vps_id=vps_id, session=add_session(sql, user),
                  gateway_token=token, relay=relay)


@asynccontextmanager
async def simulator_for(settings: Settings, state_dir: Path, seeded: Seeded) -> AsyncIterator[GatewaySimulator]:
    agent = Agent(id=seeded.agent_id, user_id=seeded.user_id, name="molty", gateway_token=seeded.gateway_token,
                  gateway_token_last4=seeded.gateway_token[-4:])
    config = render.render_openclaw_config(render_input(settings, agent, local=True))
    env = gateway_env(settings, agent, local=True)
    async with run_simulator(state_dir, port=0, config=config, env=env, tick_interval_ms=3_600_000) as sim:
        yield sim


def point_vps_at(sql: psycopg.Connection, vps_id: uuid.UUID, port: int) -> None:
    sql.execute("UPDATE vpses SET gateway_port = %s WHERE id = %s", (port, vps_id))


async def pair_relay(sql: psycopg.Connection, settings: Settings, seeded: Seeded, port: int) -> str:
    """What provisioning's pairing step does for the relay: connect as it, store its device token."""
    gw = GatewayClient(f"ws://127.0.0.1:{port}", token=seeded.gateway_token, device=seeded.relay,
                       client=RELAY_CLIENT, scopes=RELAY_SCOPES, origin=relay_origin(settings), reconnect=False)
    async with gw:
        token = gw.hello.device_token
    assert token, "the gateway issued no device token to the relay identity"
    sql.execute("UPDATE vpses SET relay_device_token = %s WHERE id = %s",
                (configure_keys(settings.secret_keys()).encrypt(token), seeded.vps_id))
    return token


class UpstreamSpy:
    """Records every request frame the simulated gateway receives after its handshake."""

    def __init__(self, sim: GatewaySimulator) -> None:
        self.methods: list[str] = []
        self.raw: list[str] = []
        original = sim._request_frame

        async def spy(conn: Any, data: Any) -> None:
            text = data.decode() if isinstance(data, bytes) else data
            self.raw.append(text)
            try:
                self.methods.append(str(json.loads(text).get("method")))
            except ValueError:
                self.methods.append("<invalid>")
            await original(conn, data)

        sim._request_frame = spy  # type: ignore[method-assign]


@asynccontextmanager
async def running_proxy(settings: Settings, *, config: ProxyConfig = TEST_CONFIG,
                        policy: EgressPolicy | None = None) -> AsyncIterator[RunningProxy]:
    async with serve(settings, config=config, policy=policy or EgressPolicy(_no_dns), host="127.0.0.1", port=0,
                     forward_port=0) as running:
        yield running


async def _no_dns(host: str) -> list[str]:
    """Tests never resolve names over the network."""
    raise OSError(f"no DNS in tests ({host})")


class Browser:
    """The Control UI's side of the protocol, with its own device identity."""

    def __init__(self, proxy_url: str, session: str | None, *, cookie_name: str = "authjs.session-token") -> None:
        self.proxy_url = proxy_url
        self.device = DeviceIdentity.generate()
        self.headers = {"Origin": proxy_url}
        if session is not None:
            self.headers["Cookie"] = f"{cookie_name}={session}"
        self.http = aiohttp.ClientSession()
        self._ids = iter(range(1, 1_000_000))

    async def close(self) -> None:
        await self.http.close()

    def ws_url(self, agent_id: uuid.UUID, tail: str = "") -> str:
        return "ws" + self.proxy_url.removeprefix("http") + f"/agents/{agent_id}/gateway{tail}"

    async def open(self, agent_id: uuid.UUID, tail: str = "", **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        return await self.http.ws_connect(self.ws_url(agent_id, tail), headers=self.headers, autoclose=False,
                                          max_msg_size=64 * 1024 * 1024, **kwargs)

    def connect_frame(self, challenge: dict[str, Any], *, rid: str = "c1", scopes: list[str] | None = None,
                      platform: str = "Linux x86_64", sign_nonce: str | None = None) -> dict[str, Any]:
        scopes = scopes or BROWSER_SCOPES
        payload = challenge["payload"]
        device = self.device.connect_proof(
            nonce=sign_nonce or payload["nonce"], signed_at_ms=payload["ts"], client_id="openclaw-control-ui",
            client_mode="webchat", role="operator", scopes=scopes, token="", platform=platform)
        return {"type": "req", "id": rid, "method": "connect", "params": {
            "minProtocol": 4, "maxProtocol": 4,
            "client": {"id": "openclaw-control-ui", "version": "2026.9.6", "platform": platform, "mode": "webchat",
                       "instanceId": "browser-instance-1"},
            "role": "operator", "scopes": scopes, "caps": ["tool-events", "approvals", "bogus-cap"],
            "userAgent": "pytest-browser", "locale": "en-US", "device": device}}

    async def handshake(self, agent_id: uuid.UUID, tail: str = "") -> tuple[aiohttp.ClientWebSocketResponse,
                                                                           dict[str, Any]]:
        ws = await self.open(agent_id, tail)
        challenge = await ws.receive_json(timeout=10)
        assert challenge["event"] == "connect.challenge", challenge
        await ws.send_json(self.connect_frame(challenge))
        hello = await ws.receive_json(timeout=15)
        return ws, hello

    async def call(self, ws: aiohttp.ClientWebSocketResponse, method: str, params: Any = None,
                   timeout: float = 10) -> dict[str, Any]:
        rid = f"r{next(self._ids)}"
        frame: dict[str, Any] = {"type": "req", "id": rid, "method": method}
        if params is not None:
            frame["params"] = params
        await ws.send_json(frame)
        return await self.response(ws, rid, timeout)

    async def response(self, ws: aiohttp.ClientWebSocketResponse, rid: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            msg = await ws.receive(timeout=timeout)
            assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
            frame = json.loads(msg.data)
            if frame.get("type") == "res" and frame.get("id") == rid:
                return frame  # type: ignore[no-any-return]


async def next_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> tuple[int | None, str]:
    """Skip frames until the close; (code, reason)."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type is aiohttp.WSMsgType.CLOSE:
            await ws.close()
            return int(msg.data), str(msg.extra or "")
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
            return ws.close_code, ""


def usage(sql: psycopg.Connection, vps_id: uuid.UUID) -> tuple[int, int]:
    row = sql.execute("SELECT bandwidth_in_bytes, bandwidth_out_bytes FROM vps_usage_periods WHERE vps_id = %s",
                      (vps_id,)).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


class FakeGateway:
    """A minimal protocol-v4 gateway for what the simulator cannot show: it counts every payload
    byte it sends and receives, can flood, can close with any code, and records the close code it
    gets. Its hello-ok carries a device token and `device.scopes.*` so their removal is visible."""

    def __init__(self) -> None:
        self.sent_bytes = 0
        self.received_bytes = 0
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.on_hello: Any = None  # async callable(ws) run after hello-ok
        self.flood_progress = 0
        self.closed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def send(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        data = json.dumps(frame)
        self.sent_bytes += len(data.encode())
        await ws.send_str(data)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024, autoclose=False)
        await ws.prepare(request)
        await self.send(ws, {"type": "event", "event": "connect.challenge",
                             "payload": {"nonce": "fake-nonce", "ts": 1, "capabilities": ["model-catalog-snapshot"]}})
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    self.received_bytes += len(msg.data.encode())
                    frame = json.loads(msg.data)
                    self.frames.append(frame)
                    if frame.get("method") == "connect":
                        await self.send(ws, {"type": "res", "id": frame["id"], "ok": True, "payload": {
                            "type": "hello-ok", "protocol": 4,
                            "auth": {"method": "token", "role": "operator", "scopes": ["operator.read"],
                                     "deviceToken": "fake-device-token", "issuedAtMs": 1,
                                     "recoveryMigrationAllowed": True},
                            "features": {"methods": ["health", "chat.send", "device.scopes.requestUpgrade",
                                                     "device.scopes.waitUpgrade"], "events": ["tick"]},
                            "policy": {"maxPayload": 26214400}}})
                        if self.on_hello is not None:
                            await self.on_hello(ws)
                    else:
                        await self.send(ws, {"type": "res", "id": frame.get("id"), "ok": True,
                                             "payload": {"echo": frame.get("params")}})
                elif msg.type is WSMsgType.CLOSE:
                    self.close_code, self.close_reason = msg.data, msg.extra
                    await ws.close()
                    break
                else:
                    break
        finally:
            self.closed.set()
        return ws

    async def __aenter__(self) -> FakeGateway:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


IMMUTABLE_ASSET = "/assets/cached-Ab12Cd34.js"
"""The path under which `RecordingUpstream` serves a cacheable, fingerprinted asset."""


class RecordingUpstream:
    """A plain HTTP 'gateway' that records each request and answers per path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"method": request.method, "path": request.raw_path, "headers": dict(request.headers),
                              "body": body})
        if request.path.endswith("/stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: first\n\n")
            await self.release.wait()
            await resp.write(b"data: second\n\n")
            await resp.write_eof()
            return resp
        if request.path.endswith(IMMUTABLE_ASSET):  # a fingerprinted asset: the proxy's asset cache keeps it
            return web.Response(body=b"console.log(1);", content_type="application/javascript",
                                headers={"Cache-Control": "public, max-age=31536000, immutable"})
        if request.path.endswith("/not-modified"):
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "no-cache"})
        if request.path.endswith("/no-content"):
            return web.Response(status=204)
        if request.path.endswith("/redirect"):
            raise web.HTTPFound("/openclaw/elsewhere")
        if request.path.endswith("/page"):
            html = ('<html data-openclaw-control-ui-base-path="/openclaw"><head>'
                    '<script src="/openclaw/assets/app.js"></script><link href="/openclaw/favicon.svg">'
                    '<script>var x = "/openclaw/keep";</script></head></html>')
            return web.Response(text=html, content_type="text/html", headers={
                "Set-Cookie": "authjs.session-token=evil; Path=/", "Service-Worker-Allowed": "/",
                "Content-Security-Policy": "default-src 'self'", "X-Custom": "x"})
        return web.Response(body=b"upstream:" + body, content_type="application/octet-stream")

    async def __aenter__(self) -> RecordingUpstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


# -- the proxy as its own process (`slopbox proxy`), for floods and memory ---------------------------

SLOPBOX = Path(sys.executable).parent / "slopbox"


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    port: int
    forward_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def held_connections(self) -> int:
        """Established connections on the gateway-proxy port that the proxy process has accepted."""
        inodes = set()
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        held = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == self.port and fields[3] == "01" and fields[9] in inodes:  # 01 = ESTABLISHED
                held += 1
        return held

    def _status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def peak_rss_mib(self) -> float:
        return self._status_kib("VmHWM") / 1024

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@asynccontextmanager
async def proxy_process(database_url: str, encryption_key: str, log_path: Path, *, env: dict[str, str] | None = None,
                        nofile: int | None = None) -> AsyncIterator[ProxyProcess]:
    """`slopbox proxy` on free loopback ports, its stderr in `log_path`; `nofile` caps its descriptors."""
    port, forward_port = free_port(), free_port()
    full = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    full.update(DATABASE_URL=database_url, SLOPBOX_ENCRYPTION_KEYS=encryption_key, CONTROL_PLANE_API_KEY=API_KEY,
                PROXY_HOST="127.0.0.1", PROXY_PORT=str(port), FORWARD_PROXY_PORT=str(forward_port),
                LOG_LEVEL="INFO", **(env or {}))

    def limit_descriptors() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(str(SLOPBOX), "proxy", env=full, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=err, preexec_fn=limit_descriptors)
    running = ProxyProcess(proc, port, forward_port, log_path)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                try:
                    async with http.get(f"{running.url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.returncode is not None:
                    raise AssertionError("proxy exited: " + running.log_text()[-2000:])
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("proxy did not come up")
        yield running
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
