"""Messaging channels: connect (token channels, WhatsApp QR), list, follow the QR, disconnect.

Credentials are format-checked before anything is stored, stored encrypted, and only ever shown
masked. The gateway work is an operation (ConnectChannel / DisconnectChannel) queued on the VPS's
entity workflow; a WhatsApp pairing runs beside that queue, so it blocks nothing. The QR a
WhatsApp login shows is written to the channel row by that workflow's
activity and read here, with a long-poll so a frontend follows rotation without hammering.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import CurrentUser, SessionDep
from api.operations import accepted, cancel_pairing, operation_id_for, submit
from api.problems import Problem
from api.routes.agents import owned_agent
from api.routes.vps import agent_and_vps
from api.schemas import (
    ChannelList,
    OperationAccepted,
    PairingCancelling,
    WhatsAppQr,
    channel_request,
    problem_responses,
)
from db.models import AgentChannel, User, Vps, VpsState
from workflows.contracts import OperationKind

router = APIRouter(prefix="/agents/{agent_id}/channels", tags=["channels"])
Kind = Literal["telegram", "discord", "slack", "whatsapp"]
ACTIVE = {"connected", "configured", "connecting", "awaiting_scan", "pending"}

# What each token looks like, checked before anything is written (a typo fails here, not on the VM).
FORMATS: dict[str, dict[str, tuple[re.Pattern[str], str]]] = {
    "telegram": {"bot_token": (re.compile(r"^\d{5,12}:[A-Za-z0-9_-]{30,64}$"),
                               "a Telegram bot token looks like 123456789:AA... (from @BotFather)")},
    "discord": {"bot_token": (re.compile(r"^[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}$"),
                              "a Discord bot token has three dot-separated parts")},
    "slack": {"bot_token": (re.compile(r"^xoxb-[A-Za-z0-9-]{20,250}$"), "a Slack bot token starts with xoxb-"),
              "app_token": (re.compile(r"^xapp-[A-Za-z0-9-]{20,250}$"), "a Slack app-level token starts with xapp-")},
    "whatsapp": {},
}


class ChannelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Kind
    credentials: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_format(self) -> ChannelIn:
        expected = FORMATS[self.kind]
        unknown = set(self.credentials) - set(expected)
        if unknown:
            raise ValueError(f"unexpected credentials for {self.kind}: {', '.join(sorted(unknown))}")
        for name, (pattern, hint) in expected.items():
            value = self.credentials.get(name, "").strip()
            if not value:
                raise ValueError(f"credentials.{name} is required for {self.kind}")
            if not pattern.fullmatch(value):
                raise ValueError(f"credentials.{name} is not valid: {hint}")
            self.credentials[name] = value
        return self


def mask(credentials: str | None) -> dict[str, str]:
    values: dict[str, str] = json.loads(credentials) if credentials else {}
    return {k: "…" + v[-4:] for k, v in values.items()}


def channel_out(row: AgentChannel) -> dict[str, Any]:
    return {"kind": row.kind, "status": row.status, "last_error": row.last_error,
            "credentials": mask(row.credentials), "live_status": row.live_status,
            "updated_at": row.updated_at.isoformat() if row.updated_at else None}


async def running_vps(session: AsyncSession, user: User, agent_id: uuid.UUID) -> tuple[Any, Vps]:
    agent, vps = await agent_and_vps(session, user, agent_id)
    if vps.state != VpsState.running:
        raise Problem(409, "Agent is not running", f"The agent's VPS is {vps.state}; start it first "
                      f"(POST /agents/{agent_id}/vps/start).", type_="invalid-state", vps_state=vps.state)
    return agent, vps


async def find_channel(session: AsyncSession, agent_id: uuid.UUID, kind: str) -> AgentChannel | None:
    return (await session.exec(select(AgentChannel).where(AgentChannel.agent_id == agent_id,
                                                          AgentChannel.kind == kind))).first()


@router.post("", status_code=202, response_model=OperationAccepted, responses=problem_responses(404, 409),
             openapi_extra=channel_request(FORMATS))
async def connect(agent_id: uuid.UUID, body: ChannelIn, request: Request, session: SessionDep,
                  user: CurrentUser) -> JSONResponse:
    """Stores the credentials, then queues ConnectChannel (a WhatsApp pairing runs beside the queue)."""
    agent, vps = await running_vps(session, user, agent_id)
    row = await find_channel(session, agent_id, body.kind)
    if row is not None and row.status in ACTIVE:
        raise Problem(409, "Channel exists", f"{body.kind} is already {row.status} on this agent; remove it first "
                      f"(DELETE /agents/{agent_id}/channels/{body.kind}).", type_="conflict", channel_status=row.status)
    previous = None if row is None else {k: getattr(row, k) for k in ("credentials", "status", "last_error",
                                                                      "qr_data_url", "updated_at")}
    if row is None:
        row = AgentChannel(agent_id=agent_id, kind=body.kind)
    row.credentials = json.dumps(body.credentials) if body.credentials else None
    row.status, row.last_error, row.qr_data_url, row.updated_at = "pending", None, None, datetime.now(UTC)
    session.add(row)
    await session.commit()  # the operation's activity reads the credentials from this row
    operation_id = operation_id_for(f"channel-{body.kind}", vps.id, user, None)
    try:
        done = await submit(request, session, user, agent, vps, OperationKind.channel_connect, operation_id,
                            channel=body.kind)
    except Problem:
        # Not accepted: the channel is as it was before this request.
        if previous is None:
            await session.delete(row)
        else:
            for key, value in previous.items():
                setattr(row, key, value)
            session.add(row)
        await session.commit()
        raise
    return accepted(agent_id, vps.id, done.operation_id, done.operation)


@router.get("", response_model=ChannelList, responses=problem_responses(404))
async def list_channels(agent_id: uuid.UUID, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    await owned_agent(session, user, agent_id)
    rows = (await session.exec(select(AgentChannel).where(AgentChannel.agent_id == agent_id)
                               .order_by(AgentChannel.kind))).all()
    return {"items": [channel_out(r) for r in rows]}


@router.delete("/{kind}", status_code=202, response_model=OperationAccepted | PairingCancelling,
               responses=problem_responses(404, 409))
async def disconnect(agent_id: uuid.UUID, kind: Kind, request: Request, session: SessionDep,
                     user: CurrentUser) -> Response:
    agent, vps = await agent_and_vps(session, user, agent_id)
    row = await find_channel(session, agent_id, kind)
    if row is None:
        raise Problem(404, "Not found", f"No {kind} channel on agent {agent_id}", type_="not-found")
    if kind == "whatsapp" and row.status in ("pending", "connecting", "awaiting_scan"):
        # A pairing in progress: cancel it (the operation records `cancelled`); nothing else waits on it.
        cancelled = await cancel_pairing(request, vps)
        if cancelled is not None:
            return JSONResponse({"operation_id": cancelled, "operation": "ConnectChannel", "status": "cancelling"},
                                status_code=202)
    if vps.state != VpsState.running:
        raise Problem(409, "Agent is not running", f"The agent's VPS is {vps.state}; start it to remove {kind}.",
                      type_="invalid-state", vps_state=vps.state)
    operation_id = operation_id_for(f"unchannel-{kind}", vps.id, user, None)
    done = await submit(request, session, user, agent, vps, OperationKind.channel_disconnect, operation_id,
                        channel=kind)
    return accepted(agent_id, vps.id, done.operation_id, done.operation)


@router.get("/whatsapp/qr", response_model=WhatsAppQr, responses=problem_responses(404))
async def whatsapp_qr(agent_id: uuid.UUID, session: SessionDep, user: CurrentUser,
                      after: Annotated[int | None, Query(ge=0, description="long-poll: answer once the QR "
                                                                           "version is past this one")] = None,
                      wait: Annotated[float, Query(ge=0, le=30)] = 25) -> dict[str, Any]:
    """The current pairing QR. With `after=<version>`, waits up to `wait` s for a newer QR or an end state."""
    deadline = time.monotonic() + (wait if after is not None else 0)
    await owned_agent(session, user, agent_id)  # ownership does not change while we wait
    while True:
        row = await find_channel(session, agent_id, "whatsapp")
        if row is None:
            raise Problem(404, "Not found", "No WhatsApp pairing on this agent; start one with "
                          f"POST /agents/{agent_id}/channels", type_="not-found")
        qr = {"status": row.status, "qr_data_url": row.qr_data_url, "version": row.qr_version,
              "expires_at": row.qr_expires_at.isoformat() if row.qr_expires_at else None,
              "last_error": row.last_error}
        # End the read transaction: a long-poll must not hold a pooled connection while it sleeps.
        await session.rollback()
        changed = after is None or qr["version"] > after or qr["status"] != "awaiting_scan"
        if changed or time.monotonic() >= deadline:
            return qr
        await asyncio.sleep(0.25)
