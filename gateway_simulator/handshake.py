"""The `connect` request: admission, shared auth, device proof, pairing, hello-ok.

Order and messages follow src/gateway/server/ws-connection/connect-*.ts of openclaw 2026.9.6:
startup gate -> protocol -> role -> origin -> missing-device policy -> device proof -> credential
decision -> pairing -> hello-ok. Clients only ever see the first failure, so the order matters.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway_simulator.server import Connection, _is_loopback, error_shape, scope_satisfied
from openclaw.device import DeviceProofError, normalize_device_metadata, signature_token, verify_device_proof

if TYPE_CHECKING:
    from gateway_simulator.server import GatewaySimulator

CONTROL_UI_IDS = frozenset({"openclaw-control-ui", "webchat-ui", "webchat"})
_ORIGIN_MESSAGE = (
    "origin not allowed (open the Control UI from the gateway host or allow it in gateway.controlUi.allowedOrigins)"
)
_AUTH_MESSAGES = {
    "token_missing": (
        "AUTH_TOKEN_MISSING",
        "unauthorized: gateway token missing ({hint})",
        "update_auth_configuration",
    ),
    "token_mismatch": (
        "AUTH_TOKEN_MISMATCH",
        "unauthorized: gateway token mismatch ({hint})",
        "update_auth_credentials",
    ),
    "password_missing": (
        "AUTH_PASSWORD_MISSING",
        "unauthorized: gateway password missing (provide gateway auth password)",
        "update_auth_configuration",
    ),
    "password_mismatch": (
        "AUTH_PASSWORD_MISMATCH",
        "unauthorized: gateway password mismatch (provide gateway auth password)",
        "update_auth_credentials",
    ),
    "device_token_mismatch": (
        "AUTH_DEVICE_TOKEN_MISMATCH",
        "unauthorized: device token mismatch (rotate/reissue device token)",
        "update_auth_credentials",
    ),
    "trusted_proxy_unsupported": (
        "AUTH_UNAUTHORIZED",
        "unauthorized: trusted-proxy auth is not simulated",
        "review_auth_configuration",
    ),
}


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


def _origin_rejection(sim: GatewaySimulator, conn: Connection, request: web.Request) -> str | None:
    origin = conn.origin
    parsed = urlsplit(origin) if origin and origin != "null" else None
    if parsed is None or not parsed.scheme or not parsed.hostname:
        return "origin missing or invalid"
    ui = sim.control_ui()
    allowed = [str(a).rstrip("/").lower() for a in ui.get("allowedOrigins") or []]
    normalized = f"{parsed.scheme}://{parsed.netloc}".lower()
    if "*" in allowed or normalized in allowed:
        return None
    if conn.ingress.local and _is_loopback(parsed.hostname):
        return None
    same_host = parsed.netloc.lower() == (request.host or "").lower()
    if same_host and (ui.get("dangerouslyAllowHostHeaderOriginFallback") or conn.ingress.local):
        return None
    return "origin not allowed"


async def run_connect(
    sim: GatewaySimulator, conn: Connection, request: web.Request, rid: str, params: dict[str, Any]
) -> None:
    async def fail(
        code: str, message: str, *, close_code: int = 1008, close_reason: str | None = None, **extra: Any
    ) -> None:
        await conn.send({"type": "res", "id": rid, "ok": False, "error": error_shape(code, message, **extra)})
        await conn.close(close_code, close_reason or message)

    client: dict[str, Any] = params["client"]
    client_id, client_mode = client["id"], client["mode"]
    role = params.get("role") or "operator"
    scopes = list(params.get("scopes") or [])
    auth: dict[str, Any] = params.get("auth") or {}
    device: dict[str, Any] | None = params.get("device")

    # 1. Startup / drain gates.
    if sim.phase == "draining":
        await fail(
            "UNAVAILABLE",
            "connect unavailable during gateway restart",
            close_code=1013,
            close_reason="gateway restart in progress",
            retryable=True,
            retryAfterMs=1000,
            details={"method": "connect", "reason": "gateway-restart", "phase": "accepting"},
        )
        return
    if not sim.ready and not (role == "node" and client_mode == "node"):
        await fail(
            "UNAVAILABLE",
            "gateway starting; retry shortly",
            close_code=1013,
            close_reason="gateway starting",
            retryable=True,
            retryAfterMs=500,
            details={"reason": "startup-sidecars"},
        )
        return

    # 2. Protocol and role.
    lo, hi = params["minProtocol"], params["maxProtocol"]
    probe_ok = client_mode == "probe" and hi >= 3 and lo <= 4
    if not (hi >= 4 and lo <= 4) and not probe_ok:
        details = {
            "code": "PROTOCOL_MISMATCH",
            "clientMinProtocol": lo,
            "clientMaxProtocol": hi,
            "expectedProtocol": 4,
            "minimumProbeProtocol": 3,
        }
        await fail("INVALID_REQUEST", "protocol mismatch", close_code=1002, details=details)
        return
    if role not in ("operator", "node"):
        await fail("INVALID_REQUEST", "invalid role")
        return

    # 3. Browser origin (always for Control UI ids; for anyone who sends an Origin header).
    is_control_ui = client_id in CONTROL_UI_IDS or client_mode == "webchat"
    if conn.origin is not None or is_control_ui:
        reason = _origin_rejection(sim, conn, request)
        if reason is not None:
            details = {"code": "CONTROL_UI_ORIGIN_NOT_ALLOWED", "reason": reason}
            await fail("INVALID_REQUEST", _ORIGIN_MESSAGE, close_reason=_ORIGIN_MESSAGE, details=details)
            return

    # 4. Shared-secret state.
    mode, token, password = sim.auth_settings()
    shared_ok, auth_method, failure = False, None, None
    if mode == "none":
        shared_ok, auth_method = True, "none"
    elif mode == "token":
        if auth.get("token"):
            if _same(auth["token"], token):
                shared_ok, auth_method = True, "token"
            else:
                failure = "token_mismatch"
        else:
            failure = "token_missing"
    elif mode == "password":
        if auth.get("password"):
            if _same(auth["password"], password):
                shared_ok, auth_method = True, "password"
            else:
                failure = "password_mismatch"
        else:
            failure = "password_missing"
    else:
        failure = "trusted_proxy_unsupported"
    has_shared = bool(auth.get("token") or auth.get("password"))

    async def unauthorized(reason: str) -> None:
        code, message, next_step = _AUTH_MESSAGES[reason]
        hint = (
            "open the dashboard URL and paste the token in Control UI settings"
            if is_control_ui
            else ("provide gateway auth token")
        )
        details = {
            "code": code,
            "authReason": reason,
            "canRetryWithDeviceToken": False,
            "recommendedNextStep": next_step,
        }
        await fail("INVALID_REQUEST", message.format(hint=hint), details=details)

    local = conn.ingress.local and conn.origin is None
    local_backend = local and shared_ok and (client_id, client_mode) == ("gateway-client", "backend")
    local_cli = local and shared_ok and (client_id, client_mode) == ("cli", "cli")

    # 5. No device: who may go on, and with which scopes.
    if device is None:
        if local_backend or local_cli:
            pass
        elif is_control_ui:
            message = "control ui requires device identity (use HTTPS or localhost secure context)"
            await fail("INVALID_REQUEST", message, details={"code": "CONTROL_UI_DEVICE_IDENTITY_REQUIRED"})
            return
        elif role == "operator" and shared_ok:
            if auth_method in ("token", "password"):
                scopes = []
        elif not shared_ok and has_shared and failure is not None:
            await unauthorized(failure)
            return
        else:
            await fail("NOT_PAIRED", "device identity required", details={"code": "DEVICE_IDENTITY_REQUIRED"})
            return

    # 6. Device proof (v3 payload, v2 accepted).
    if device is not None:
        try:
            verify_device_proof(
                device,
                expected_nonce=conn.nonce,
                client_id=client_id,
                client_mode=client_mode,
                role=role,
                scopes=scopes,
                token=signature_token(auth),
                platform=client.get("platform"),
                device_family=client.get("deviceFamily"),
            )
        except DeviceProofError as exc:
            await fail("INVALID_REQUEST", exc.message, details={"code": exc.code, "reason": exc.reason})
            return

    # 7. Credential decision for device connects without a valid shared secret.
    device_id = device["id"] if device is not None else None
    if device_id is not None and not shared_ok:
        stored = sim.devices.token_for(device_id)
        if auth.get("deviceToken") and not auth.get("token"):
            if stored is None or not _same(auth["deviceToken"], stored.get("token")):
                await unauthorized("device_token_mismatch")
                return
            auth_method = "device-token"
        else:
            await unauthorized(failure or "token_missing")
            return

    # 8. Pairing.
    deliver_token: dict[str, Any] | None = None
    if device is not None and device_id is not None and role == "operator" and not local_backend:
        record = sim.devices.paired.get(device_id)
        info = {
            "deviceId": device_id,
            "publicKey": device["publicKey"],
            "displayName": client.get("displayName"),
            "platform": client.get("platform"),
            "deviceFamily": client.get("deviceFamily"),
            "clientId": client_id,
            "clientMode": client_mode,
            "role": role,
            "roles": [role],
            "scopes": scopes,
            "remoteIp": None if conn.ingress.local else conn.ingress.client_ip,
        }
        info = {k: v for k, v in info.items() if v is not None}
        reason: str | None = None
        stored = sim.devices.token_for(device_id)
        if record is not None and stored is not None:
            pinned_platform = normalize_device_metadata(record.get("platform"))
            pinned_family = normalize_device_metadata(record.get("deviceFamily"))
            if (pinned_platform and pinned_platform != normalize_device_metadata(client.get("platform"))) or (
                pinned_family and pinned_family != normalize_device_metadata(client.get("deviceFamily"))
            ):
                reason = "metadata-upgrade"
            elif not all(
                scope_satisfied(s, record.get("approvedScopes") or record.get("scopes") or []) for s in scopes
            ):
                reason = "scope-upgrade"
            else:
                deliver_token = stored
        elif record is not None:
            reason = "role-upgrade"
        elif conn.ingress.local:
            sim.devices.pair(info, approved_via="silent")
            deliver_token = sim.devices.token_for(device_id)
        else:
            reason = "not-paired"
        if reason is not None:
            request_obj, created = sim.devices.request(info, is_repair=reason != "not-paired")
            if created:
                await sim.broadcast("device.pair.requested", request_obj, scope="operator.pairing")
            details: dict[str, Any] = {
                "code": "PAIRING_REQUIRED",
                "reason": reason,
                "requestId": request_obj["requestId"],
                "remediationHint": "Approve this device from the pending pairing requests.",
            }
            if is_control_ui:
                details.update(recommendedNextStep="wait_then_retry", retryable=True, pauseReconnect=False)
            details.update(deviceId=device_id, requestedRole=role, requestedScopes=scopes)
            message = "pairing required: device is not approved yet"
            close_reason = f"{message} (requestId: {request_obj['requestId']})"
            await fail("NOT_PAIRED", message, close_reason=close_reason, details=details)
            return

    # 9. hello-ok.
    conn.client = client
    conn.role = role
    conn.scopes = scopes
    conn.auth_method = auth_method
    conn.device_id = device_id
    conn.uses_shared_auth = auth_method in ("token", "password")
    auth_payload: dict[str, Any] = {
        "method": auth_method,
        "role": role,
        "scopes": scopes,
        "recoveryScope": sim.recovery_scope(conn),
    }
    if deliver_token is not None and device_id is not None:
        auth_payload.update(
            recoveryMigrationAllowed=True,
            deviceToken=deliver_token["token"],
            issuedAtMs=deliver_token.get("createdAtMs"),
        )
        sim.devices.touch(device_id)
    conn.authenticated = True
    await conn.send({"type": "res", "id": rid, "ok": True, "payload": sim.hello_ok(conn, auth_payload, request.host)})
