"""Reading a channel's state from `channels.status`, on answers captured from openclaw 2026.9.6.

Captured on this machine (no network) by connecting a Telegram bot exactly as `configure_channel`
does: once with `OPENCLAW_SKIP_CHANNELS=1` (what the local provider used to set) and once without.
"""

from __future__ import annotations

from typing import Any

from activities.agent_ops import channel_report, channel_verdict

SUMMARY = {"lastStopAt": None, "lastError": None, "lastProbeAt": None, "mode": "polling"}
ACCOUNT = {"accountId": "default", "enabled": True, "lastStopAt": None, "lastInboundAt": None,
           "lastOutboundAt": None, "mode": "polling", "allowUnmentionedGroups": False, "lastError": None}


def answer(summary: dict[str, Any], account: dict[str, Any],
           issues: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"channelOrder": ["telegram"], "channels": {"telegram": {**SUMMARY, **summary}},
            "channelAccounts": {"telegram": [{**ACCOUNT, **account}]},
            "channelDefaultAccountId": {"telegram": "default"}, "statusIssues": issues or []}


# Channels skipped: the token is in openclaw.json, the gateway's runtime config has no `channels`.
SKIPPED = answer({"configured": False, "running": False, "lastStartAt": None, "tokenSource": "none"},
                 {"lastStartAt": None, "tokenSource": "none", "tokenStatus": "missing", "configured": False,
                  "running": False, "stateReason": "not configured"})
# Channels on, no network: started, never connected (the summary has no `connected` at all).
STARTED = answer({"configured": True, "running": True, "lastStartAt": 1796234947935, "tokenSource": "config"},
                 {"lastStartAt": 1796234947935, "restartPending": False, "reconnectAttempts": 0,
                  "lifecycle": "starting", "tokenSource": "config", "tokenStatus": "available",
                  "configured": True, "running": True, "connected": False})


def test_a_started_bot_that_cannot_reach_telegram_is_configured_not_connected() -> None:
    report = channel_report(STARTED, "telegram")
    assert report is not None and report["tokenStatus"] == "available" and report["lifecycle"] == "starting"
    assert channel_verdict("telegram", report, final=False) is None  # keeps waiting: it may still connect
    assert channel_verdict("telegram", report, final=True) == ("configured", None)


def test_running_is_not_connected_but_connected_is() -> None:
    ready = answer({"configured": True, "running": True}, {"configured": True, "running": True,
                                                           "connected": True, "lifecycle": "ready"})
    assert channel_verdict("telegram", channel_report(ready, "telegram"), final=False) == ("connected", None)


def test_a_token_the_gateway_does_not_see_is_an_error_with_its_reason() -> None:
    verdict = channel_verdict("telegram", channel_report(SKIPPED, "telegram"), final=True)
    assert verdict == ("error", "the gateway reports telegram as not configured (not configured; token missing)")
    issue = {"channel": "telegram", "accountId": "default", "kind": "config", "message": "Bot token is unreadable."}
    with_issue = answer({"configured": False, "running": False}, {"configured": False, "running": False}, [issue])
    assert channel_verdict("telegram", channel_report(with_issue, "telegram"), final=True) == (
        "error", "the gateway reports telegram as not configured (Bot token is unreadable.)")


def test_a_channel_the_gateway_does_not_list_is_an_error_naming_the_plugin() -> None:
    empty = {"channelOrder": [], "channels": {}, "channelAccounts": {}, "statusIssues": []}
    assert channel_report(empty, "discord") is None
    assert channel_verdict("discord", None, final=False) is None
    status, reason = channel_verdict("discord", None, final=True)  # type: ignore[misc]
    assert status == "error" and "discord plugin is not installed" in str(reason)


def test_a_blocked_bot_fails_at_once_and_a_recovering_one_keeps_its_reason() -> None:
    blocked = answer({"configured": True, "running": True}, {"configured": True, "running": True, "connected": False,
                                                             "lifecycle": "blocked", "lastError": "401: Unauthorized"})
    assert channel_verdict("telegram", channel_report(blocked, "telegram"), final=False) == (
        "error", "401: Unauthorized")
    recovering = answer({"configured": True, "running": True}, {
        "configured": True, "running": True, "connected": False, "lifecycle": "recovering",
        "lastError": "Network request for 'getUpdates' failed!"})
    report = channel_report(recovering, "telegram")
    assert channel_verdict("telegram", report, final=False) is None
    assert channel_verdict("telegram", report, final=True) == ("configured", "Network request for 'getUpdates' failed!")
