"""The Control UI asset cache: fingerprinted assets answered from the proxy, never across users unverified."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.asset_cache import IMMUTABLE
from proxy.headers import SCRIPT_CSP
from settings import Settings
from tests.proxy_harness import Seeded, running_proxy, seed_gateway_user

pytestmark = pytest.mark.asyncio(loop_scope="session")

ASSET = "/assets/index-DsEuFQRE.js"
GOOD = b"console.log('the real control ui');" * 20
EVIL = b"fetch('/steal?c=' + document.cookie);" * 20
BUILD = "2026.9.6-release-test"
DOC = f'<html data-openclaw-control-ui-base-path="/openclaw" data-openclaw-control-ui-build-id="{BUILD}"></html>'


@dataclass
class FakeGateway:
    """A VM's gateway as the reference describes its static files; counts every request it gets."""

    body: bytes = GOOD
    hits: list[str] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def handler(self, request: web.Request) -> web.Response:
        self.hits.append(request.path_qs)
        path = request.path.removeprefix("/openclaw")
        if path.startswith("/assets/") and path.endswith(".js"):
            body = self.body
            headers = {"Cache-Control": IMMUTABLE, "Vary": "Accept-Encoding", "Last-Modified": "Tue, 01 Dec 2026"}
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                body, headers["Content-Encoding"] = gzip.compress(body, mtime=0), "gzip"
            return web.Response(body=body, content_type="application/javascript", headers=headers)
        if path.startswith("/assets/"):  # a file the gateway does not mark immutable
            return web.Response(body=b"body{}", content_type="text/css", headers={"Cache-Control": "no-cache"})
        if path in ("/", "/sw.js", "/themes/rose.css"):
            ctype = "text/html" if path == "/" else "text/plain"
            return web.Response(text=DOC if path == "/" else "x", content_type=ctype,
                                headers={"Cache-Control": "no-cache"})
        return web.Response(status=404)

    async def __aenter__(self) -> FakeGateway:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def fetch(http: aiohttp.ClientSession, base: str, who: Seeded, tail: str, agent: Seeded | None = None,
                encoding: str = "identity") -> tuple[int, dict[str, str], bytes]:
    url = f"{base}/agents/{(agent or who).agent_id}/gateway{tail}"
    async with http.get(url, headers={**who.cookie, "Accept-Encoding": encoding}, allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_second_request_does_not_reach_the_vm(settings: Settings, sql: psycopg.Connection,
                                                    http: aiohttp.ClientSession) -> None:
    async with FakeGateway() as gw, running_proxy(settings) as proxy:
        me = seed_gateway_user(sql, settings, port=gw.port)
        first = await fetch(http, proxy.url, me, ASSET)
        second = await fetch(http, proxy.url, me, ASSET)
        assert first[0] == second[0] == 200 and first[2] == second[2] == GOOD
        assert gw.hits == [f"/openclaw{ASSET}"]
        headers = second[1]
        assert headers["Cache-Control"] == IMMUTABLE and headers["Vary"] == "Accept-Encoding"
        assert headers["Content-Security-Policy"] == SCRIPT_CSP
        assert headers["Content-Type"].startswith("application/javascript")
        assert "Last-Modified" not in headers and "Set-Cookie" not in headers

        # A client that accepts gzip gets the gzip answer (fetched once too); one that does not, never.
        zipped = [await fetch(http, proxy.url, me, ASSET, encoding="gzip") for _ in range(2)]
        assert all(z[1].get("Content-Encoding") == "gzip" and gzip.decompress(z[2]) == GOOD for z in zipped)
        assert len(gw.hits) == 2
        plain = await fetch(http, proxy.url, me, ASSET)
        assert "Content-Encoding" not in plain[1] and plain[2] == GOOD


@pytest.mark.parametrize("tail", ["/", "/sw.js", "/themes/rose.css", "/assets/index-DsEuFQRE.js?v=1",
                                  "/assets/app.js", "/assets/page-Ab12Cd34.css"])
async def test_other_paths_are_not_cached(settings: Settings, sql: psycopg.Connection, http: aiohttp.ClientSession,
                                          tail: str) -> None:
    async with FakeGateway() as gw, running_proxy(settings) as proxy:
        me = seed_gateway_user(sql, settings, port=gw.port)
        for _ in range(2):
            status, _, _ = await fetch(http, proxy.url, me, tail)
            assert status == 200
        assert len(gw.hits) == 2  # both went to the VM


async def test_cached_asset_still_needs_session_and_ownership(settings: Settings, sql: psycopg.Connection,
                                                              http: aiohttp.ClientSession) -> None:
    async with FakeGateway() as gw, running_proxy(settings) as proxy:
        owner = seed_gateway_user(sql, settings, port=gw.port)
        stranger = seed_gateway_user(sql, settings, port=gw.port)
        assert (await fetch(http, proxy.url, owner, ASSET))[0] == 200
        status, _, body = await fetch(http, proxy.url, stranger, ASSET, agent=owner)
        assert status == 404 and GOOD not in body
        async with http.get(f"{proxy.url}/agents/{owner.agent_id}/gateway{ASSET}") as resp:
            assert resp.status == 401
        sql.execute("UPDATE vpses SET state = 'stopped' WHERE id = %s", (owner.vps_id,))
        assert (await fetch(http, proxy.url, owner, ASSET))[0] == 409
        assert gw.hits == [f"/openclaw{ASSET}"]


async def test_one_users_gateway_cannot_plant_an_asset_for_another(settings: Settings, sql: psycopg.Connection,
                                                                   http: aiohttp.ClientSession) -> None:
    """Without a trusted manifest, entries are per user: another user's VM is asked for its own copy."""
    async with FakeGateway(body=EVIL) as evil_gw, FakeGateway() as good_gw, running_proxy(settings) as proxy:
        attacker = seed_gateway_user(sql, settings, port=evil_gw.port)
        victim = seed_gateway_user(sql, settings, port=good_gw.port)
        assert (await fetch(http, proxy.url, attacker, "/"))[0] == 200  # same build id on both documents
        assert (await fetch(http, proxy.url, victim, "/"))[0] == 200
        assert (await fetch(http, proxy.url, attacker, ASSET))[2] == EVIL
        assert (await fetch(http, proxy.url, victim, ASSET))[2] == GOOD
        assert (await fetch(http, proxy.url, victim, ASSET))[2] == GOOD
        assert good_gw.hits.count(f"/openclaw{ASSET}") == 1


async def test_verified_assets_are_shared_across_users(settings: Settings, sql: psycopg.Connection,
                                                       http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """With the trusted manifest of the build, a verified asset fetched for one user serves everyone;
    a body that does not match it is never shared."""
    manifest = tmp_path / "asset-manifest.json"
    manifest.write_text(json.dumps({"version": 1, "generation": "g" * 64, "assets": [
        {"path": f"assets/{ASSET.rsplit('/', 1)[1]}", "sha256": hashlib.sha256(GOOD).hexdigest(),
         "size": len(GOOD)}]}))
    trusted = settings.model_copy(update={"proxy_control_ui_manifest": str(manifest)})
    async with (FakeGateway(body=EVIL) as evil_gw, FakeGateway() as good_gw, FakeGateway() as other_gw,
                running_proxy(trusted) as proxy):
        attacker = seed_gateway_user(sql, settings, port=evil_gw.port)
        first = seed_gateway_user(sql, settings, port=good_gw.port)
        second = seed_gateway_user(sql, settings, port=other_gw.port)
        assert (await fetch(http, proxy.url, attacker, ASSET))[2] == EVIL  # their own VM's answer, to them only
        assert (await fetch(http, proxy.url, first, ASSET))[2] == GOOD
        assert (await fetch(http, proxy.url, second, ASSET))[2] == GOOD
        assert other_gw.hits == []  # the second user's VM was never asked
        assert (await fetch(http, proxy.url, attacker, ASSET))[2] == GOOD  # the verified copy wins
