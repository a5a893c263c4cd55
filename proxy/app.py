"""The proxy process: the browsers' gateway proxy and the agents' forward proxy, side by side.

`slopbox proxy` calls `run(settings)`. The process is stateless apart from in-memory counters
(byte meter, rate limits) and short caches, so any number can run behind a load balancer:
metering adds up in the database. With `PROXY_PROCESSES` > 1, `run` starts that many worker
processes on the same ports (SO_REUSEPORT, the kernel spreads connections) under a small
supervisor (`proxy.supervisor`) that replaces any that die, and the per-user rate limits are
shared through PostgreSQL (`proxy.shared_limits`). Each process runs on uvloop when it is
installed (it is a dependency; plain asyncio otherwise). `serve()` is the same thing as an async
context manager, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import make_engine
from openclaw.relay import relay_origin
from proxy.access import AccessResolver
from proxy.asset_cache import AssetCache, TrustedManifest
from proxy.config import ProxyConfig
from proxy.denylist import VmAddressDenylist, control_plane_hosts, control_plane_networks
from proxy.egress import EgressPolicy, system_resolver
from proxy.enforcement import UsageEnforcer
from proxy.forward import ForwardCredentials, ForwardProxy
from proxy.gateway import GatewayProxy
from proxy.http_fast import FastFront
from proxy.listener import ConnectionGuard, GuardedSite, listener_limits, track_requests
from proxy.log_limits import install_log_limits
from proxy.metering import Meter
from proxy.metrics import CountingMeter, instrument_forward, instrument_gateway
from proxy.session_watch import SessionWatch
from proxy.shared_limits import BucketStore, SharedRateLimiter
from settings import Settings
from telemetry.metrics import start_metrics_server
from telemetry.tracing import enabled as tracing_enabled

__all__ = ["RunningProxy", "create_app", "run", "serve"]

log = logging.getLogger(__name__)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(gateway: GatewayProxy, front: FastFront | None = None) -> web.Application:
    app = web.Application(middlewares=[track_requests])
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/agents/{agent_id}/gateway", gateway.handle)
    app.router.add_route("*", "/agents/{agent_id}/gateway/{tail:.*}", gateway.handle)

    async def on_shutdown(_app: web.Application) -> None:
        if front is not None:
            await front.shutdown()
        await gateway.close_sockets()

    app.on_shutdown.append(on_shutdown)
    return app


@dataclass
class RunningProxy:
    url: str
    """http://host:port of the gateway proxy."""
    forward_host: str
    forward_port: int
    gateway: GatewayProxy
    forward: ForwardProxy
    meter: Meter
    engine: AsyncEngine
    metrics_url: str | None = None
    """http://host:port/metrics on its own listener (PROXY_METRICS_PORT), or None when off."""
    forward_tls_port: int | None = None
    """The forward proxy's TLS listener for cloud VMs (None without a certificate and key)."""
    gateway_front: FastFront | None = None
    """Serves plain gateway GETs below aiohttp (proxy.http_fast); None with `fast_http` off."""


