"""Plain HTTP through the gateway proxy: session auth, ownership, VPS state, header hygiene, the
`/tools/invoke` block and the route allow-list, the relay's credentials, streaming, the Control UI
base path, what a hostile VM may answer (redirects, HTML/SVG, encodings) and byte metering."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from aiohttp import web

from db.encryption import configure_keys
from proxy.app import RunningProxy
from proxy.config import ProxyConfig
from proxy.headers import _response_headers
from proxy.http_fast import _head_template
from proxy.upstream_http import _response_fields
from settings import Settings
from tests.proxy_harness import (
    TEST_CONFIG,
    RecordingUpstream,
    Seeded,
    add_session,
    pair_relay,
    point_vps_at,
    running_proxy,
    seed_gateway_user,
    simulator_for,
    usage,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

RELAY_TOKEN = "relay-device-token-with-relay-scopes-only"


@dataclass
class Env:
    seeded: Seeded
    upstream: RecordingUpstream
    proxy: RunningProxy
    http: aiohttp.ClientSession

    def url(self, tail: str = "/", agent: object | None = None) -> str:
        return f"{self.proxy.url}/agents/{agent or self.seeded.agent_id}/gateway{tail}"

    async def get(self, tail: str = "/", cookie: str | None = None, **kw: object) -> aiohttp.ClientResponse:
        headers = {"Cookie": cookie if cookie is not None else self.seeded.cookie["Cookie"]}
        headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
        return await self.http.get(self.url(tail), headers=headers, allow_redirects=False, **kw)  # type: ignore[arg-type]


@pytest_asyncio.fixture(loop_scope="session")
async def env(settings: Settings, sql: psycopg.Connection) -> AsyncIterator[Env]:
    async with RecordingUpstream() as upstream:
        seeded = seed_gateway_user(sql, settings, port=upstream.port)
        sql.execute("UPDATE vpses SET relay_device_token = %s WHERE id = %s",
                    (configure_keys(settings.secret_keys()).encrypt(RELAY_TOKEN), seeded.vps_id))
        async with running_proxy(settings) as proxy, aiohttp.ClientSession() as http:
            yield Env(seeded, upstream, proxy, http)


# -- who may pass ------------------------------------------------------------------------------------


async def test_no_cookie_is_401(env: Env) -> None:
    resp = await env.http.get(env.url())
    assert resp.status == 401
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert env.upstream.requests == []


async def test_both_cookie_names_work(env: Env, sql: psycopg.Connection) -> None:
    assert (await env.get("/assets/x")).status == 200
    secure = add_session(sql, env.seeded.user_id)
    resp = await env.get("/assets/x", cookie=f"__Secure-authjs.session-token={secure}")
    assert resp.status == 200
    other = await env.get("/assets/x", cookie="next-auth.session-token=" + env.seeded.session)  # v4 name: not accepted
    assert other.status == 401


async def test_expired_and_deleted_sessions_are_401(env: Env, sql: psycopg.Connection) -> None:
    expired = add_session(sql, env.seeded.user_id, expires_in=timedelta(seconds=-1))
    assert (await env.get("/assets/x", cookie=f"authjs.session-token={expired}")).status == 401
    doomed = add_session(sql, env.seeded.user_id)
    sql.execute('DELETE FROM sessions WHERE "sessionToken" = %s', (doomed,))
    assert (await env.get("/assets/x", cookie=f"authjs.session-token={doomed}")).status == 401
    assert (await env.get("/assets/x", cookie="authjs.session-token=" + "z" * 300)).status == 401
    assert env.upstream.requests == []


async def test_another_users_agent_is_404(env: Env, sql: psycopg.Connection, settings: Settings) -> None:
    other = seed_gateway_user(sql, settings, port=env.upstream.port)
    mine_cookie = env.seeded.cookie["Cookie"]
    resp = await env.http.get(env.url("/assets/x", agent=other.agent_id), headers={"Cookie": mine_cookie})
    assert resp.status == 404
    missing = await env.http.get(env.url("/assets/x", agent="00000000-0000-4000-8000-000000000000"),
                                 headers={"Cookie": mine_cookie})
    assert missing.status == 404
    assert (await resp.json())["detail"] == (await missing.json())["detail"]
    assert env.upstream.requests == []


@pytest.mark.parametrize("state", ["stopped", "provisioning", "error", "destroyed"])
async def test_vps_not_running_is_409_and_never_woken(env: Env, sql: psycopg.Connection, state: str) -> None:
    sql.execute("UPDATE vpses SET state = %s WHERE id = %s", (state, env.seeded.vps_id))
    resp = await env.get("/assets/x")
    assert resp.status == 409
    body = await resp.json()
    assert body["vps_state"] == state and state in body["detail"]
    assert env.upstream.requests == []
    row = sql.execute("SELECT state, (SELECT count(*) FROM vps_operations o WHERE o.vps_id = v.id) FROM vpses v "
                      "WHERE id = %s", (env.seeded.vps_id,)).fetchone()
    assert row == (state, 0)  # the proxy never starts anything


async def test_agent_without_vps_is_409(env: Env, sql: psycopg.Connection) -> None:
    sql.execute("UPDATE agents SET vps_id = NULL WHERE id = %s", (env.seeded.agent_id,))
    assert (await env.get("/assets/x")).status == 409


async def test_request_rate_limit_is_429_with_retry_after(settings: Settings, sql: psycopg.Connection) -> None:
    cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "http_burst": 3, "http_rate_per_s": 0.01})
    async with RecordingUpstream() as upstream:
        seeded = seed_gateway_user(sql, settings, port=upstream.port)
        async with running_proxy(settings, config=cfg) as proxy, aiohttp.ClientSession() as http:
            url = f"{proxy.url}/agents/{seeded.agent_id}/gateway/assets/x"
            statuses = [(await http.get(url, headers=seeded.cookie)).status for _ in range(3)]
            limited = await http.get(url, headers=seeded.cookie)
            assert statuses == [200, 200, 200] and limited.status == 429
            assert int(limited.headers["Retry-After"]) >= 1
            # Another user is not affected.
            other = seed_gateway_user(sql, settings, port=upstream.port)
            assert (await http.get(f"{proxy.url}/agents/{other.agent_id}/gateway/assets/x",
                                   headers=other.cookie)).status == 200


# -- what crosses -----------------------------------------------------------------------------------


async def test_relay_token_injected_and_browser_credentials_stripped(env: Env) -> None:
    resp = await env.get("/assets/x.js?q=1", headers={
        "Authorization": "Bearer browser-supplied", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil",
        "X-Forwarded-Proto": "https", "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6",
        "x-openclaw-scopes": "operator.admin", "x-openclaw-token": "hook", "Accept": "application/json"})
    assert resp.status == 200
    seen = env.upstream.requests[-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    # The UI-relay identity's device token (relay scopes), never the owner-level gateway token.
    assert headers["authorization"] == f"Bearer {RELAY_TOKEN}"
    assert env.seeded.gateway_token not in json.dumps(seen["headers"])
    assert "cookie" not in headers
    assert not {h for h in headers if h.startswith(("x-forwarded", "x-real", "forwarded", "x-openclaw"))}
    assert headers["accept"] == "application/json"
    assert seen["path"] == "/openclaw/assets/x.js?q=1"
    assert RELAY_TOKEN not in json.dumps(dict(resp.headers))


async def test_without_a_relay_token_nothing_is_injected(env: Env, sql: psycopg.Connection) -> None:
    sql.execute("UPDATE vpses SET relay_device_token = NULL WHERE id = %s", (env.seeded.vps_id,))
    assert (await env.get("/assets/x.js")).status == 200
    headers = {k.lower() for k in env.upstream.requests[-1]["headers"]}
    assert "authorization" not in headers  # fail closed: never the gateway token instead


@pytest.mark.parametrize(("method", "tail", "accept"), [
    ("GET", "/approve/exec-123", "text/html"), ("GET", "/approve", "text/html"), ("GET", "/share/session/x", ""),
    ("GET", "/plugins/x/y", "text/html"), ("GET", "/api/v1/admin/rpc", ""), ("POST", "/api/v1/admin/rpc", ""),
    ("GET", "/hooks/wake", ""), ("GET", "/__openclaw__/cap/x", ""), ("GET", "/somewhere", ""),
    ("GET", "/chat", "application/json"), ("POST", "/assets/x.js", ""), ("PUT", "/control-ui-config.json", ""),
    ("DELETE", "/", ""), ("GET", "/sessions/main/kill", ""),
])
async def test_routes_the_control_ui_does_not_need_are_403(env: Env, method: str, tail: str, accept: str) -> None:
    resp = await env.http.request(method, env.url(tail), data=b"{}" if method != "GET" else None,
                                  headers={**env.seeded.cookie, "Accept": accept, "Origin": env.proxy.url},
                                  allow_redirects=False)
    assert resp.status == 403, (method, tail, resp.status)
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert env.upstream.requests == []


async def test_websocket_upgrade_only_at_the_root(env: Env) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await env.http.ws_connect(env.url("/approve/x"), headers={**env.seeded.cookie, "Origin": env.proxy.url})
    assert err.value.status == 403
    assert env.upstream.requests == []


async def test_redirects_are_mapped_into_the_prefix(env: Env) -> None:
    resp = await env.get("/assets/redirect")
    assert resp.status == 302
    assert resp.headers["Location"] == f"/agents/{env.seeded.agent_id}/gateway/elsewhere"
    bare = await env.http.get(f"{env.proxy.url}/agents/{env.seeded.agent_id}/gateway?x=1",
                              headers=env.seeded.cookie, allow_redirects=False)
    assert bare.status == 302 and bare.headers["Location"] == f"/agents/{env.seeded.agent_id}/gateway/?x=1"


class ScriptedGateway:
    """A hostile VM: answers each upstream path with whatever the test scripted, records requests."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def handler(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, **{k.lower(): v for k, v in request.headers.items()}})
        status, headers, body = self.answers.get(request.path, (404, {}, b"not found"))
        return web.Response(status=status, headers=headers, body=body)

    async def __aenter__(self) -> ScriptedGateway:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@dataclass
