"""`/agents/{agent_id}/gateway/...`: the browser's way to its own agent's gateway.

Order of checks, each answering before any byte reaches a VM: path (403 for `/tools/invoke`,
400 for anything ambiguous, 403 for any route the Control UI does not need: `paths.control_ui_route`),
cross-site Origin on upgrades and unsafe methods, the Auth.js session and ownership (401/404), the
VPS state (409, never woken), per-user rate and connection limits (429 + Retry-After). Then a
WebSocket upgrade (only at the prefix root) goes to the relay and anything else is streamed through
as the UI-relay identity (its device token, relay scopes), never with the owner-level gateway token.

Responses: exactly one CSP, ours; the Control UI document is rewritten and gets a script policy
hashed from the body we serve; everything else gets a sandboxed, script-free policy. A compressed
body goes only to a client that accepts its coding, and never where we must rewrite it. Redirects
survive only when they stay inside the agent's Control UI.

The gateway serves the Control UI under `gateway.controlUi.basePath` (`/openclaw` as rendered);
the browser sees it under `/agents/{id}/gateway`. Paths map one to one, and the UI document's
base-path attribute and asset links are rewritten so the UI builds every URL (assets, config,
its WebSocket) under our prefix. Root-level gateway routes (`/tools/invoke`, hooks, `/api/...`)
are not reachable through this mapping at all.

`handle` gets an aiohttp `web.Request`, or for a plain bodiless GET/HEAD a `proxy.http_fast.FastRequest`
(served below aiohttp's server); both go through the same checks, and only the streamed-body
writer differs (`_respond`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp import WSCloseCode, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from openclaw.render import CONTROL_UI_BASE_PATH
from proxy.access import AccessDenied, AccessResolver, GatewayTarget, session_token
from proxy.asset_cache import AssetCache, asset_name
from proxy.config import ProxyConfig
from proxy.headers import (
    RESOURCE_CSP,
    SCRIPT_CSP,
    accepted_encodings,
    document_csp,
    forwarded_for,
    is_websocket_upgrade,
    response_headers,
    upstream_request_head,
    valid_host,
)
from proxy.http_fast import FastRequest, FastResponse
from proxy.limits import ConnectionLimiter, RateLimiter, TokenBucket, retry_after_header
from proxy.listener import client_key
from proxy.metering import ConnectionBytes, Meter
from proxy.paths import BadPath, GatewayPath, RouteKind, control_ui_route, parse_gateway_path, rewrite_location
from proxy.preauth import PreAuthGuard
from proxy.problems import problem
from proxy.session_watch import SessionWatch
from proxy.upstream_http import UpstreamError, UpstreamPool, UpstreamResponse
from proxy.ws_relay import Relay, RelayContext, relay

__all__ = ["GatewayProxy", "rewrite_html"]

log = logging.getLogger(__name__)
refusals_log = logging.getLogger(__name__ + ".refusals")
"""Rate-limited (proxy.log_limits): what strangers' floods make us write."""
_REFUSED_BEFORE_LOOKUP = web.RequestKey("refused_before_lookup", bool)

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHUNK = 64 * 1024
_SMALL_BODY = 64 * 1024


def rewrite_html(html: str, upstream_base: str, prefix: str) -> str:
    """Point the Control UI document at our prefix: its base-path attribute and asset links.

    Only attribute values are touched (`="/openclaw`), never inline scripts, so the gateway's
    CSP script hashes still match.
    """
    base = upstream_base.rstrip("/")
    if not base or base == prefix:
        return html
    html = html.replace(f'data-openclaw-control-ui-base-path="{base}"',
                        f'data-openclaw-control-ui-base-path="{prefix}"')
    return re.sub(r'(\s(?:src|href|content)=")' + re.escape(base) + r'(/|")',
                  lambda m: m.group(1) + prefix + m.group(2), html)