async def _resolved_control_plane(settings: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Our own services' addresses, resolved once (best effort: a failure only logs)."""
    networks = control_plane_networks(settings)
    for host in control_plane_hosts(settings):
        try:
            for addr in await system_resolver(host):
                networks.append(ipaddress.ip_network(addr.split("%", 1)[0]))
        except (OSError, ValueError):
            log.warning("could not resolve a control-plane host for the egress denylist", extra={"host": host})
    return networks


def share_gateway_limits(gateway: GatewayProxy, store: BucketStore, cfg: ProxyConfig) -> None:
    """The browser side's per-user token buckets in PostgreSQL, so they hold across processes."""
    gateway.http_limiter = SharedRateLimiter(store, "http", cfg.http_rate_per_s, cfg.http_burst)
    gateway.frame_limiter = SharedRateLimiter(store, "ws_frame", cfg.ws_frame_rate_per_s, cfg.ws_frame_burst)
    gateway.byte_limiter = SharedRateLimiter(store, "ws_byte", cfg.ws_byte_rate_per_s,
                                             max(cfg.ws_byte_burst, cfg.max_client_frame_bytes))


def trusted_manifest(settings: Settings) -> TrustedManifest | None:
    """The Control UI build whose assets may be shared across users (proxy.asset_cache)."""
    path = settings.proxy_control_ui_manifest
    if path is None and settings.openclaw_bin:  # scripts/install-openclaw.sh: .tools/bin -> .tools/openclaw
        candidate = (Path(settings.openclaw_bin).resolve().parent.parent
                     / "openclaw/node_modules/openclaw/dist/control-ui/asset-manifest.json")
        path = str(candidate) if candidate.is_file() else None
    if path is None:
        return None
    try:
        return TrustedManifest.load(Path(path))
    except (OSError, ValueError, KeyError, TypeError):
        log.error("Control UI asset manifest unreadable; assets are cached per user only", extra={"path": path})
        return None


@contextlib.asynccontextmanager
async def serve(settings: Settings, *, config: ProxyConfig | None = None, policy: EgressPolicy | None = None,
                host: str | None = None, port: int | None = None, forward_port: int | None = None,
                forward_tls_port: int | None = None, shared_limits: bool | None = None,
                reuse_port: bool = False, metrics_port: int | None = None) -> AsyncIterator[RunningProxy]:
    """Both listeners up until the block exits; then sockets are closed and the meter flushed.

    `shared_limits` (default: when `PROXY_PROCESSES` > 1) keeps the per-user rate buckets in
    PostgreSQL; `reuse_port` lets sibling processes bind the same ports."""
    cfg = config or ProxyConfig()
    shared = settings.proxy_processes > 1 if shared_limits is None else shared_limits
    metrics_port = settings.proxy_metrics_port if metrics_port is None else metrics_port
    host = host if host is not None else settings.proxy_host
    port = port if port is not None else settings.proxy_port
    forward_port = forward_port if forward_port is not None else settings.forward_proxy_port
    engine = make_engine(settings)
    store = BucketStore.for_engine(engine)
    meter = CountingMeter(engine, flush_interval_s=cfg.flush_interval_s)
    denylist = VmAddressDenylist(engine, cfg.denylist_refresh_s)
    client = aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30),
    )
    runner: web.AppRunner | None = None
    server: asyncio.Server | None = None
    tls_server: asyncio.Server | None = None
    forward: ForwardProxy | None = None
    metrics: web.AppRunner | None = None
    gateway: GatewayProxy | None = None
    remove_log_limits = install_log_limits()
    browser_limits, forward_limits = listener_limits(settings)
    try:
        metrics = await start_metrics_server(settings.metrics_host, metrics_port, service="proxy")
        meter.start()
        access = AccessResolver(engine, settings, ttl_s=cfg.auth_cache_ttl_s)
        assets = AssetCache(max_bytes=settings.proxy_asset_cache_bytes, max_entry_bytes=cfg.max_cached_asset_bytes,
                            manifest=trusted_manifest(settings)) if settings.proxy_asset_cache_bytes > 0 else None
        gateway = GatewayProxy(config=cfg, access=access, client=client, meter=meter,
                               relay_origin=relay_origin(settings), sessions=SessionWatch(engine), assets=assets)
        if shared:
            share_gateway_limits(gateway, store, cfg)
        instrument_gateway(gateway)
        # The fast front has no server span: with tracing on, every request goes through aiohttp,
        # whose instrumentation traces it (and joins the caller's traceparent).
        front = FastFront(gateway.handle, keepalive_timeout=settings.proxy_keepalive_timeout_s,
                          shutdown_timeout=5.0) if cfg.fast_http and not tracing_enabled() else None
        runner = web.AppRunner(create_app(gateway, front), access_log=None, shutdown_timeout=5.0,
                               keepalive_timeout=settings.proxy_keepalive_timeout_s)
        await runner.setup()
        site = GuardedSite(runner, host, port, ConnectionGuard("gateway proxy", browser_limits), reuse_port=reuse_port,
                           front=front.factory if front is not None else None)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        if policy is None:
            denylist.start()
            policy = EgressPolicy(system_resolver, denied=await _resolved_control_plane(settings),
                                  denied_dynamic=denylist.addresses,
                                  allowed_ports=settings.forward_proxy_allowed_ports)
        forward = ForwardProxy(
            config=cfg, meter=meter, policy=policy,
            credentials=ForwardCredentials(engine, ttl_s=cfg.forward_credentials_ttl_s),
            enforcer=UsageEnforcer(engine, meter, ttl_s=cfg.enforcement_cache_ttl_s),
        )
        if shared:
            forward.rate = SharedRateLimiter(store, "forward", cfg.forward_rate_per_s, cfg.forward_burst)
        instrument_forward(forward)
        forward_guard = ConnectionGuard("forward proxy", forward_limits)
        server = await forward.start(host, forward_port, guard=forward_guard, reuse_port=reuse_port)
        fport = server.sockets[0].getsockname()[1]
        tls_port = None
        if settings.forward_proxy_tls_cert and settings.forward_proxy_tls_key:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            tls.load_cert_chain(settings.forward_proxy_tls_cert, settings.forward_proxy_tls_key)
            # The same connection budget as the plain forward listener: it cannot starve the browsers'.
            tls_server = await forward.start(
                host, forward_tls_port if forward_tls_port is not None else settings.forward_proxy_tls_port,
                guard=forward_guard, ssl=tls, reuse_port=reuse_port)
            tls_port = tls_server.sockets[0].getsockname()[1]
        yield RunningProxy(url=f"http://{host}:{bound}", forward_host=host, forward_port=fport, gateway=gateway,
                           forward=forward, meter=meter, engine=engine,
                           metrics_url=f"http://{settings.metrics_host}:{metrics_port}/metrics"
                           if metrics is not None else None, forward_tls_port=tls_port,
                           gateway_front=front)
    finally:
        if tls_server is not None:
            tls_server.close()
        if server is not None:
            server.close()
        if forward is not None:
            await forward.close()
        if runner is not None:
            await runner.cleanup()
        if gateway is not None and gateway.upstream is not None:
            await gateway.upstream.close()
        await client.close()
        await denylist.stop()
        await meter.close()
        await store.close()
        await engine.dispose()
        if metrics is not None:
            await metrics.cleanup()
        remove_log_limits()