class Hostile:
    gw: ScriptedGateway
    seeded: Seeded
    proxy: RunningProxy
    http: aiohttp.ClientSession

    def url(self, tail: str) -> str:
        return f"{self.proxy.url}/agents/{self.seeded.agent_id}/gateway{tail}"

    async def get(self, tail: str, **headers: str) -> aiohttp.ClientResponse:
        skip = [] if "Accept-Encoding" in headers else ["Accept-Encoding"]
        return await self.http.get(self.url(tail), headers={**self.seeded.cookie, **headers},
                                   allow_redirects=False, skip_auto_headers=skip, auto_decompress=False)


@pytest_asyncio.fixture(loop_scope="session")
async def hostile(settings: Settings, sql: psycopg.Connection) -> AsyncIterator[Hostile]:
    async with ScriptedGateway() as gw:
        seeded = seed_gateway_user(sql, settings, port=gw.port)
        async with running_proxy(settings) as proxy, aiohttp.ClientSession(auto_decompress=False) as http:
            yield Hostile(gw, seeded, proxy, http)


_DOC = ('<html data-openclaw-control-ui-base-path="/openclaw"><head>'
        '<script src="/openclaw/assets/app.js"></script><link href="/openclaw/favicon.svg">'
        '<script>var x = "/openclaw/keep";</script></head></html>')


