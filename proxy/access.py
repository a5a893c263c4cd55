"""Who may reach which gateway: Auth.js session cookie -> user -> own agent -> running VPS.

One query answers all three questions (session valid and unexpired, agent owned by that user,
the agent's VPS and its state), so a request costs one database round trip, and a short cache
(`auth_cache_ttl_s`, and never past the session's expiry) absorbs the burst of asset requests a
page load makes. Another user's agent and a non-existent one look the same (404). A VPS that
is not running gets a 409 saying so; nothing here ever starts a VM.

The gateway's address and, for a cloud VM, the SHA-256 of its certificate come from the VPS row
(written by the lifecycle activities); the proxy holds no provider client or provider token. An
https gateway without a pin is never contacted (503), and one presenting another certificate is
refused by the connector (`GatewayTarget.upstream_ssl`).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from db.models import Agent, AuthSession, Vps, VpsState
from proxy.preauth import token_hash
from settings import Settings

__all__ = ["SESSION_COOKIES", "AccessDenied", "AccessResolver", "GatewayTarget", "session_token"]

# Auth.js v5 names: the `__Secure-` one over https (reference Part B2); prefer it when both exist.
SESSION_COOKIES = ("__Secure-authjs.session-token", "authjs.session-token")
_MAX_TOKEN_LEN = 255  # the column's width


def session_token(cookies: Mapping[str, str]) -> str | None:
    for name in SESSION_COOKIES:
        value = cookies.get(name)
        if value:
            return value
    return None


class AccessDenied(Exception):
    """Maps to a problem+json answer; `detail` is safe to show the user."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra


@dataclass(frozen=True)
class GatewayTarget:
    """Everything needed to reach one agent's gateway. Holds secrets: never log it."""

    user_id: uuid.UUID
    agent_id: uuid.UUID
    vps_id: uuid.UUID
    base_url: str = field(repr=False)
    gateway_token: str = field(repr=False)
    relay_key_pem: str | None = field(repr=False)
    session_expires: datetime = field(repr=False)
    relay_device_token: str | None = field(default=None, repr=False)
    """The UI-relay identity's device token (relay scopes only): the Bearer on plain HTTP."""
    cert_sha256: str | None = field(default=None, repr=False)
    """The pinned certificate of an https gateway (cloud VMs); None for plain loopback http."""

    @functools.cached_property
    def user_key(self) -> str:
        """The user id's text, made once per lookup: the per-user buckets' key (a str hashes in C
        once; a `uuid.UUID` hashes in Python on every use), as the WebSocket relay keys them."""
        return str(self.user_id)

    @property
    def upstream_ssl(self) -> aiohttp.Fingerprint | bool:
        """aiohttp's `ssl=`: exactly the pinned certificate (no CA trust, no host name) when pinned."""
        return aiohttp.Fingerprint(bytes.fromhex(self.cert_sha256)) if self.cert_sha256 else True


@dataclass
class _Cached:
    value: GatewayTarget | AccessDenied
    until: float
    expires: float = 0.0
    """The session's expiry as a POSIX timestamp (compared with `time.time()`: cheaper than a datetime)."""


class AccessResolver:
    def __init__(self, engine: AsyncEngine, settings: Settings, *, ttl_s: float = 1.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._settings = settings
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._cache: OrderedDict[tuple[bytes, int], _Cached] = OrderedDict()
        """(session token hash, agent id as an int: hashed in C, unlike a `uuid.UUID`) -> answer."""
        self._inflight: dict[tuple[bytes, int], asyncio.Future[GatewayTarget | AccessDenied]] = {}

    async def resolve(self, token: str | None, agent_id: uuid.UUID, *, fresh: bool = False) -> GatewayTarget:
        """The gateway for this session and agent, or AccessDenied (401, 404, 409, 503)."""
        if not token or len(token) > _MAX_TOKEN_LEN:
            raise AccessDenied(401, "Not signed in", "Sign in to open the agent's Control UI.")
        key = (token_hash(token), agent_id.int)
        now = self._clock()
        if not fresh and self._ttl > 0:
            hit = self._cache.get(key)
            if hit is not None and hit.until > now:
                if isinstance(hit.value, AccessDenied):
                    raise hit.value
                if hit.expires > time.time():  # the session's expiry, as `session_expires > now`
                    return hit.value
        result = await self._single_flight(key, token, agent_id)
        if self._ttl > 0 and not (isinstance(result, AccessDenied) and result.status >= 500):
            expires = result.session_expires.timestamp() if isinstance(result, GatewayTarget) else 0.0
            self._cache[key] = _Cached(result, now + self._ttl, expires)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if isinstance(result, AccessDenied):
            raise result
        return result

    async def _single_flight(self, key: tuple[bytes, int], token: str, agent_id: uuid.UUID
                             ) -> GatewayTarget | AccessDenied:
        """One database lookup per key at a time: a page load's burst waits for the first one."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[GatewayTarget | AccessDenied] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            try:
                result: GatewayTarget | AccessDenied = await self._lookup(token, agent_id)
            except AccessDenied as denied:
                result = denied
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unawaited future does not warn
            raise
        finally:
            self._inflight.pop(key, None)

    async def _lookup(self, token: str, agent_id: uuid.UUID) -> GatewayTarget:
        stmt = (
            select(  # type: ignore[call-overload]
                AuthSession.user_id, AuthSession.expires, Agent.id, Agent.gateway_token, Vps.id, Vps.state,
                Vps.provider, Vps.gateway_url, Vps.gateway_cert_sha256, Vps.host, Vps.gateway_port,
                Vps.relay_device_key, Vps.relay_device_token,
            )
            .select_from(AuthSession)
            .outerjoin(Agent, and_(Agent.id == agent_id, Agent.user_id == AuthSession.user_id))
            .outerjoin(Vps, Vps.id == Agent.vps_id)
            .where(AuthSession.session_token == token, AuthSession.expires > func.now())
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise AccessDenied(401, "Not signed in", "Your session has expired or was signed out. Sign in again.")
        (user_id, expires, found_agent, gateway_token, vps_id, state, provider, gateway_url, pin, host, port,
         relay_key, relay_token) = row
        if found_agent is None:
            raise AccessDenied(404, "Not found", "No such agent.")
        if vps_id is None:
            raise AccessDenied(409, "Agent has no VM", "This agent has no VM yet. Create one from the dashboard.",
                               vps_state=None)
        if state != VpsState.running:
            raise AccessDenied(409, "VM not running",
                               f"This agent's VM is {state}. Start it from the dashboard to open its Control UI.",
                               vps_state=str(state))
        base_url = _gateway_url(str(provider), gateway_url, host, port)
        if base_url is None or (base_url.startswith("https://") and not pin):
            raise AccessDenied(503, "Gateway unreachable", "The agent's VM has no address yet; try again shortly.",
                               vps_state=str(state))
        return GatewayTarget(user_id=user_id, agent_id=found_agent, vps_id=vps_id, base_url=base_url,
                             gateway_token=str(gateway_token), relay_key_pem=relay_key, session_expires=expires,
                             relay_device_token=relay_token,
                             cert_sha256=pin if base_url.startswith("https://") else None)


def _gateway_url(provider: str, stored: str | None, host: str | None, port: int | None) -> str | None:
    """The row's URL; a local VM written before it was stored is plain loopback at host:port."""
    if stored:
        return stored.rstrip("/")
    if provider == "local" and port:
        return f"http://{host or '127.0.0.1'}:{port}"
    return None
