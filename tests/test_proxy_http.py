"""Plain HTTP through the gateway proxy: session auth, ownership, VPS state, header hygiene, the
`/tools/invoke` block, streaming, the Control UI base path and byte metering."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import psycopg
import pytest
import pytest_asyncio

from proxy.app import RunningProxy
from proxy.config import ProxyConfig
from settings import Settings
from tests.proxy_harness import (
    TEST_CONFIG,
    RecordingUpstream,
    Seeded,
    add_session,
    point_vps_at,
    running_proxy,
    seed_gateway_user,
    simulator_for,
    usage,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


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
        async with running_proxy(settings) as proxy, aiohttp.ClientSession() as http:
            yield Env(seeded, upstream, proxy, http)


# -- who may pass ------------------------------------------------------------------------------------


async def test_no_cookie_is_401(env: Env) -> None:
    resp = await env.http.get(env.url())
    assert resp.status == 401
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert env.upstream.requests == []


async def test_both_cookie_names_work(env: Env, sql: psycopg.Connection) -> None:
    assert (await env.get("/x")).status == 200
    secure = add_session(sql, env.seeded.user_id)
    resp = await env.get("/x", cookie=f"__Secure-authjs.session-token={secure}")
    assert resp.status == 200
    other = await env.get("/x", cookie="next-auth.session-token=" + env.seeded.session)  # v4 name: not accepted
    assert other.status == 401


async def test_expired_and_deleted_sessions_are_401(env: Env, sql: psycopg.Connection) -> None:
    expired = add_session(sql, env.seeded.user_id, expires_in=timedelta(seconds=-1))
    assert (await env.get("/x", cookie=f"authjs.session-token={expired}")).status == 401
    doomed = add_session(sql, env.seeded.user_id)
    sql.execute('DELETE FROM sessions WHERE "sessionToken" = %s', (doomed,))
    assert (await env.get("/x", cookie=f"authjs.session-token={doomed}")).status == 401
    assert (await env.get("/x", cookie="authjs.session-token=" + "z" * 300)).status == 401
    assert env.upstream.requests == []


async def test_another_users_agent_is_404(env: Env, sql: psycopg.Connection, settings: Settings) -> None:
    other = seed_gateway_user(sql, settings, port=env.upstream.port)
    mine_cookie = env.seeded.cookie["Cookie"]
    resp = await env.http.get(env.url("/x", agent=other.agent_id), headers={"Cookie": mine_cookie})
    assert resp.status == 404
    missing = await env.http.get(env.url("/x", agent="00000000-0000-4000-8000-000000000000"),
                                 headers={"Cookie": mine_cookie})
    assert missing.status == 404
    assert (await resp.json())["detail"] == (await missing.json())["detail"]
    assert env.upstream.requests == []


@pytest.mark.parametrize("state", ["stopped", "provisioning", "error", "destroyed"])
async def test_vps_not_running_is_409_and_never_woken(env: Env, sql: psycopg.Connection, state: str) -> None:
    sql.execute("UPDATE vpses SET state = %s WHERE id = %s", (state, env.seeded.vps_id))
    resp = await env.get("/x")
    assert resp.status == 409
    body = await resp.json()
    assert body["vps_state"] == state and state in body["detail"]
    assert env.upstream.requests == []
    row = sql.execute("SELECT state, (SELECT count(*) FROM vps_operations o WHERE o.vps_id = v.id) FROM vpses v "
                      "WHERE id = %s", (env.seeded.vps_id,)).fetchone()
    assert row == (state, 0)  # the proxy never starts anything


async def test_agent_without_vps_is_409(env: Env, sql: psycopg.Connection) -> None:
    sql.execute("UPDATE agents SET vps_id = NULL WHERE id = %s", (env.seeded.agent_id,))
    assert (await env.get("/x")).status == 409


async def test_request_rate_limit_is_429_with_retry_after(settings: Settings, sql: psycopg.Connection) -> None:
    cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "http_burst": 3, "http_rate_per_s": 0.01})
    async with RecordingUpstream() as upstream:
        seeded = seed_gateway_user(sql, settings, port=upstream.port)
        async with running_proxy(settings, config=cfg) as proxy, aiohttp.ClientSession() as http:
            url = f"{proxy.url}/agents/{seeded.agent_id}/gateway/x"
            statuses = [(await http.get(url, headers=seeded.cookie)).status for _ in range(3)]
            limited = await http.get(url, headers=seeded.cookie)
            assert statuses == [200, 200, 200] and limited.status == 429
            assert int(limited.headers["Retry-After"]) >= 1
            # Another user is not affected.
            other = seed_gateway_user(sql, settings, port=upstream.port)
            assert (await http.get(f"{proxy.url}/agents/{other.agent_id}/gateway/x",
                                   headers=other.cookie)).status == 200


# -- what crosses -----------------------------------------------------------------------------------


async def test_token_injected_and_browser_credentials_stripped(env: Env) -> None:
    resp = await env.get("/some/path?q=1", headers={
        "Authorization": "Bearer browser-supplied", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": "evil",
        "X-Forwarded-Proto": "https", "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6",
        "x-openclaw-scopes": "operator.admin", "x-openclaw-token": "hook", "Accept": "application/json"})
    assert resp.status == 200
    seen = env.upstream.requests[-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == f"Bearer {env.seeded.gateway_token}"
    assert "cookie" not in headers
    assert not {h for h in headers if h.startswith(("x-forwarded", "x-real", "forwarded", "x-openclaw"))}
    assert headers["accept"] == "application/json"
    assert seen["path"] == "/openclaw/some/path?q=1"
    assert env.seeded.gateway_token not in json.dumps(dict(resp.headers))


async def test_security_headers_and_response_filter(env: Env) -> None:
    resp = await env.get("/page", headers={"Accept": "text/html"})
    assert resp.status == 200
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    csp = resp.headers.getall("Content-Security-Policy")
    assert "default-src 'self'" in csp and any("frame-ancestors 'none'" in c for c in csp)
    assert "Set-Cookie" not in resp.headers and "Service-Worker-Allowed" not in resp.headers
    assert "X-Custom" not in resp.headers
    # The Control UI document points at our prefix; inline scripts are untouched.
    html = await resp.text()
    prefix = f"/agents/{env.seeded.agent_id}/gateway"
    assert f'data-openclaw-control-ui-base-path="{prefix}"' in html
    assert f'src="{prefix}/assets/app.js"' in html and f'href="{prefix}/favicon.svg"' in html
    assert 'var x = "/openclaw/keep";' in html
    assert env.upstream.requests[-1]["headers"].get("Accept-Encoding") == "identity"


async def test_redirects_are_mapped_into_the_prefix(env: Env) -> None:
    resp = await env.get("/redirect")
    assert resp.status == 302
    assert resp.headers["Location"] == f"/agents/{env.seeded.agent_id}/gateway/elsewhere"
    bare = await env.http.get(f"{env.proxy.url}/agents/{env.seeded.agent_id}/gateway?x=1",
                              headers=env.seeded.cookie, allow_redirects=False)
    assert bare.status == 302 and bare.headers["Location"] == f"/agents/{env.seeded.agent_id}/gateway/?x=1"


async def test_response_streams_without_buffering(env: Env) -> None:
    resp = await env.get("/events/stream")
    assert resp.status == 200
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
    assert first == b"data: first\n\n"  # arrived while the upstream is still holding the rest
    env.upstream.release.set()
    assert await resp.content.read() == b"data: second\n\n"


async def test_request_body_streams_and_bytes_are_metered_exactly(env: Env, sql: psycopg.Connection) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    resp = await env.http.post(env.url("/upload"), data=payload, headers=env.seeded.cookie)
    body = await resp.read()
    assert resp.status == 200 and body == b"upstream:" + payload
    small = await env.http.post(env.url("/upload"), data=b"abc", headers=env.seeded.cookie)
    small_body = await small.read()
    await env.proxy.meter.flush()
    assert usage(sql, env.seeded.vps_id) == (len(payload) + 3, len(body) + len(small_body))


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


async def test_cross_site_post_is_refused(env: Env) -> None:
    resp = await env.http.post(env.url("/upload"), data=b"x",
                               headers={**env.seeded.cookie, "Origin": "https://evil.example"})
    assert resp.status == 403
    same = await env.http.post(env.url("/upload"), data=b"x", headers={**env.seeded.cookie, "Origin": env.proxy.url})
    assert same.status == 200


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
        async with running_proxy(settings) as proxy, aiohttp.ClientSession() as http:
            base = f"{proxy.url}/agents/{seeded.agent_id}/gateway"
            page = await http.get(base + "/", headers={**seeded.cookie, "Accept": "text/html"})
            assert page.status == 200
            assert f'data-openclaw-control-ui-base-path="/agents/{seeded.agent_id}/gateway"' in await page.text()
            # control-ui-config.json needs gateway HTTP auth: the proxy supplies it.
            cfg = await http.get(base + "/control-ui-config.json", headers=seeded.cookie)
            assert cfg.status == 200, await cfg.text()
            assert (await cfg.json())["basePath"] == "/openclaw"
            direct = await http.get(f"http://127.0.0.1:{sim.port}/openclaw/control-ui-config.json")
            assert direct.status == 401
            # Root routes of the gateway are outside the mapping: /tools/invoke cannot be reached.
            invoke = await http.post(base + "/tools/invoke", json={"tool": "sessions_list"}, headers=seeded.cookie)
            assert invoke.status == 403