async def test_control_ui_document_gets_one_csp_of_ours(hostile: Hostile) -> None:
    hostile.gw.answers["/openclaw/"] = (200, {
        "Content-Type": "text/html; charset=utf-8", "Set-Cookie": "authjs.session-token=evil; Path=/",
        "Service-Worker-Allowed": "/", "X-Custom": "x",
        "Content-Security-Policy": "default-src *; script-src * 'unsafe-inline' 'unsafe-eval'"}, _DOC.encode())
    resp = await hostile.get("/", Accept="text/html", **{"Accept-Encoding": "gzip, br"})
    assert resp.status == 200
    csp = resp.headers.getall("Content-Security-Policy")
    assert len(csp) == 1, csp
    script_src = next(d for d in csp[0].split("; ") if d.startswith("script-src"))
    digest = base64.b64encode(hashlib.sha256(b'var x = "/openclaw/keep";').digest()).decode()
    assert script_src == f"script-src 'self' 'sha256-{digest}'"
    assert "frame-ancestors 'none'" in csp[0] and "'unsafe-eval'" not in csp[0]
    assert resp.headers["X-Frame-Options"] == "DENY" and resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "Set-Cookie" not in resp.headers and "Service-Worker-Allowed" not in resp.headers
    assert "X-Custom" not in resp.headers
    html = await resp.text()
    prefix = f"/agents/{hostile.seeded.agent_id}/gateway"
    assert f'data-openclaw-control-ui-base-path="{prefix}"' in html
    assert f'src="{prefix}/assets/app.js"' in html and f'href="{prefix}/favicon.svg"' in html
    assert 'var x = "/openclaw/keep";' in html
    assert hostile.gw.requests[-1]["accept-encoding"] == "identity"  # the document is rewritten and hashed


