"""Certificate pinning for the control plane's connections to cloud VMs.

A cloud VM makes its own key and self-signed certificate at first boot (the bootstrap script, with
`openssl`) and reports the certificate's SHA-256 with `/bootstrap/ready`, authenticated by the
single-use bootstrap token. From then on every connection to that gateway (RPC over `wss://`, the
`/readyz` poll, the proxy's `https://` upstream) trusts exactly that certificate: no CA store, no
host name check, anything else is refused before a credential is sent.

Python's `ssl` has no verification callback, so the context below completes the handshake without
verifying the chain and `check_peer` compares the peer's DER certificate right after it, before
the first byte of application data carrying a secret. aiohttp callers use `aiohttp.Fingerprint`,
which does the same inside the connector.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
from typing import Any

__all__ = ["CertificatePinError", "check_peer", "fingerprint", "normalize_fingerprint", "pinned_context"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


class CertificatePinError(Exception):
    """The peer presented a certificate other than the pinned one (or none at all)."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lower-case hex without separators (the stored form)."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(value: str) -> str:
    """Accept `openssl x509 -fingerprint -sha256` output (`AB:CD:...`, with or without the
    `sha256 Fingerprint=` prefix) or plain hex; return 64 lower-case hex digits or raise ValueError."""
    text = value.strip()
    if "=" in text:
        text = text.split("=", 1)[1]
    text = text.replace(":", "").strip().lower()
    if not _HEX64.fullmatch(text):
        raise ValueError("not a SHA-256 certificate fingerprint")
    return text


def pinned_context() -> ssl.SSLContext:
    """A client context for a pinned peer: TLS 1.2+, no CA trust and no host name check (the pin
    replaces both); callers must run `check_peer` on every connection made with it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_peer(ssl_object: Any, expected: str) -> None:
    """Raise CertificatePinError unless the connection's peer certificate has the pinned SHA-256."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise CertificatePinError("the gateway presented no TLS certificate")
    if not hmac.compare_digest(fingerprint(der), normalize_fingerprint(expected)):
        raise CertificatePinError("the gateway presented a certificate that does not match its pin")
