"""Ed25519 device identity and the v3 connect signature (openclaw.device)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization

from openclaw.device import (
    DEVICE_AUTH_DEVICE_ID_MISMATCH,
    DEVICE_AUTH_NONCE_MISMATCH,
    DEVICE_AUTH_NONCE_REQUIRED,
    DEVICE_AUTH_SIGNATURE_EXPIRED,
    DEVICE_AUTH_SIGNATURE_INVALID,
    DeviceIdentity,
    DeviceProofError,
    b64url_decode,
    b64url_encode,
    build_v2_payload,
    build_v3_payload,
    decode_public_key,
    normalize_device_metadata,
    signature_token,
    verify_device_proof,
)

SCOPES = ["operator.admin", "operator.read"]
NOW = 1_796_007_081_191


def _proof(identity: DeviceIdentity, **over: object) -> dict[str, object]:
    args: dict[str, object] = {
        "nonce": "n-1",
        "signed_at_ms": NOW,
        "client_id": "gateway-client",
        "client_mode": "backend",
        "role": "operator",
        "scopes": SCOPES,
        "token": "tok",
        "platform": "Linux",
        "device_family": None,
    }
    args.update(over)
    return identity.connect_proof(**args)  # type: ignore[arg-type]


def _verify(device: dict[str, object], **over: object) -> bytes:
    args: dict[str, object] = {
        "expected_nonce": "n-1",
        "client_id": "gateway-client",
        "client_mode": "backend",
        "role": "operator",
        "scopes": SCOPES,
        "token": "tok",
        "platform": "linux",
        "device_family": None,
        "now_ms": NOW + 1000,
    }
    args.update(over)
    return verify_device_proof(device, **args)  # type: ignore[arg-type]


def test_v3_payload_is_exactly_the_documented_string() -> None:
    payload = build_v3_payload(
        device_id="abc",
        client_id="gateway-client",
        client_mode="backend",
        role="operator",
        scopes=["operator.admin", "operator.read"],
        signed_at_ms=1796007081191,
        token="secret",
        nonce="30358204-9710",
        platform="  Linux ",
        device_family="MacBookPro",
    )
    assert payload == (
        "v3|abc|gateway-client|backend|operator|operator.admin,operator.read|1796007081191|secret|30358204-9710|linux|macbookpro"
    )
    assert (
        build_v2_payload(
            device_id="abc",
            client_id="cli",
            client_mode="cli",
            role="operator",
            scopes=[],
            signed_at_ms=5,
            token="",
            nonce="n",
        )
        == "v2|abc|cli|cli|operator||5||n"
    )


def test_metadata_normalisation_lowercases_ascii_only() -> None:
    assert normalize_device_metadata(" ÄBC Linux ") == "Äbc linux"
    assert normalize_device_metadata(None) == ""


def test_signature_token_precedence_never_signs_a_password() -> None:
    assert signature_token({"token": "a", "deviceToken": "b"}) == "a"
    assert signature_token({"deviceToken": "b", "bootstrapToken": "c"}) == "b"
    assert signature_token({"bootstrapToken": "c", "password": "p"}) == "c"
    assert signature_token({"password": "p"}) == ""
    assert signature_token(None) == ""


def test_identity_ids_and_serialisation_round_trip() -> None:
    identity = DeviceIdentity.generate()
    raw_pub = identity.public_key_raw
    assert len(raw_pub) == 32
    assert identity.device_id == hashlib.sha256(raw_pub).hexdigest()
    assert "=" not in identity.public_key_b64url
    assert b64url_decode(identity.public_key_b64url) == raw_pub
    assert DeviceIdentity.from_private_bytes(identity.private_bytes()).device_id == identity.device_id
    assert DeviceIdentity.from_pem(identity.private_pem()).device_id == identity.device_id
    assert DeviceIdentity.from_pem(identity.private_pem(b"pw"), password=b"pw").device_id == identity.device_id
    pem = identity.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert decode_public_key(pem.decode()) == raw_pub
    assert identity.device_id[:12] in repr(identity) and "private" not in repr(identity).lower()


def test_proof_verifies_and_returns_the_raw_key() -> None:
    identity = DeviceIdentity.generate()
    device = _proof(identity)
    assert device["id"] == identity.device_id
    assert device["signedAt"] == NOW and device["nonce"] == "n-1"
    assert _verify(device) == identity.public_key_raw


def test_v2_signatures_are_still_accepted() -> None:
    identity = DeviceIdentity.generate()
    payload = build_v2_payload(
        device_id=identity.device_id,
        client_id="gateway-client",
        client_mode="backend",
        role="operator",
        scopes=SCOPES,
        signed_at_ms=NOW,
        token="tok",
        nonce="n-1",
    )
    device = {
        "id": identity.device_id,
        "publicKey": identity.public_key_b64url,
        "signature": identity.sign(payload),
        "signedAt": NOW,
        "nonce": "n-1",
    }
    assert _verify(device) == identity.public_key_raw


@pytest.mark.parametrize(
    ("mutate", "verify_over", "code"),
    [
        (lambda d: d.update(id="0" * 64), {}, DEVICE_AUTH_DEVICE_ID_MISMATCH),
        (lambda d: d.update(publicKey="not-a-key"), {}, DEVICE_AUTH_DEVICE_ID_MISMATCH),
        (lambda d: None, {"now_ms": NOW + 121_000}, DEVICE_AUTH_SIGNATURE_EXPIRED),
        (lambda d: d.update(nonce=""), {}, DEVICE_AUTH_NONCE_REQUIRED),
        (lambda d: None, {"expected_nonce": "other"}, DEVICE_AUTH_NONCE_MISMATCH),
        (lambda d: None, {"token": "different"}, DEVICE_AUTH_SIGNATURE_INVALID),
        (lambda d: None, {"scopes": list(reversed(SCOPES))}, DEVICE_AUTH_SIGNATURE_INVALID),
        (lambda d: None, {"platform": "darwin"}, DEVICE_AUTH_SIGNATURE_INVALID),
        (lambda d: d.update(signature=b64url_encode(b"x" * 64)), {}, DEVICE_AUTH_SIGNATURE_INVALID),
    ],
)
def test_bad_proofs_fail_with_the_gateway_codes(mutate, verify_over, code) -> None:
    device = _proof(DeviceIdentity.generate())
    mutate(device)
    with pytest.raises(DeviceProofError) as info:
        _verify(device, **verify_over)
    assert info.value.code == code
