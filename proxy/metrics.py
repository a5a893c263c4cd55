"""The proxy's Prometheus series, hooked in from outside the relay code.

`CountingMeter` counts relayed bytes where the byte meter already sees every chunk and frame;
`instrument_gateway()` / `instrument_forward()` swap the per-user limiters for counting subclasses
(refusals, and connections held open against a limit). Nothing in the relay code changes.

`/metrics` is served on its own listener (`PROXY_METRICS_PORT`, on `METRICS_HOST`), never by the
user-facing gateway or forward listeners: no browser or agent reaches it through them.

One process, one registry: when several proxy processes run on one host, give each its own
PROXY_METRICS_PORT and scrape each (see telemetry/metrics.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from datetime import date

from proxy.forward import ForwardProxy
from proxy.gateway import GatewayProxy
from proxy.limits import ConnectionLimiter, TokenBucket
from proxy.metering import Meter
from telemetry.metrics import PROXY_BYTES_RELAYED, PROXY_CONNECTIONS_OPEN, PROXY_LIMIT_REFUSALS

__all__ = ["CountingMeter", "instrument_forward", "instrument_gateway"]

_INBOUND = PROXY_BYTES_RELAYED.labels(direction="inbound")
_OUTBOUND = PROXY_BYTES_RELAYED.labels(direction="outbound")


class CountingMeter(Meter):
    """The byte meter, also adding every metered byte to `slopbox_proxy_bytes_relayed_total`."""

    def add(self, vps_id: uuid.UUID, *, inbound: int = 0, outbound: int = 0) -> None:
        super().add(vps_id, inbound=inbound, outbound=outbound)
        if inbound:
            _INBOUND.inc(inbound)
        if outbound:
            _OUTBOUND.inc(outbound)

    def _drained(self, key: tuple[uuid.UUID, date], inbound: int, outbound: int) -> None:
        super()._drained(key, inbound, outbound)
        if inbound:
            _INBOUND.inc(inbound)
        if outbound:
            _OUTBOUND.inc(outbound)


class CountingRateLimiter:
    """Wraps an in-memory or shared bucket (`TokenBucket`); counts refusals."""

    def __init__(self, inner: TokenBucket, limit: str) -> None:
        self.inner = inner
        self.rate = inner.rate
        self.burst = inner.burst
        self._refused = PROXY_LIMIT_REFUSALS.labels(limit=limit)

    def acquire_now(self, key: Hashable, cost: float = 1.0) -> float | None:
        wait = self.inner.acquire_now(key, cost)
        if wait is not None and wait > 0:
            self._refused.inc()
        return wait

    async def take(self, key: Hashable, cost: float = 1.0) -> float:
        wait = await self.inner.take(key, cost)
        if wait > 0:
            self._refused.inc()
        return wait


class CountingConnectionLimiter(ConnectionLimiter):
    def __init__(self, original: ConnectionLimiter, limit: str, kind: str) -> None:
        super().__init__(original.limit)
        self._refused = PROXY_LIMIT_REFUSALS.labels(limit=limit)
        self._gauge = PROXY_CONNECTIONS_OPEN.labels(kind=kind)

    def try_acquire(self, key: Hashable) -> bool:
        if super().try_acquire(key):
            self._gauge.inc()
            return True
        self._refused.inc()
        return False

    def release(self, key: Hashable) -> None:
        if self.open_count(key) > 0:
            self._gauge.dec()
        super().release(key)


def instrument_gateway(gateway: GatewayProxy) -> None:
    """Swap in counting limiters before the listener takes connections (they hold no state yet)."""
    gateway.http_limiter = CountingRateLimiter(gateway.http_limiter, "gateway_http_rate")
    gateway.frame_limiter = CountingRateLimiter(gateway.frame_limiter, "gateway_ws_frame_rate")
    gateway.ws_connections = CountingConnectionLimiter(gateway.ws_connections, "gateway_ws_connections", "gateway_ws")


def instrument_forward(forward: ForwardProxy) -> None:
    forward.rate = CountingRateLimiter(forward.rate, "forward_rate")
    forward.connections = CountingConnectionLimiter(forward.connections, "forward_connections", "forward")
