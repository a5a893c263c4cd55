"""Activities on a running agent's gateway: restart, channels (token channels and WhatsApp QR).

Credentials are read from the database here and written to the gateway's config over the admin
RPC connection; they never travel through a workflow, so they never land in Temporal history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlmodel import select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import gateway
from activities.vps import VpsActivities, fail, heartbeating
from db.models import Agent, AgentChannel, Vps, VpsState
from openclaw.render import CHANNEL_PLUGINS
from openclaw.rpc import GatewayClient, GatewayError
from providers import VmProvider
from workflows.contracts import Act, ChannelInput, ChannelStatusInput, OperationInput

log = logging.getLogger(__name__)
QR_LIFETIME = timedelta(seconds=60)
TERMINAL = {"connected", "expired", "cancelled", "error", "configured"}
WHATSAPP_UNAVAILABLE = "web login provider is not available"
SESSION_CHANNELS = frozenset({"whatsapp"})
"""Channels logged in by pairing (a session kept on the VM), not by a token in the config."""


def channel_patch(kind: str, block: dict[str, Any] | None) -> dict[str, Any]:
    """The config merge patch that sets (or, with None, removes) a channel and, for a channel whose
    plugin is external (`CHANNEL_PLUGINS`), turns that plugin on (or off) with it: an installed
    external plugin is loaded only when `plugins.entries.<id>.enabled` is true."""
    patch: dict[str, Any] = {"channels": {kind: block}}
    if kind in CHANNEL_PLUGINS:
        patch["plugins"] = {"entries": {kind: None if block is None else {"enabled": True}}}
    return patch


def channel_config(kind: str, credentials: dict[str, str]) -> dict[str, Any]:
    """The gateway config block for a token channel (keys per the OpenClaw 2026.9 channel docs)."""
    if kind == "telegram":
        return {"enabled": True, "botToken": credentials["bot_token"], "dmPolicy": "pairing",
                "groups": {"*": {"requireMention": True}}}
    if kind == "discord":
        return {"enabled": True, "token": credentials["bot_token"]}
    if kind == "slack":
        return {"enabled": True, "botToken": credentials["bot_token"], "appToken": credentials["app_token"]}
    raise fail(f"{kind} is not a token channel")


def channel_report(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """One channel in a `channels.status` answer, or None when the gateway does not list it.

    The channel summary lacks `connected`, `lifecycle`, `tokenStatus` and `stateReason`: only the
    default account's snapshot carries them, so the two are merged; the channel's `statusIssues`
    ride along as `issues`.
    """
    summary = (status.get("channels") or {}).get(kind)
    accounts = [a for a in (status.get("channelAccounts") or {}).get(kind) or [] if isinstance(a, dict)]
    if not isinstance(summary, dict) and not accounts:
        return None
    default = (status.get("channelDefaultAccountId") or {}).get(kind) or "default"
    account = next((a for a in accounts if a.get("accountId") == default), accounts[0] if accounts else {})
    summary = summary if isinstance(summary, dict) else {}
    report: dict[str, Any] = {**summary, **account}
    report["lastError"] = account.get("lastError") or summary.get("lastError")
    issues = [i for i in status.get("statusIssues") or [] if isinstance(i, dict) and i.get("channel") == kind]
    if issues:
        report["issues"] = issues
    return report


def channel_verdict(kind: str, report: dict[str, Any] | None, *, final: bool) -> tuple[str, str | None] | None:
    """(status, reason) once the gateway's report settles the channel; None to keep waiting (unless `final`)."""
    if report is not None and report.get("connected") is True:
        return "connected", None
    error = str(report["lastError"]) if report is not None and report.get("lastError") else None
    # A bad token blocks the channel for good; an error while it still runs is retried by the gateway.
    if error and report is not None and (report.get("lifecycle") == "blocked" or report.get("running") is not True):
        return "error", error
    if not final:
        return None
    if report is None:
        return "error", (f"the gateway does not run a {kind} channel: its {kind} plugin is not installed "
                         "or not loaded on this gateway")
    if report.get("configured") is False:
        why = [str(i.get("message")) for i in report.get("issues") or [] if i.get("message")]
        why = why or [str(v) for v in (report.get("stateReason"),
                                       f"token {report['tokenStatus']}" if report.get("tokenStatus") else None) if v]
        return "error", f"the gateway reports {kind} as not configured" + (f" ({'; '.join(why)})" if why else "")
    # Accepted and (maybe) started, not connected yet: no network, or the service is slow to answer.
    return "configured", error


