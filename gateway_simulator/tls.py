"""`gateway.tls` for the simulator: the real gateway's listener options (2026.9.x) in miniature.

`enabled` turns the listener into HTTPS/WSS (TLS 1.3, like the real one); `certPath`/`keyPath`
default to `<state>/gateway/tls/gateway-{cert,key}.pem` and a leading `~` is the gateway's HOME;
with `autoGenerate` (default true) a missing pair is generated, otherwise startup fails.
Certificates are made with `cryptography` (the real VM's bootstrap script uses `openssl`).
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TlsError", "cert_sha256", "make_self_signed", "server_context"]


class TlsError(Exception):
    """The TLS material is missing or unusable: the gateway does not start."""


def make_self_signed(cert_path: Path, key_path: Path, common_name: str = "openclaw-gateway") -> str:
    """Write a P-256 key (0600) and a self-signed certificate; return the certificate's SHA-256 hex."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def cert_sha256(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _path(value: Any, default: Path, home: str | None) -> Path:
    text = value.strip() if isinstance(value, str) and value.strip() else str(default)
    if text.startswith("~") and home:
        text = home + text[1:]
    return Path(text).expanduser()


def server_context(tls: Mapping[str, Any] | None, state_dir: Path, env: Mapping[str, str]
                   ) -> tuple[ssl.SSLContext, str] | None:
    """(server context, certificate SHA-256) when `gateway.tls.enabled`, else None."""
    if not isinstance(tls, Mapping) or tls.get("enabled") is not True:
        return None
    base = state_dir / "gateway" / "tls"
    cert = _path(tls.get("certPath"), base / "gateway-cert.pem", env.get("HOME"))
    key = _path(tls.get("keyPath"), base / "gateway-key.pem", env.get("HOME"))
    if not cert.exists() and not key.exists() and tls.get("autoGenerate") is not False:
        make_self_signed(cert, key)
    if not cert.exists() or not key.exists():
        raise TlsError("gateway tls: cert/key missing")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"gateway tls: failed to load cert ({exc})") from None
    return ctx, cert_sha256(cert)