async def _main(settings: Settings, worker: int | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics_port = None
    if worker is not None and settings.proxy_metrics_port:
        metrics_port = settings.proxy_metrics_port + worker  # one registry per process: scrape each
    async with serve(settings, reuse_port=worker is not None, metrics_port=metrics_port) as running:
        freeze_startup_heap()
        log.info("proxy listening", extra={"gateway_proxy": running.url, "worker": worker,
                                           "forward_proxy": f"{running.forward_host}:{running.forward_port}",
                                           "forward_proxy_tls_port": running.forward_tls_port,
                                           "metrics": running.metrics_url})
        await stop.wait()
    log.info("proxy stopped; usage flushed")


def freeze_startup_heap() -> None:
    """Once the proxy serves: what is alive now (modules, settings, the engine, the app; ~120k
    objects) lives as long as the process, so the cyclic collector stops walking it
    (`gc.freeze`). A full collection over it took ~40-110 ms on the 2-core host, and came often
    enough to cost ~5% of the CPU per proxied request (perf, bench/README.md); per-request objects
    die by reference counting and young ones are still collected as before."""
    gc.collect()
    gc.freeze()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (about a third less CPU per relayed frame), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def run_worker(settings: Settings, worker: int | None = None) -> None:
    """One proxy process; `worker` (an index) when it is one of the supervisor's siblings."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_main(settings, worker))


def run(settings: Settings) -> None:
    if settings.proxy_processes > 1:
        from proxy.supervisor import supervise

        supervise(settings, run_worker)
    else:
        run_worker(settings)
