"""Ed25519 device identity for the OpenClaw gateway protocol v4.

The gateway authenticates a *device* (not a user) by an Ed25519 key pair: the device id is the
lowercase hex SHA-256 of the raw 32-byte public key, and each `connect` carries a signature over
the "v3" payload string, which binds the key to the challenge nonce, the client identity, the
requested scopes and the shared token (reference §1.4). The same code verifies proofs in the
gateway simulator and in our proxy, which terminates the Control UI handshake itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "DEVICE_AUTH_DEVICE_ID_MISMATCH",
    "DEVICE_AUTH_NONCE_MISMATCH",
    "DEVICE_AUTH_NONCE_REQUIRED",
    "DEVICE_AUTH_PUBLIC_KEY_INVALID",
    "DEVICE_AUTH_SIGNATURE_EXPIRED",
    "DEVICE_AUTH_SIGNATURE_INVALID",
    "MAX_SIGNATURE_SKEW_MS",
    "DeviceIdentity",
    "DeviceProofError",
    "b64url_decode",
    "b64url_encode",
    "build_v2_payload",
    "build_v3_payload",
    "decode_public_key",
    "device_id_for_public_key",
    "normalize_device_metadata",
    "signature_token",
    "verify_device_proof",
]

# `error.details.code` values the gateway uses for a bad device proof (all INVALID_REQUEST, close 1008).
DEVICE_AUTH_NONCE_REQUIRED = "DEVICE_AUTH_NONCE_REQUIRED"
DEVICE_AUTH_NONCE_MISMATCH = "DEVICE_AUTH_NONCE_MISMATCH"
DEVICE_AUTH_SIGNATURE_INVALID = "DEVICE_AUTH_SIGNATURE_INVALID"
DEVICE_AUTH_SIGNATURE_EXPIRED = "DEVICE_AUTH_SIGNATURE_EXPIRED"
DEVICE_AUTH_DEVICE_ID_MISMATCH = "DEVICE_AUTH_DEVICE_ID_MISMATCH"
DEVICE_AUTH_PUBLIC_KEY_INVALID = "DEVICE_AUTH_PUBLIC_KEY_INVALID"

# The gateway rejects |now - signedAt| above this.
MAX_SIGNATURE_SKEW_MS = 120_000

_ASCII_UPPER_TO_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def b64url_encode(data: bytes) -> str:
    """base64url without padding, as the gateway writes keys and signatures."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Accepts padded or unpadded base64url; raises ValueError on garbage."""
    stripped = text.strip()
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def device_id_for_public_key(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()


def normalize_device_metadata(value: str | None) -> str:
    """Trim and lower-case ASCII A-Z only, the way the gateway normalises platform/deviceFamily."""
    if value is None:
        return ""
    return value.strip().translate(_ASCII_UPPER_TO_LOWER)


def signature_token(auth: Mapping[str, Any] | None) -> str:
    """The secret the v3 payload signs: token ?? deviceToken ?? bootstrapToken ?? "" (never a password)."""
    if not auth:
        return ""
    for key in ("token", "deviceToken", "bootstrapToken"):
        value = auth.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def build_v3_payload(
    *,
    device_id: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    signed_at_ms: int,
    token: str,
    nonce: str,
    platform: str | None,
    device_family: str | None,
) -> str:
    """`v3|deviceId|client.id|client.mode|role|scopes|signedAtMs|token|nonce|platform|deviceFamily`."""
    return "|".join(
        [
            "v3",
            device_id,
            client_id,
            client_mode,
            role,
            ",".join(scopes),
            str(int(signed_at_ms)),
            token,
            nonce,
            normalize_device_metadata(platform),
            normalize_device_metadata(device_family),
        ]
    )


def build_v2_payload(
    *,
    device_id: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    signed_at_ms: int,
    token: str,
    nonce: str,
) -> str:
    """The older payload the gateway still accepts: v3 without platform/deviceFamily."""
    return "|".join(
        ["v2", device_id, client_id, client_mode, role, ",".join(scopes), str(int(signed_at_ms)), token, nonce]
    )


def decode_public_key(value: str) -> bytes:
    """Raw 32-byte key from base64url (the usual form) or PEM (also accepted by the gateway)."""
    text = value.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError) as exc:
            raise ValueError("invalid PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("PEM public key is not Ed25519")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = b64url_decode(text)
    if len(raw) != 32:
        raise ValueError("Ed25519 public key must be 32 bytes")
    return raw


@dataclass(frozen=True, eq=False)
class DeviceIdentity:
    """One persistent key pair; the control plane keeps it encrypted and reuses it across connects."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> DeviceIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> DeviceIdentity:
        """From the 32-byte raw seed returned by `private_bytes()`."""
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_pem(cls, pem: bytes | str, password: bytes | None = None) -> DeviceIdentity:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = serialization.load_pem_private_key(data, password=password)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("PEM private key is not Ed25519")
        return cls(key)

    def private_bytes(self) -> bytes:
        """The raw 32-byte seed: the compact form to encrypt and store."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def private_pem(self, password: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    @property
    def public_key_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_key_b64url(self) -> str:
        return b64url_encode(self.public_key_raw)

    @property
    def device_id(self) -> str:
        return device_id_for_public_key(self.public_key_raw)

    def sign(self, payload: str) -> str:
        return b64url_encode(self.private_key.sign(payload.encode("utf-8")))

    def connect_proof(
        self,
        *,
        nonce: str,
        signed_at_ms: int,
        client_id: str,
        client_mode: str,
        role: str,
        scopes: Sequence[str],
        token: str,
        platform: str | None,
        device_family: str | None = None,
    ) -> dict[str, Any]:
        """The `connect.params.device` block, signed over the v3 payload.

        `signed_at_ms` should be the challenge `ts` and `token` what `signature_token(auth)` gives.
        """
        payload = build_v3_payload(
            device_id=self.device_id,
            client_id=client_id,
            client_mode=client_mode,
            role=role,
            scopes=scopes,
            signed_at_ms=signed_at_ms,
            token=token,
            nonce=nonce,
            platform=platform,
            device_family=device_family,
        )
        return {
            "id": self.device_id,
            "publicKey": self.public_key_b64url,
            "signature": self.sign(payload),
            "signedAt": int(signed_at_ms),
            "nonce": nonce,
        }

    def __repr__(self) -> str:  # never print key material
        return f"DeviceIdentity(device_id={self.device_id[:12]}…)"


class DeviceProofError(ValueError):
    """A device block failed verification.

    `code` is the gateway's `error.details.code`, `reason` its `error.details.reason`; `message` is the
    gateway's error message (also the close reason).
    """

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def _derive_device_id(public_key: object) -> tuple[str, bytes] | None:
    if not isinstance(public_key, str):
        return None
    try:
        raw = decode_public_key(public_key)
    except ValueError:
        return None
    return device_id_for_public_key(raw), raw


def verify_device_proof(
    device: Mapping[str, Any],
    *,
    expected_nonce: str,
    client_id: str,
    client_mode: str,
    role: str,
    scopes: Sequence[str],
    token: str,
    platform: str | None,
    device_family: str | None,
    now_ms: int | None = None,
    max_skew_ms: int = MAX_SIGNATURE_SKEW_MS,
) -> bytes:
    """Check a `connect.params.device` block in the gateway's order; return the raw public key.

    The order (id, freshness, nonce, signature) matters because clients see only the first failure.
    `token` is `signature_token(connect.params.auth)`; scopes must be in the order the client sent.
    Raises `DeviceProofError` with one of the DEVICE_AUTH_* codes.
    """
    derived = _derive_device_id(device.get("publicKey"))
    if derived is None or derived[0] != device.get("id"):
        raise DeviceProofError(DEVICE_AUTH_DEVICE_ID_MISMATCH, "device-id-mismatch", "device identity mismatch")
    device_id, raw = derived
    signed_at = device.get("signedAt")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if isinstance(signed_at, bool) or not isinstance(signed_at, int | float) or abs(now - int(signed_at)) > max_skew_ms:
        raise DeviceProofError(DEVICE_AUTH_SIGNATURE_EXPIRED, "device-signature-stale", "device signature expired")
    nonce_value = device.get("nonce")
    nonce = nonce_value.strip() if isinstance(nonce_value, str) else ""
    if not nonce:
        raise DeviceProofError(DEVICE_AUTH_NONCE_REQUIRED, "device-nonce-missing", "device nonce required")
    if nonce != expected_nonce:
        raise DeviceProofError(DEVICE_AUTH_NONCE_MISMATCH, "device-nonce-mismatch", "device nonce mismatch")
    signature = device.get("signature")
    try:
        sig = b64url_decode(signature) if isinstance(signature, str) else b""
    except ValueError:
        sig = b""
    common = {
        "device_id": device_id,
        "client_id": client_id,
        "client_mode": client_mode,
        "role": role,
        "scopes": scopes,
        "signed_at_ms": int(signed_at),
        "token": token,
        "nonce": nonce,
    }
    candidates = (
        build_v3_payload(**common, platform=platform, device_family=device_family),
        build_v2_payload(**common),
    )
    verifier = Ed25519PublicKey.from_public_bytes(raw)
    for payload in candidates:
        try:
            verifier.verify(sig, payload.encode("utf-8"))
            return raw
        except InvalidSignature:
            continue
    raise DeviceProofError(DEVICE_AUTH_SIGNATURE_INVALID, "device-signature", "device signature invalid")
