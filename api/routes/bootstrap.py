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

from fastapi import APIRouter, Header, Request
from sqlmodel import select

from api.deps import SessionDep
from api.problems import Problem
from api.schemas import BootstrapSecrets, problem_responses
from db.models import Agent, Vps
from openclaw.agent_env import gateway_env
from openclaw.device import DeviceIdentity
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


@router.post("/ready", status_code=204)
async def ready(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> None:
    digest = _token_hash(authorization)
    vps = (await session.exec(select(Vps).where(Vps.bootstrap_token_sha256 == digest))).first()
    if vps is None or vps.bootstrap_redeemed_at is None:
        raise Problem(401, "Unauthorized", "Unknown or unredeemed bootstrap token", type_="unauthorized")
    vps.ready_reported_at = datetime.now(UTC)
    session.add(vps)
    await session.commit()
