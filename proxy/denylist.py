"""Control-plane addresses the forward proxy must never connect to.

The agents' VMs let the control plane's addresses reach their gateway port (Hetzner firewall), and
the forward proxy connects *from* the control plane, so without this list one agent could reach
another agent's gateway through us. Static entries come from the settings (CONTROL_PLANE_IPS and
the hosts of the database, Temporal and the public API URL); VM addresses are re-read from
`vpses` every `refresh_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from db.models import Vps, VpsState
from proxy.egress import IPAddress
from settings import Settings

__all__ = ["VmAddressDenylist", "control_plane_networks", "control_plane_hosts"]

log = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def control_plane_networks(settings: Settings) -> list[Network]:
    out: list[Network] = []
    for item in settings.control_plane_ips:
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_network(item, strict=False))
    return out


def control_plane_hosts(settings: Settings) -> list[str]:
    """Host names of our own services (resolved once at start by the caller)."""
    hosts = [urlsplit(settings.control_plane_public_url).hostname]
    if settings.database_url:
        hosts.append(urlsplit(settings.database_url).hostname)
    if settings.temporal_address:
        hosts.append(settings.temporal_address.rpartition(":")[0].strip("[]"))
    return [h for h in hosts if h]


class VmAddressDenylist:
    def __init__(self, engine: AsyncEngine, refresh_s: float = 30.0) -> None:
        self._engine = engine
        self._refresh_s = refresh_s
        self._addresses: frozenset[IPAddress] = frozenset()
        self._task: asyncio.Task[None] | None = None

    def addresses(self) -> frozenset[IPAddress]:
        return self._addresses

    async def refresh(self) -> None:
        stmt = select(Vps.host).where(Vps.host.is_not(None), Vps.state != VpsState.destroyed)  # type: ignore[union-attr]
        async with self._engine.connect() as conn:
            hosts = (await conn.execute(stmt)).scalars().all()
        found: set[IPAddress] = set()
        for host in hosts:
            with contextlib.suppress(ValueError):
                found.add(ipaddress.ip_address(str(host).strip("[]")))
        self._addresses = frozenset(found)

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.warning("could not refresh the VM address denylist", exc_info=True)
            await asyncio.sleep(self._refresh_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="vm-denylist")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
