"""Issue 9 #4: cloud VMs reach the forward proxy over TLS, so their credentials (agent id and
gateway token in Proxy-Authorization) never cross the internet in clear text; and a plain-http
public URL for it is refused unless it is a private address."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from pathlib import Path

import psycopg
import pytest
from pydantic import ValidationError

from gateway_simulator.tls import make_self_signed
from openclaw.agent_env import forward_proxy_url
from openclaw.tls import check_peer, pinned_context
from settings import Settings
from tests.conftest import free_port
from tests.proxy_harness import running_proxy, seed_gateway_user
from tests.test_proxy_forward import PUBLIC_NAME, RawUpstream, loopback_policy

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_forward_proxy_tls_listener_tunnels_for_cloud_vms(settings: Settings, sql: psycopg.Connection,
                                                                tmp_path: Path) -> None:
    fingerprint = make_self_signed(tmp_path / "proxy.pem", tmp_path / "proxy.key", "forward-proxy.test")
    tls_settings = settings.model_copy(update={"forward_proxy_tls_cert": str(tmp_path / "proxy.pem"),
                                               "forward_proxy_tls_key": str(tmp_path / "proxy.key"),
                                               "forward_proxy_tls_port": free_port()})
    async with RawUpstream(echo=True) as echo:
        seeded = seed_gateway_user(sql, settings, port=1)
        async with running_proxy(tls_settings, policy=loopback_policy(echo)) as proxy:
            assert proxy.forward_tls_port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.forward_tls_port, ssl=pinned_context())
            check_peer(writer.get_extra_info("ssl_object"), fingerprint)  # TLS with the proxy's certificate
            auth = base64.b64encode(f"{seeded.agent_id}:{seeded.gateway_token}".encode()).decode()
            writer.write(f"CONNECT {PUBLIC_NAME}:{echo.port} HTTP/1.1\r\nHost: {PUBLIC_NAME}:{echo.port}\r\n"
                         f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            writer.write(b"through the tunnel")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(18), 10) == b"through the tunnel"
            writer.close()
            # A plain-text client on the TLS port gets nothing served.
            plain_r, plain_w = await asyncio.open_connection("127.0.0.1", proxy.forward_tls_port)
            plain_w.write(f"CONNECT {PUBLIC_NAME}:{echo.port} HTTP/1.1\r\n\r\n".encode())
            assert b"200" not in await asyncio.wait_for(plain_r.read(), 15)
            plain_w.close()


async def test_forward_proxy_tls_listener_shares_the_forward_connection_budget(
        settings: Settings, sql: psycopg.Connection, tmp_path: Path) -> None:
    """The TLS listener counts against the forward proxy's own connection caps (issue 9 #9), like
    the plain one: with one connection per address allowed, a held TLS tunnel leaves none for a
    plain connection from the same address (and the browsers' listener is not involved)."""
    make_self_signed(tmp_path / "proxy.pem", tmp_path / "proxy.key", "forward-proxy.test")
    tls_settings = settings.model_copy(update={"forward_proxy_tls_cert": str(tmp_path / "proxy.pem"),
                                               "forward_proxy_tls_key": str(tmp_path / "proxy.key"),
                                               "forward_proxy_tls_port": free_port(),
                                               "forward_proxy_max_connections_per_ip": 1})
    async with RawUpstream(echo=True) as echo:
        seeded = seed_gateway_user(sql, settings, port=1)
        auth = base64.b64encode(f"{seeded.agent_id}:{seeded.gateway_token}".encode()).decode()
        connect = (f"CONNECT {PUBLIC_NAME}:{echo.port} HTTP/1.1\r\nHost: {PUBLIC_NAME}:{echo.port}\r\n"
                   f"Proxy-Authorization: Basic {auth}\r\n\r\n").encode()
        async with running_proxy(tls_settings, policy=loopback_policy(echo)) as proxy:
            assert proxy.forward_tls_port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.forward_tls_port, ssl=pinned_context())
            writer.write(connect)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200 ")
            # The TLS tunnel holds this address's one slot: a plain connection is dropped unserved.
            plain_r, plain_w = await asyncio.open_connection("127.0.0.1", proxy.forward_port)
            plain_w.write(connect)
            answer = b""
            with contextlib.suppress(ConnectionError):
                answer = await asyncio.wait_for(plain_r.read(64), 10)  # EOF at once when refused
            assert not answer.startswith(b"HTTP/1.1 200"), answer
            plain_w.close()
            writer.write(b"still tunnelled")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(15), 10) == b"still tunnelled"
            writer.close()


async def test_cloud_vms_get_the_https_proxy_url_and_plain_http_must_be_private(settings: Settings) -> None:
    cloud = settings.model_copy(update={"forward_proxy_public_url": "https://egress.slopbox.example:8443"})
    assert forward_proxy_url(cloud, local=False) == "https://egress.slopbox.example:8443"
    assert forward_proxy_url(cloud, local=True) == f"http://127.0.0.1:{settings.forward_proxy_port}"
    with pytest.raises(ValidationError, match="https"):
        Settings(_env_file=None, forward_proxy_public_url="http://egress.slopbox.example:8081")  # type: ignore[call-arg]
    assert Settings(_env_file=None, forward_proxy_public_url="http://10.0.0.2:8081"  # type: ignore[call-arg]
                    ).forward_proxy_public_url == "http://10.0.0.2:8081"