class AgentActivities(VpsActivities):
    def all(self) -> list[Any]:
        return [*super().all(), self.restart_gateway, self.configure_channel, self.await_channel,
                self.whatsapp_login, self.remove_channel, self.mark_channel]

    async def _gateway_for(self, inp: OperationInput) -> tuple[Vps, Agent]:
        """The running agent's VPS; an operation queued behind a stop finds it stopped and says so."""
        vps, agent, _ = await self._load(inp)
        if agent is None:
            raise fail("the VPS has no agent any more")
        if vps.state != VpsState.running:
            raise fail(f"the agent is not running (its VPS is {vps.state})", "NotRunning")
        return vps, agent

    async def _channel(self, agent_id: str, kind: str) -> AgentChannel:
        async with self.sessions() as s:
            row = (await s.exec(select(AgentChannel).where(AgentChannel.agent_id == agent_id,
                                                           AgentChannel.kind == kind))).first()
        if row is None:
            raise fail(f"no {kind} channel on this agent")
        return row

    async def _set_channel(self, agent_id: str, kind: str, *, only_if: tuple[str, ...] = (), **values: Any) -> None:
        """`only_if`: write only while the row is in one of these states (a late write must not undo an end)."""
        values.setdefault("updated_at", datetime.now(UTC))
        stmt = update(AgentChannel).where(AgentChannel.agent_id == agent_id,  # type: ignore[arg-type]
                                          AgentChannel.kind == kind)  # type: ignore[arg-type]
        if only_if:
            stmt = stmt.where(AgentChannel.status.in_(only_if))  # type: ignore[attr-defined]
        async with self.sessions() as s, s.begin():
            await s.exec(stmt.values(**values))  # type: ignore[call-overload]

    def _admin(self, vps: Vps, agent: Agent, inp: OperationInput,
               **options: Any) -> AbstractAsyncContextManager[GatewayClient]:
        """The admin session for an operation (`gateway.admin_session`: waits a gateway start for one
        still restarting after the previous operation's change)."""
        return gateway.admin_session(self.provider(vps.provider), vps, agent, budget_s=inp.timeouts.gateway_ready_s,
                                     **options)

    @activity.defn(name=Act.restart_gateway)
    async def restart_gateway(self, inp: OperationInput) -> None:
        async with heartbeating():
            vps, agent = await self._gateway_for(inp)
            async with self._admin(vps, agent, inp, reconnect=False) as gw:
                await gw.gateway_restart_request(reason="restart requested from Slopbox")

    @activity.defn(name=Act.configure_channel)
    async def configure_channel(self, inp: ChannelInput) -> None:
        async with heartbeating():
            vps, agent = await self._gateway_for(inp)
            row = await self._channel(inp.vps.agent_id, inp.kind)
            credentials = json.loads(str(row.credentials or "{}"))
            await self._set_channel(inp.vps.agent_id, inp.kind, status="connecting", last_error=None)
            async with self._admin(vps, agent, inp) as gw:
                try:
                    await gateway.write_config(gw, channel_patch(inp.kind, channel_config(inp.kind, credentials)),
                                               budget_s=inp.timeouts.gateway_ready_s,
                                               vm=(self.provider(vps.provider), vps))
                except GatewayError as err:
                    raise fail(f"the gateway refused the {inp.kind} settings: {err.message}",
                               "ChannelRejected") from None

    @activity.defn(name=Act.await_channel)
    async def await_channel(self, inp: ChannelInput) -> None:
        """Wait for the channel to connect; store what the gateway says about it when it does not (yet).

        Ends `connected` when the gateway says so, `error` (the operation fails with the gateway's
        reason) when the channel is blocked, not configured in the gateway's eyes or not run by it at
        all, and `configured` (accepted and started, waiting to connect: e.g. no network) otherwise.
        """
        async with heartbeating():
            vps, agent = await self._gateway_for(inp)
            deadline = time.monotonic() + inp.timeouts.channel_status_s
            report: dict[str, Any] | None = None
            async with self._admin(vps, agent, inp) as gw:
                while True:
                    activity.heartbeat()
                    # Unfiltered: a gateway answers `unknown channel` for a plugin it has not loaded yet.
                    report = channel_report(await gw.channels_status(), inp.kind)
                    verdict = channel_verdict(inp.kind, report, final=time.monotonic() >= deadline)
                    if verdict is not None:
                        break
                    await asyncio.sleep(1.0)
            status, reason = verdict
            await self._set_channel(inp.vps.agent_id, inp.kind, status=status, live_status=report, last_error=reason)
            if status == "error":
                raise fail(f"{inp.kind}: {reason}", "ChannelError")

    @activity.defn(name=Act.whatsapp_login)
    async def whatsapp_login(self, inp: ChannelInput) -> None:
        """start -> show QR -> wait (QR rotates) -> connected | expired | cancelled."""
        async with heartbeating():
            vps, agent = await self._gateway_for(inp)
            agent_id = inp.vps.agent_id
            deadline = time.monotonic() + inp.qr_timeout_s
            async with self._admin(vps, agent, inp) as gw:
                await self._enable_whatsapp(gw, inp, vm=(self.provider(vps.provider), vps))
                try:
                    started = await gw.web_login_start(channel="whatsapp", force=True, timeout_ms=30_000)
                except GatewayError as err:
                    if WHATSAPP_UNAVAILABLE in err.message:
                        raise fail("WhatsApp is not available on this gateway: its @openclaw/whatsapp plugin is not "
                                   "installed or not loaded on the agent's VM", "WhatsAppUnavailable") from None
                    raise fail(f"WhatsApp login could not start: {err.message}", "WhatsAppLogin") from None
                if started.get("connected"):
                    await self._set_channel(agent_id, "whatsapp", status="connected", qr_data_url=None)
                    return
                if not started.get("qrDataUrl"):
                    # No QR and not linked: the gateway says why (e.g. it cannot reach WhatsApp).
                    raise fail(f"WhatsApp login could not start: {started.get('message') or 'no QR code'}",
                               "WhatsAppLogin")
                qr = started.get("qrDataUrl")
                version = (await self._channel(agent_id, "whatsapp")).qr_version
                while True:
                    if qr:
                        version += 1
                        # Only while still pairing: a cancel marks the row `cancelled` without waiting for
                        # this activity to notice, and a QR arriving meanwhile must not bring the pairing back.
                        await self._set_channel(agent_id, "whatsapp", status="awaiting_scan", qr_data_url=qr,
                                                qr_version=version, qr_expires_at=datetime.now(UTC) + QR_LIFETIME,
                                                only_if=("pending", "connecting", "awaiting_scan"))
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        await self._set_channel(agent_id, "whatsapp", status="expired", qr_data_url=None,
                                                last_error="the QR code was not scanned in time")
                        raise ApplicationError("the QR code was not scanned in time", type="QrExpired",
                                               non_retryable=True)
                    activity.heartbeat(version)
                    waited = await gw.web_login_wait(channel="whatsapp", current_qr_data_url=qr,
                                                     timeout_ms=int(min(20.0, remaining) * 1000))
                    if waited.get("connected"):
                        await self._set_channel(agent_id, "whatsapp", status="connected", qr_data_url=None,
                                                last_error=None)
                        return
                    new_qr = waited.get("qrDataUrl")
                    if new_qr and new_qr != qr:
                        qr = new_qr
                    elif "expired" in str(waited.get("message", "")).lower():
                        await self._set_channel(agent_id, "whatsapp", status="expired", qr_data_url=None,
                                                last_error=str(waited.get("message")))
                        raise ApplicationError(str(waited.get("message")), type="QrExpired", non_retryable=True)
                    else:
                        qr = None  # unchanged: keep waiting, nothing new to show

    @staticmethod
    async def _enable_whatsapp(gw: GatewayClient, inp: ChannelInput, *, vm: tuple[VmProvider, Vps]) -> None:
        """Turn the WhatsApp channel and its plugin on, then wait for the gateway to run it (hot reload).

        A gateway without the plugin never lists the channel (for the channel status budget);
        `web.login.start` then says so."""
        await gateway.write_config(gw, channel_patch("whatsapp", {"enabled": True}),
                                   budget_s=inp.timeouts.gateway_ready_s, vm=vm)
        deadline = time.monotonic() + inp.timeouts.channel_status_s
        while channel_report(await gw.channels_status(), "whatsapp") is None and time.monotonic() < deadline:
            activity.heartbeat()
            await asyncio.sleep(1.0)

    @activity.defn(name=Act.remove_channel)
    async def remove_channel(self, inp: ChannelInput) -> None:
        async with heartbeating():
            vps, agent = await self._gateway_for(inp)
            async with self._admin(vps, agent, inp) as gw:
                # Log out first where the login lives outside the config (WhatsApp's linked session on the
                # VM's disk): with the channel goes its plugin, and a gateway that no longer runs it cannot
                # log out of it. A token channel's logout only clears its token from the config, which the
                # removal does too; and its reload, superseded by the removal's, can make the gateway restart.
                if inp.kind in SESSION_CHANNELS:
                    try:
                        await gw.channels_logout(inp.kind)
                    except GatewayError as err:  # not logged in / not running: nothing to log out of
                        log.info("channel logout skipped", extra={"kind": inp.kind, "reason": err.message})
                await gateway.write_config(gw, channel_patch(inp.kind, None), budget_s=inp.timeouts.gateway_ready_s,
                                           vm=(self.provider(vps.provider), vps))
            async with self.sessions() as s, s.begin():
                await s.exec(delete(AgentChannel).where(AgentChannel.agent_id == inp.vps.agent_id,  # type: ignore[call-overload,arg-type]
                                                        AgentChannel.kind == inp.kind))

    @activity.defn(name=Act.mark_channel)
    async def mark_channel(self, inp: ChannelStatusInput) -> None:
        values: dict[str, Any] = {"status": inp.status, "last_error": inp.error}
        if inp.status in TERMINAL:
            values["qr_data_url"] = None
        await self._set_channel(inp.agent_id, inp.kind, **values)
