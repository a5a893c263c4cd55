"""A new VM fetches its secrets once, with the short-lived single-use token its user-data carries.

Provider metadata (Hetzner user_data, Fly machine config) is readable by anyone with the
provider account, so it only ever holds this token: redeeming it returns the gateway token,
LLM keys and the control plane's device public keys to pair, and burns it. The token is
sent in the Authorization header (never in a URL) and only its SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, Header, Request
from pydantic import BaseModel, ConfigDict
from sqlmodel import select

from api.deps import SessionDep
from api.problems import Problem
from api.schemas import BootstrapSecrets, problem_responses
from db.models import Agent, Vps
from openclaw.agent_env import gateway_env
from openclaw.device import DeviceIdentity
from openclaw.tls import normalize_fingerprint
from settings import Settings

router = APIRouter(prefix="/bootstrap", tags=["bootstrap"])


def _token_hash(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or len(token.strip()) < 32:
        raise Problem(401, "Unauthorized", "A bootstrap token is required in the Authorization header",
                      type_="unauthorized")
    return hashlib.sha256(token.strip().encode()).hexdigest()


@router.post("/redeem", response_model=BootstrapSecrets, responses=problem_responses(409))
async def redeem(request: Request, session: SessionDep,
                 authorization: Annotated[str | None, Header()] = None) -> dict[str, object]:
    digest = _token_hash(authorization)
    vps = (await session.exec(select(Vps).where(Vps.bootstrap_token_sha256 == digest).with_for_update())).first()
    now = datetime.now(UTC)
    if vps is None or vps.bootstrap_redeemed_at is not None or (vps.bootstrap_expires_at or now) <= now:
        raise Problem(401, "Unauthorized", "Unknown, expired or already used bootstrap token", type_="unauthorized")
    agent = (await session.exec(select(Agent).where(Agent.vps_id == vps.id))).first()
    if agent is None or vps.admin_device_key is None or vps.relay_device_key is None:
        raise Problem(409, "Not ready", "This VPS is not being provisioned", type_="conflict")
    vps.bootstrap_redeemed_at = now
    vps.bootstrap_token = None  # kept only until redeemed (a retried create reuses it)
    session.add(vps)
    await session.commit()
    settings: Settings = request.app.state.settings
    return {
        "env": gateway_env(settings, agent, local=False),
        "pair_public_keys": [DeviceIdentity.from_pem(vps.admin_device_key).public_key_b64url,
                             DeviceIdentity.from_pem(vps.relay_device_key).public_key_b64url],
    }


class ReadyReport(BaseModel):
    """What the bootstrap script reports (render.py's contract); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    status: str = "ready"
    gateway_cert_sha256: str | None = None
    """SHA-256 of the certificate the gateway serves (cloud VMs), as `openssl x509 -fingerprint` prints it."""


@router.post("/ready", status_code=204, responses=problem_responses(400, 409))
async def ready(session: SessionDep, authorization: Annotated[str | None, Header()] = None,
                report: Annotated[ReadyReport | None, Body()] = None) -> None:
    """Record the ready report and, for a cloud VM, pin its gateway certificate.

    The pin is write-once: the bootstrap token sits in provider metadata, so whoever can read that
    must not be able to swap the pin for their own certificate after the VM reported.
    """
    digest = _token_hash(authorization)
    vps = (await session.exec(select(Vps).where(Vps.bootstrap_token_sha256 == digest).with_for_update())).first()
    if vps is None or vps.bootstrap_redeemed_at is None:
        raise Problem(401, "Unauthorized", "Unknown or unredeemed bootstrap token", type_="unauthorized")
    report = report or ReadyReport()
    if report.status != "ready":
        return  # a failure report: the control plane's readiness wait times out and says so
    pin = None
    if report.gateway_cert_sha256 is not None:
        try:
            pin = normalize_fingerprint(report.gateway_cert_sha256)
        except ValueError:
            raise Problem(400, "Bad fingerprint", "gateway_cert_sha256 is not a SHA-256 fingerprint",
                          type_="bad-request") from None
    if vps.provider != "local" and pin is None:
        raise Problem(400, "No certificate", "A cloud VM must report its gateway certificate's SHA-256",
                      type_="bad-request")
    if pin is not None:
        if vps.gateway_cert_sha256 is not None and vps.gateway_cert_sha256 != pin:
            raise Problem(409, "Pin already set", "This VM already reported a different gateway certificate",
                          type_="conflict")
        vps.gateway_cert_sha256 = pin
    vps.ready_reported_at = datetime.now(UTC)
    session.add(vps)
    await session.commit()
