"""HTTP readiness probes for a gateway (reference §3.1).

`/readyz` turns 200 only when startup is done and configured channels are healthy; a booting VM
answers connection refused, then 503, then 200. Polling it is how activities wait for a gateway
before opening the RPC socket.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["GatewayNotReadyError", "ProbeResult", "probe", "wait_ready"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    status: int | None  # None: no HTTP answer at all (refused, reset, timeout)
    body: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


class GatewayNotReadyError(TimeoutError):
    """The gateway did not become ready in time; `last` is the final probe answer."""

    def __init__(self, url: str, timeout: float, last: ProbeResult) -> None:
        detail = f"HTTP {last.status}" if last.status is not None else (last.error or "no answer")
        super().__init__(f"{url} not ready after {timeout:g}s ({detail})")
        self.url = url
        self.last = last


async def probe(
    base_http_url: str,
    path: str = "/readyz",
    *,
    client: httpx.AsyncClient | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> ProbeResult:
    """One GET; never raises for network errors (they are part of a normal boot)."""
    url = base_http_url.rstrip("/") + path
    owned = client is None
    http = client or httpx.AsyncClient(timeout=timeout)
    try:
        response = await http.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return ProbeResult(None, error=type(exc).__name__)
    finally:
        if owned:
            await http.aclose()
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return ProbeResult(response.status_code, body)


async def wait_ready(
    base_http_url: str,
    timeout: float,  # noqa: ASYNC109
    *,
    path: str = "/readyz",
    interval: float = 0.25,
    max_interval: float = 2.0,
    client: httpx.AsyncClient | None = None,
) -> dict[str, Any]:
    """Poll until `path` answers 200 and return its JSON body; raise GatewayNotReadyError on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    owned = client is None
    http = client or httpx.AsyncClient()
    delay = interval
    last = ProbeResult(None, error="not probed")
    try:
        while True:
            remaining = deadline - loop.time()
            last = await probe(base_http_url, path, client=http, timeout=max(0.1, min(5.0, remaining)))
            if last.ok:
                return last.body if isinstance(last.body, dict) else {"body": last.body}
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GatewayNotReadyError(base_http_url + path, timeout, last)
            log.debug("gateway not ready yet (%s)", last.status or last.error)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, max_interval)
    finally:
        if owned:
            await http.aclose()