@dataclass
class GatewayProxy:
    config: ProxyConfig
    access: AccessResolver
    client: aiohttp.ClientSession
    meter: Meter
    relay_origin: str
    upstream_base: str = CONTROL_UI_BASE_PATH
    sessions: SessionWatch | None = None
    """Closes sockets whose session ended within `session_sweep_s` (None: only the slow re-check)."""
    assets: AssetCache | None = None
    """The Control UI's fingerprinted assets from memory (proxy.asset_cache); None: always the VM."""
    upstream: UpstreamPool | None = None
    """Plain HTTP to the gateways (proxy.upstream_http); None: one is made from `config`.
    `client` (aiohttp) is only for the WebSocket relay."""

    def __post_init__(self) -> None:
        cfg = self.config
        if self.upstream is None:
            self.upstream = UpstreamPool(max_connections=cfg.upstream_max_connections,
                                         max_idle=cfg.upstream_max_idle, idle_s=cfg.upstream_idle_s)
        self.http_limiter: TokenBucket = RateLimiter(cfg.http_rate_per_s, cfg.http_burst)
        self.frame_limiter: TokenBucket = RateLimiter(cfg.ws_frame_rate_per_s, cfg.ws_frame_burst)
        self.byte_limiter: TokenBucket = RateLimiter(cfg.ws_byte_rate_per_s,
                                                     max(cfg.ws_byte_burst, cfg.max_client_frame_bytes))
        self.ws_connections = ConnectionLimiter(cfg.ws_connections_per_user)
        self.preauth = PreAuthGuard(rate_per_s=cfg.preauth_rate_per_s, burst=cfg.preauth_burst,
                                    negative_ttl_s=cfg.negative_session_ttl_s, negative_max=cfg.negative_session_max,
                                    known_ttl_s=cfg.known_pair_ttl_s, known_max=cfg.known_pair_max)
        self.open_relays: set[Relay] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._session_sweeper: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._watched: dict[bytes, tuple[str, int]] = {}
        """session hash -> (token, open sockets): what the session sweep asks about."""
        self._ended: weakref.WeakSet[Relay] = weakref.WeakSet()

    async def close_sockets(self) -> None:
        """At shutdown: every open Control UI socket gets 1001 (going away) and reconnects elsewhere."""
        for sweeper in (self._sweeper, self._session_sweeper, self._heartbeat):
            if sweeper is not None:
                sweeper.cancel()
        relays = list(self.open_relays)
        for relay_conn in relays:
            relay_conn.close_both(WSCloseCode.GOING_AWAY, "proxy restarting", upstream_code=WSCloseCode.GOING_AWAY)
        if relays:  # each waits close_timeout_s at most for its peers' answers
            await asyncio.wait([r.done for r in relays], timeout=self.config.close_timeout_s + 1.0)

    async def _heartbeats(self) -> None:
        """One timer for every open relay: idle sockets are pinged, dead ones closed (Relay.heartbeat)."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s / 2)
            self._beat()

    def _beat(self) -> None:
        for relay_conn in list(self.open_relays):  # in its own frame: nothing kept alive while we sleep
            relay_conn.heartbeat()

    async def _sweep(self) -> None:
        """Re-check every open relay's access periodically: one lookup per (session, agent), one task."""
        while True:
            await asyncio.sleep(self.config.session_recheck_s)
            await self._recheck_relays()  # its own frame: no closed relay stays referenced while we sleep

    async def _recheck_relays(self) -> None:
        """One re-check round: a closed session, lost ownership or stopped VM ends the relay (1008)."""
        verdicts: dict[object, int | None] = {}
        for relay_conn in list(self.open_relays):
            key = relay_conn.ctx.access_key
            if key not in verdicts:
                try:
                    await relay_conn.ctx.recheck()
                    verdicts[key] = None
                except AccessDenied as denied:
                    verdicts[key] = denied.status
                except Exception:
                    log.warning("access re-check failed; keeping the connection", exc_info=True)
                    verdicts[key] = None
            status = verdicts[key]
            if status is not None and relay_conn not in self._ended:
                self._ended.add(relay_conn)
                relay_conn.end_access(status)

    async def _sweep_sessions(self) -> None:
        """Every `session_sweep_s`: close the sockets whose session was deleted or expired.

        One query for all open sockets' sessions (proxy.session_watch); expiry is also checked
        from the expiry each socket was opened with, without the database.
        """
        assert self.sessions is not None
        while True:
            await asyncio.sleep(self.config.session_sweep_s)
            if not self.open_relays:
                continue
            try:
                live = await self.sessions.live([token for token, _ in self._watched.values()])
            except Exception:
                log.warning("session sweep failed; open sockets kept", exc_info=True)
                continue
            live_hashes = {h for h, (token, _) in self._watched.items() if token in live}
            now = datetime.now(UTC)
            for relay_conn in list(self.open_relays):
                key = relay_conn.ctx.access_key
                session = key[0] if isinstance(key, tuple) else None
                if relay_conn in self._ended or (session in live_hashes and relay_conn.target.session_expires > now):
                    continue
                self._ended.add(relay_conn)
                log.info("closing relay: session ended", extra={"agent_id": str(relay_conn.target.agent_id)})
                relay_conn.close_both(WSCloseCode.POLICY_VIOLATION, "session ended: sign in again",
                                      upstream_code=WSCloseCode.GOING_AWAY)

    def _watch(self, session: bytes, token: str) -> None:
        _, count = self._watched.get(session, (token, 0))
        self._watched[session] = (token, count + 1)

    def _unwatch(self, session: bytes) -> None:
        token, count = self._watched.get(session, ("", 1))
        if count <= 1:
            self._watched.pop(session, None)
        else:
            self._watched[session] = (token, count - 1)

    async def handle(self, request: web.Request) -> web.StreamResponse | FastResponse:
        started = time.monotonic()
        response = await self._handle(request)
        if request.get(_REFUSED_BEFORE_LOOKUP):  # a stranger's flood: counted, not a line each
            refusals_log.info("refused before the session lookup", extra={
                "status": response.status, "client": client_key(request.remote)})
            return response
        if log.isEnabledFor(logging.INFO):  # the line's fields cost ~5 µs even when it is dropped
            log.info("gateway request", extra={"method": request.method, "path": request.path[:200],
                                               "status": response.status,
                                               "ms": round((time.monotonic() - started) * 1000, 1)})
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse | FastResponse:
        try:
            gpath = parse_gateway_path(request.raw_path)
        except BadPath as exc:
            titles = {400: "Bad path", 403: "Forbidden", 404: "Not found"}
            return problem(exc.status, titles.get(exc.status, "Refused"), exc.reason)
        # The fast front takes no request with an `Upgrade` field at all (proxy.http_fast), so for
        # its requests this check is known to be False without reading the headers again.
        upgrade = not isinstance(request, FastRequest) and is_websocket_upgrade(request.headers)
        route = None if upgrade else control_ui_route(gpath.tail, request.method, request.headers.get("Accept", ""))
        if (upgrade and gpath.tail) or (not upgrade and route is None):
            return problem(403, "Forbidden", "This path is not part of the Control UI.")
        origin = request.headers.get("Origin")
        if origin is not None and (upgrade or request.method not in _SAFE_METHODS):
            if not _same_origin(origin, request.host):
                return problem(403, "Cross-site request", "Requests from other sites are not accepted.")
        if not valid_host(request.host):
            return problem(400, "Bad Host header", "The Host header is not a valid host name.")
        token = session_token(request.cookies)
        refused = self.preauth.before_lookup(client_key(request.remote), token, gpath.agent_id)
        if refused is not None:  # answered from memory: no database lookup (proxy.preauth)
            request[_REFUSED_BEFORE_LOOKUP] = True
            reason, wait = refused
            if reason == "unknown":
                return problem(401, "Not signed in", "Your session has expired or was signed out. Sign in again.")
            return problem(429, "Too many requests", "Too many sign-in attempts from your address; retry shortly.",
                           headers={"Retry-After": retry_after_header(wait)})
        try:
            target = await self.access.resolve(token, gpath.agent_id)
        except AccessDenied as denied:
            self.preauth.after_lookup(token, gpath.agent_id, denied.status)
            return problem(denied.status, denied.title, denied.detail, **denied.extra)
        self.preauth.after_lookup(token, gpath.agent_id, 200)
        limiter = self.http_limiter  # keyed by the id's text, as the WebSocket relay's limiters
        wait = limiter.acquire_now(target.user_key)  # `limits.take` inline: no coroutine when memory decides
        if wait is None:
            wait = await limiter.take(target.user_key)
        if wait > 0:
            return problem(429, "Too many requests", "Slow down and retry shortly.",
                           headers={"Retry-After": retry_after_header(wait)})
        if upgrade:
            return await self._websocket(request, gpath, target)
        if gpath.is_prefix_root and request.method in ("GET", "HEAD"):
            location = gpath.prefix + "/" + ("?" + gpath.query if gpath.query else "")
            return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
        return await self._forward(request, gpath, target, route or RouteKind.RESOURCE)

    # -- WebSocket ---------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request, gpath: GatewayPath, target: GatewayTarget
                         ) -> web.StreamResponse:
        if not self.ws_connections.try_acquire(target.user_id):
            return problem(429, "Too many connections", "Close another Control UI tab and retry.",
                           headers={"Retry-After": "5"})
        session = hashlib.sha256((session_token(request.cookies) or "").encode()).digest()
        watched = False

        def done() -> None:
            """When the relay is over (it outlives this handler once the socket is taken over)."""
            if watched:
                self._unwatch(session)
            self.ws_connections.release(target.user_id)
            log.info("relay closed", extra={"agent_id": str(target.agent_id)})

        try:
            headers = {"Host": request.host}
            xff = forwarded_for(request.remote)
            if xff is not None:
                headers.update({"X-Forwarded-For": xff, "X-Forwarded-Proto": request.scheme,
                                "X-Forwarded-Host": request.host})
            url = "ws" + target.base_url.removeprefix("http") + gpath.upstream(self.upstream_base)
            token = session_token(request.cookies)

            async def recheck() -> GatewayTarget:
                return await self.access.resolve(token, gpath.agent_id, fresh=True)

            ctx = RelayContext(config=self.config, meter=self.meter,
                               frame_limiter=self.frame_limiter, relay_origin=self.relay_origin, recheck=recheck,
                               access_key=(session, gpath.agent_id), open_relays=self.open_relays,
                               byte_limiter=self.byte_limiter)
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.create_task(self._sweep(), name="relay-access-sweep")
            if self.sessions is not None and (self._session_sweeper is None or self._session_sweeper.done()):
                self._session_sweeper = asyncio.create_task(self._sweep_sessions(), name="relay-session-sweep")
            if self._heartbeat is None or self._heartbeat.done():
                self._heartbeat = asyncio.create_task(self._heartbeats(), name="relay-heartbeat")
            log.info("relay open", extra={"agent_id": str(target.agent_id), "vps_id": str(target.vps_id)})
            self._watch(session, token or "")
            watched = True
        except BaseException:
            done()
            raise
        return await relay(request, ctx, target, str(URL(url, encoded=True)), headers, on_done=done)

    # -- plain HTTP --------------------------------------------------------------------------------

    async def _forward(self, request: web.Request, gpath: GatewayPath, target: GatewayTarget, route: RouteKind
                       ) -> web.StreamResponse | FastResponse:
        cache_name = None
        if self.assets is not None and route is RouteKind.RESOURCE:
            cache_name = asset_name(gpath.tail, gpath.query, request.method)
            if cache_name is not None:
                hit = self.assets.lookup(target.user_id, target.vps_id, cache_name,
                                         accepted_encodings(request.headers.get("Accept-Encoding")))
                if hit is not None:  # after the session, ownership, VPS-state and rate checks, as always
                    return hit.fast_response() if isinstance(request, FastRequest) else hit.response()
        headers, block = upstream_request_head(request.headers, client_ip=request.remote, scheme=request.scheme,
                                               host=request.host, bearer=target.relay_device_token,
                                               identity_only=route is RouteKind.DOCUMENT)
        data = self._metered_body(request, target) if request.body_exists else None
        assert self.upstream is not None
        try:
            upstream = await self.upstream.request(
                request.method, target.base_url, gpath.upstream(self.upstream_base), headers, data,
                ssl=target.upstream_ssl, connect_timeout=self.config.upstream_connect_timeout_s, fields_block=block)
        except (UpstreamError, OSError, TimeoutError):
            return problem(502, "Gateway unavailable", "The agent's gateway cannot be reached right now.")
        try:  # what `async with upstream` does, without its two coroutines
            return await self._respond(request, gpath, target, upstream, route, cache_name)
        finally:
            upstream.close()

    def _outbound(self, request: web.Request, target: GatewayTarget, size: int) -> None:
        """Metered bytes from the VM: a fast-front request counts them on its browser connection
        (`ConnectionBytes`, drained by the meter before every flush, `pending` and month end, and
        when the connection ends: the same totals), anything else adds them to the meter."""
        if type(request) is FastRequest:
            counter = request.counter
            if counter is None:
                counter = request.counter = ConnectionBytes(self.meter)
            counter.count(target.vps_id, outbound=size)
        else:
            self.meter.add(target.vps_id, outbound=size)

    async def _metered_body(self, request: web.Request, target: GatewayTarget):  # type: ignore[no-untyped-def]
        async for chunk in request.content.iter_chunked(_CHUNK):
            self.meter.add(target.vps_id, inbound=len(chunk))
            yield chunk

    async def _respond(self, request: web.Request, gpath: GatewayPath, target: GatewayTarget,
                       upstream: UpstreamResponse, route: RouteKind, cache_name: str | None = None
                       ) -> web.StreamResponse | FastResponse:
        ctype = upstream.headers.get("Content-Type", "").lower()
        coding = upstream.headers.get("Content-Encoding", "").strip().lower()
        compressed = coding not in ("", "identity")
        document = route is RouteKind.DOCUMENT and ctype.startswith("text/html")
        if compressed and (document or coding not in accepted_encodings(request.headers.get("Accept-Encoding"))):
            # A body we must rewrite and hash, or one the browser did not ask for: never pass it on.
            return problem(502, "Gateway unavailable", "The gateway answered in an encoding that cannot be served.")
        rewrite = document and self.upstream_base.rstrip("/") not in ("", gpath.prefix)
        buffered = b""
        complete = False
        if document:
            limit = self.config.max_rewritten_html_bytes
            chunks: list[bytes] = []
            size = 0
            try:
                while size <= limit:
                    chunk = await upstream.readany()
                    if not chunk:
                        complete = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            except (aiohttp.ClientError, OSError):
                return problem(502, "Gateway unavailable", "The gateway's answer was cut short.")
            buffered = b"".join(chunks)
            self._outbound(request, target, len(buffered))
            if not complete:
                return problem(502, "Gateway unavailable", "The Control UI document is too large.")
        location = upstream.headers.get("Location")
        mapped = None
        if location is not None:
            mapped = rewrite_location(location, upstream_base=self.upstream_base, upstream_origin=target.base_url,
                                      prefix=gpath.prefix, request_path=gpath.upstream(self.upstream_base))
            if mapped is None and 300 <= upstream.status < 400:
                return problem(502, "Gateway unavailable", "The gateway redirected outside its Control UI.")
        if document:
            charset = upstream.charset or "utf-8"
            try:
                text = buffered.decode(charset)
            except (UnicodeDecodeError, LookupError):
                return problem(502, "Gateway unavailable", "The Control UI document is not readable text.")
            if self.assets is not None and upstream.status == 200:
                self.assets.saw_document(target.vps_id, text)
            if rewrite:
                text = rewrite_html(text, self.upstream_base, gpath.prefix)
            headers = response_headers(upstream.headers, csp=document_csp(text), drop_length=True)
            if mapped is not None:
                headers = CIMultiDict(headers)  # the filtered fields are shared (read-only)
                headers["Location"] = mapped
            return _whole(request, upstream.status, upstream.reason, headers, text.encode(charset), small=False)
        script = "javascript" in ctype or "ecmascript" in ctype
        headers = response_headers(upstream.headers, csp=SCRIPT_CSP if script else RESOURCE_CSP,
                                   memo=upstream.small_head)
        if mapped is not None:
            headers = CIMultiDict(headers)  # the filtered fields are shared (read-only)
            headers["Location"] = mapped
        coding = None
        if cache_name is not None and self.assets is not None:
            coding = self.assets.cacheable(upstream.status, upstream.headers, upstream.content_length)
        if coding is not None or (upstream.content_length is not None and upstream.content_length <= _SMALL_BODY):
            try:
                body = upstream.whole()  # small and of known size: one write instead of three
                if body is None:  # not all here yet
                    body = await upstream.read()
            except (aiohttp.ClientError, OSError):
                return problem(502, "Gateway unavailable", "The gateway's answer was cut short.")
            self._outbound(request, target, len(body))
            if coding is not None and self.assets is not None and len(body) == upstream.content_length:
                self.assets.store(target.user_id, target.vps_id, str(cache_name), coding, body,
                                  upstream.headers.get("Content-Type", "application/octet-stream"))
            return _whole(request, upstream.status, upstream.reason, headers, body, small=upstream.small_head)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        fast = isinstance(request, FastRequest)  # served below aiohttp (proxy.http_fast): it writes
        writer: FastRequest | web.StreamResponse = request if fast else out
        try:
            if fast:
                await request.start_stream(out)
            else:
                await out.prepare(request)
            async for chunk in upstream.iter_any():
                self._outbound(request, target, len(chunk))
                await writer.write(chunk)
            await writer.write_eof()
        except (aiohttp.ClientError, ConnectionError, OSError):
            # Either side went away mid-body; the status is already sent, so just stop.
            if request.transport is not None:
                request.transport.close()
        return out


def _whole(request: web.Request, status: int, reason: str, headers: CIMultiDict[str] | CIMultiDictProxy[str],
           body: bytes, *, small: bool
           ) -> web.StreamResponse | FastResponse:
    """A whole answer: the light `FastResponse` for the fast front (it writes the head itself),
    else the `web.Response` aiohttp writes."""
    if isinstance(request, FastRequest):
        return FastResponse(status, reason, headers, body, small=small)
    return web.Response(status=status, reason=reason, body=body, headers=headers)


def _same_origin(origin: str, host: str | None) -> bool:
    parts = urlsplit(origin)
    return bool(host) and parts.scheme in ("http", "https") and parts.netloc.lower() == (host or "").lower()
