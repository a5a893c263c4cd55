"""Where an agent may connect through the forward proxy: public addresses only (SSRF guard).

The decision is made on addresses, after resolution, and the connection then goes to the very
address that was checked (never a second lookup), so a name that resolves to a public address
for the check and a private one for the connect (DNS rebinding) cannot slip through. A name
that resolves to several addresses is refused if any of them is forbidden.

Forbidden: loopback, private and unique-local, link-local (169.254.169.254 cloud metadata,
fe80::/10), multicast, unspecified, reserved and every other non-global range (100.64/10,
documentation, benchmarking), IPv6 forms that embed such an IPv4 address (mapped, compatible,
6to4, Teredo, NAT64), and the control plane's own addresses (settings plus the agents' VM
addresses, which trust the control plane's egress IP on their gateway port). Host spellings
that browsers and libc read as IPv4 (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`) are decoded
the same way here and checked, and are never sent to DNS.

Ports: only `allowed_ports` (production: FORWARD_PROXY_ALLOWED_PORTS, default 80 and 443, which
covers the LLM APIs and every channel transport: Telegram's Bot API, WhatsApp Web, Discord, Slack
and Signal all speak HTTPS/WSS on 443). Anything else (SMTP 25 first of all: a VM must not
become a spam relay) is refused before any lookup.

The resolver is injectable: tests pass a stub (a public-looking name that resolves to a private
address), and `allowed_targets` admits exact (address, port) pairs, port included, so a test can
reach a loopback upstream on purpose; production passes neither.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

__all__ = [
    "EgressPolicy",
    "EgressRefused",
    "DEFAULT_ALLOWED_PORTS",
    "EgressTarget",
    "IPAddress",
    "Resolver",
    "forbidden_reason",
    "parse_host",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Awaitable[list[str]]]

_NAME_RE = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                      r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")
_LOCAL_NAMES = ("localhost",)
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
DEFAULT_ALLOWED_PORTS: frozenset[int] = frozenset({80, 443})


class EgressRefused(Exception):
    """The target is not allowed; `reason` is safe to show the agent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EgressTarget:
    host: str
    ip: IPAddress
    port: int


async def system_resolver(host: str) -> list[str]:
    """A and AAAA answers through the system resolver, in its order, without duplicates."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in seen:
            seen.append(addr)
    return seen


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """WHATWG/inet_aton: a host whose last label is numeric is an IPv4 address (or invalid)."""
    labels = host.split(".")
    if labels and labels[-1] == "":
        labels = labels[:-1]
    if not labels or not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    if not all(_NUMERIC_LABEL.fullmatch(label) for label in labels) or len(labels) > 4:
        raise EgressRefused("malformed IP address")
    try:
        return ipaddress.IPv4Address(socket.inet_aton(".".join(labels)))
    except OSError:
        raise EgressRefused("malformed IP address") from None


def parse_host(host: str) -> str | IPAddress:
    """A literal address, or a normalised DNS name to resolve. Raises EgressRefused."""
    value = host.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
        if "%" in value:
            raise EgressRefused("scoped IPv6 addresses are not allowed")
        try:
            return ipaddress.IPv6Address(value)
        except ValueError:
            raise EgressRefused("malformed IPv6 address") from None
    if "%" in value:
        raise EgressRefused("malformed host")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        pass
    legacy = _legacy_ipv4(value)
    if legacy is not None:
        return legacy
    name = value.rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise EgressRefused("malformed host name") from None
    if not _NAME_RE.fullmatch(name):
        raise EgressRefused("malformed host name")
    if name in _LOCAL_NAMES or name.endswith(_LOCAL_SUFFIXES):
        raise EgressRefused(f"{name} is a local name")
    return name


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    out: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    packed = ip.packed
    if ip in _NAT64 or (packed[:12] == bytes(12) and int(ip) > 1):  # NAT64, deprecated IPv4-compatible
        out.append(ipaddress.IPv4Address(packed[12:]))
    return out


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why this address is not a public destination, or None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "a local NAT64 address"
        for inner in _embedded_ipv4(ip):
            reason = forbidden_reason(inner)
            if reason is not None:
                return f"{reason} (embedded in an IPv6 address)"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (e.g. cloud metadata)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified or ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


class EgressPolicy:
    def __init__(self, resolver: Resolver = system_resolver, *,
                 denied: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
                 denied_dynamic: Callable[[], Collection[IPAddress]] | None = None,
                 allowed_targets: Iterable[tuple[str, int]] = (), resolve_timeout_s: float = 5.0,
                 allowed_ports: Collection[int] = DEFAULT_ALLOWED_PORTS) -> None:
        self._resolver = resolver
        self._ports = frozenset(int(p) for p in allowed_ports)
        self._denied = [ipaddress.ip_network(d, strict=False) if isinstance(d, str) else d for d in denied]
        self._denied_dynamic = denied_dynamic
        self._allowed = {(ipaddress.ip_address(ip), int(port)) for ip, port in allowed_targets}
        self._timeout = resolve_timeout_s

    def check_address(self, ip: IPAddress, port: int) -> None:
        if (ip, port) in self._allowed:
            return
        self._check_port(port)
        if any(ip in net for net in self._denied if net.version == ip.version):
            raise EgressRefused("the destination is a control-plane address")
        if self._denied_dynamic is not None and ip in self._denied_dynamic():
            raise EgressRefused("the destination is a control-plane address")
        reason = forbidden_reason(ip)
        if reason is not None:
            raise EgressRefused(f"the destination is {reason}")

    def _check_port(self, port: int) -> None:
        if port not in self._ports:
            allowed = ", ".join(str(p) for p in sorted(self._ports)) or "none"
            raise EgressRefused(f"port {port} is not allowed (allowed ports: {allowed})")

    async def check(self, host: str, port: int) -> EgressTarget:
        """Resolve and check; the caller must connect to `.ip`, nothing else."""
        if not 0 < port < 65536:
            raise EgressRefused("invalid port")
        if not any(port == p for _, p in self._allowed):
            self._check_port(port)  # before any lookup; exact test pairs are checked per address below
        parsed = parse_host(host)
        if not isinstance(parsed, str):
            self.check_address(parsed, port)
            return EgressTarget(host=str(parsed), ip=parsed, port=port)
        try:
            answers = await asyncio.wait_for(self._resolver(parsed), self._timeout)
        except (OSError, TimeoutError, UnicodeError):
            raise EgressRefused(f"{parsed} does not resolve") from None
        addresses: list[IPAddress] = []
        for answer in answers:
            try:
                addresses.append(ipaddress.ip_address(answer.split("%", 1)[0]))
            except ValueError:
                continue
        if not addresses:
            raise EgressRefused(f"{parsed} does not resolve")
        for ip in addresses:
            self.check_address(ip, port)
        return EgressTarget(host=parsed, ip=addresses[0], port=port)