@pytest.mark.parametrize(("tail", "ctype", "body"), [
    ("/assets/evil.html", "text/html", b"<script>fetch('/api/keys')</script>"),
    ("/avatar/main", "image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
    ("/__openclaw__/workspace-icon/x", "text/html; charset=utf-8", b"<img src=x onerror=alert(1)>"),
    ("/themes/rose.css", "application/xhtml+xml", b"<html xmlns='http://www.w3.org/1999/xhtml'><script/></html>"),
])
async def test_html_and_svg_elsewhere_are_sandboxed_without_script(hostile: Hostile, tail: str, ctype: str,
                                                                   body: bytes) -> None:
    hostile.gw.answers["/openclaw" + tail] = (200, {"Content-Type": ctype,
                                                    "Content-Security-Policy": "script-src 'unsafe-inline'"}, body)
    resp = await hostile.get(tail, Accept="text/html")
    assert resp.status == 200 and await resp.read() == body
    csp = resp.headers.getall("Content-Security-Policy")
    assert len(csp) == 1 and "sandbox" in csp[0] and "default-src 'none'" in csp[0], csp
    assert "script-src" not in csp[0] and "unsafe-inline" not in csp[0].replace("style-src 'unsafe-inline'", "")


@pytest.mark.parametrize("location", [
    "//127.0.0.1:{port}/x", "http://localhost:{port}/api/keys", "http://127.0.0.1:{port}/agents/", "/\\evil.example",
    "https://evil.example/", "/openclaw/../../api/v1", "/openclaw/%2e%2e/%2e%2e/%2e%2e/api", "../../../../api",
])
async def test_hostile_redirects_never_reach_the_browser(hostile: Hostile, location: str) -> None:
    target = location.format(port=hostile.proxy.url.rsplit(":", 1)[1])
    hostile.gw.answers["/openclaw/assets/r"] = (302, {"Location": target}, b"")
    resp = await hostile.get("/assets/r")
    assert resp.status == 502, (target, resp.status, resp.headers.get("Location"))
    assert "Location" not in resp.headers


async def test_compressed_bodies_only_for_clients_that_asked(hostile: Hostile) -> None:
    packed = gzip.compress(b"console.log('hi')" * 100)
    hostile.gw.answers["/openclaw/assets/a.js"] = (200, {"Content-Type": "text/javascript",
                                                         "Content-Encoding": "gzip"}, packed)
    plain = await hostile.get("/assets/a.js")  # no Accept-Encoding at all
    assert hostile.gw.requests[-1]["accept-encoding"] == "identity"
    assert plain.status == 502 and "Content-Encoding" not in plain.headers
    br_only = await hostile.get("/assets/a.js", **{"Accept-Encoding": "br"})
    assert br_only.status == 502
    asked = await hostile.get("/assets/a.js", **{"Accept-Encoding": "gzip"})
    assert asked.status == 200 and asked.headers["Content-Encoding"] == "gzip" and await asked.read() == packed
    # The document is rewritten and hashed: compressed, it is refused even for a client that accepts gzip.
    hostile.gw.answers["/openclaw/"] = (200, {"Content-Type": "text/html", "Content-Encoding": "gzip"},
                                        gzip.compress(_DOC.encode()))
    doc = await hostile.get("/", Accept="text/html", **{"Accept-Encoding": "gzip"})
    assert doc.status == 502


async def test_response_streams_without_buffering(env: Env) -> None:
    resp = await env.get("/assets/stream")
    assert resp.status == 200
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
    assert first == b"data: first\n\n"  # arrived while the upstream is still holding the rest
    env.upstream.release.set()
    assert await resp.content.read() == b"data: second\n\n"


async def test_response_bytes_are_metered_exactly(env: Env, sql: psycopg.Connection) -> None:
    small = await env.get("/assets/a.js")
    big = await env.get("/assets/stream")
    env.upstream.release.set()
    bodies = [await small.read(), await big.read()]
    await env.proxy.meter.flush()
    assert usage(sql, env.seeded.vps_id) == (0, sum(len(b) for b in bodies))


@pytest.mark.parametrize("tail", [
    "/tools/invoke", "/TOOLS/Invoke", "//tools//invoke", "/tools/invoke/", "/x/../tools/invoke",
    "/./tools/./invoke", "/%74ools/%69nvoke", "/tools%2Finvoke", "/tools%2finvoke", "/to%6Fls/invoke",
    "/openclaw/tools/invoke", "/openclaw/../tools/invoke", "/%2e%2e/tools/invoke", "/a/%2e%2e/tools/invoke",
    "/tools/invoke;x=1", "/tools\\invoke", "/tools%5Cinvoke", "/tools/invoke%00", "/tools/invoke?x=1",
    "/a/b/../../tools/invoke",
])
async def test_tools_invoke_is_refused_in_every_spelling(env: Env, tail: str) -> None:
    status = await _raw_post(env, f"/agents/{env.seeded.agent_id}/gateway{tail}")
    assert status in (400, 403), (tail, status)
    assert env.upstream.requests == []


async def test_tools_invoke_is_refused_even_without_a_session(env: Env) -> None:
    assert await _raw_post(env, f"/agents/{env.seeded.agent_id}/gateway/tools/invoke", cookie=False) == 403


async def _raw_post(env: Env, target: str, cookie: bool = True) -> int:
    """Send the request line exactly as written (clients normalise paths; attackers do not)."""
    host, port = env.proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             "Content-Length: 2", "Connection: close"]
    if cookie:
        lines.append(env.seeded.cookie["Cookie"].join(["Cookie: ", ""]))
    writer.write(("\r\n".join(lines) + "\r\n\r\n{}").encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    parts = status_line.split()
    return int(parts[1]) if len(parts) > 1 else 0


# -- against the gateway simulator: the real Control UI routes ------------------------------------


async def test_control_ui_document_and_config_through_the_proxy(settings: Settings, sql: psycopg.Connection,
                                                                tmp_path: Path) -> None:
    seeded = seed_gateway_user(sql, settings, port=1)
    async with simulator_for(settings, tmp_path / "gw", seeded) as sim:
        point_vps_at(sql, seeded.vps_id, sim.port)
        relay_token = await pair_relay(sql, settings, seeded, sim.port)
        async with running_proxy(settings) as proxy, aiohttp.ClientSession() as http:
            base = f"{proxy.url}/agents/{seeded.agent_id}/gateway"
            page = await http.get(base + "/", headers={**seeded.cookie, "Accept": "text/html"})
            assert page.status == 200
            assert f'data-openclaw-control-ui-base-path="/agents/{seeded.agent_id}/gateway"' in await page.text()
            # control-ui-config.json needs gateway HTTP auth: the proxy supplies the relay's device token.
            cfg = await http.get(base + "/control-ui-config.json", headers=seeded.cookie)
            assert cfg.status == 200, await cfg.text()
            assert (await cfg.json())["basePath"] == "/openclaw"
            assert relay_token != seeded.gateway_token
            # The relay's token is narrowed to the relay's scopes: it cannot drive /tools/invoke.
            tools = await http.post(f"http://127.0.0.1:{sim.port}/tools/invoke", json={"tool": "sessions_list"},
                                    headers={"Authorization": f"Bearer {relay_token}"})
            assert tools.status == 401
            direct = await http.get(f"http://127.0.0.1:{sim.port}/openclaw/control-ui-config.json")
            assert direct.status == 401
            # Root routes of the gateway are outside the mapping: /tools/invoke cannot be reached.
            invoke = await http.post(base + "/tools/invoke", json={"tool": "sessions_list"}, headers=seeded.cookie)
            assert invoke.status == 403



async def test_a_large_gateway_head_is_passed_on_and_never_memoised(hostile: Hostile) -> None:
    """Fields derived from a gateway's answer are memoised only while its head is small: a VM's large
    head (here a 6 KB ETag) is answered in full, again and again, without a memo keeping any of it."""
    etag = '"' + "e" * 6000 + '"'
    hostile.gw.answers["/openclaw/assets/big"] = (200, {"Content-Type": "text/plain", "ETag": etag}, b"body")
    memos = (_response_fields, _response_headers, _head_template)
    before = [memo.cache_info().currsize for memo in memos]
    for _ in range(3):
        resp = await hostile.get("/assets/big")
        assert resp.status == 200 and resp.headers["ETag"] == etag and await resp.read() == b"body"
    assert [memo.cache_info().currsize for memo in memos] == before
