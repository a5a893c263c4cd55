"""A config write that outlasts the gateway's own channel reload (`activities.gateway.write_config`).

The real 2026.9.6 gateway answers a channel or plugin change only after reloading the channel
(13-26 s with channel plugins on 2 cores, more under load), and a second write during that reload
makes it keep the write, answer UNAVAILABLE "persisted ... recovery restart is required" and
restart. CI once failed on exactly that: a removal timed out at 30 s, its retry superseded the
reload, the gateway restarted, and the next removal gave up connecting after 20 s. Here the
simulator reloads (`channel_reload_s`) and restarts the same way, in process, on short clocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from activities.gateway import write_config
from gateway_simulator import GatewaySimulator, run_simulator
from openclaw.merge_patch import REDACTED, patch_applied
from openclaw.rpc import GatewayClient, InvalidRequestError, UnavailableError
from tests.test_gateway_protocol import BASE_CONFIG, FAST, client_for, sim_env

TELEGRAM = {"channels": {"telegram": {"enabled": True, "botToken": "123456789:AAH" + "x" * 32}}}
RELOAD_S = 1.5


@pytest.fixture
async def reloading(tmp_path: Path) -> AsyncIterator[GatewaySimulator]:
    options = {**FAST, "restart_down_s": 1.0, "channel_reload_s": RELOAD_S}
    async with run_simulator(tmp_path / "state", config=BASE_CONFIG, env=sim_env(), **options) as simulator:
        yield simulator


def on_disk(sim: GatewaySimulator) -> dict[str, Any]:
    return sim.snapshot().source


async def reload_in_progress(sim: GatewaySimulator, other: GatewayClient) -> asyncio.Task[Any]:
    """Someone else's channel change, still reloading: a write now supersedes it."""
    slow = asyncio.create_task(other.config_patch({"channels": {"slack": {"enabled": True}}}))
    await until(lambda: sim.reloading_channels)
    return slow


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def test_a_write_during_a_channel_reload_is_kept_and_restarts_the_gateway(reloading: GatewaySimulator) -> None:
    """The simulator's side, as the real gateway logged it: the first write answers after its reload,
    the one that lands meanwhile is persisted, answered UNAVAILABLE, and the gateway restarts."""
    async with client_for(reloading, request_timeout=10) as first, client_for(reloading, request_timeout=10) as second:
        slow = asyncio.create_task(first.config_patch(TELEGRAM))
        await until(lambda: reloading.reloading_channels)
        with pytest.raises(UnavailableError) as superseded:
            await second.config_patch({"channels": {"telegram": {"dmPolicy": "pairing"}}})
        assert "persisted" in superseded.value.message and "recovery restart is required" in superseded.value.message
        assert on_disk(reloading)["channels"]["telegram"]["dmPolicy"] == "pairing"
        assert (await slow)["ok"] is True
    await until(lambda: reloading.restart_count == 1)


async def test_a_write_answered_with_a_recovery_restart_is_confirmed_after_the_restart(
        reloading: GatewaySimulator) -> None:
    async with client_for(reloading) as other, client_for(reloading) as gw:
        slow = await reload_in_progress(reloading, other)
        await write_config(gw, TELEGRAM, budget_s=20)
        assert reloading.restart_count == 1  # it waited out the restart, then read the config back
        assert on_disk(reloading)["channels"]["telegram"] == TELEGRAM["channels"]["telegram"]
        await slow


async def test_a_client_that_gave_up_reconnecting_opens_a_fresh_session_to_confirm(tmp_path: Path) -> None:
    """The restart outlasts the client's own reconnect window: the write is still confirmed, on a new session."""
    options = {**FAST, "restart_down_s": 4.0, "channel_reload_s": RELOAD_S}
    async with run_simulator(tmp_path / "state", config=BASE_CONFIG, env=sim_env(), **options) as sim, \
            client_for(sim) as other, client_for(sim, reconnect_timeout=1.0) as gw:
        slow = await reload_in_progress(sim, other)
        await write_config(gw, TELEGRAM, budget_s=30)
        assert sim.restart_count == 1 and gw.connected
        assert on_disk(sim)["channels"]["telegram"] == TELEGRAM["channels"]["telegram"]
        await slow


async def test_a_write_whose_answer_times_out_is_confirmed_from_the_config_not_sent_again(
        reloading: GatewaySimulator) -> None:
    async with client_for(reloading) as gw:
        await write_config(gw, TELEGRAM, budget_s=RELOAD_S / 3)  # the answer comes after the budget
        assert on_disk(reloading)["channels"]["telegram"] == TELEGRAM["channels"]["telegram"]
        # Sent once: a second write during that reload would have restarted the gateway.
        await asyncio.sleep(RELOAD_S)
        assert reloading.restart_count == 0


async def test_a_removal_the_gateway_does_not_keep_fails_with_a_reason(tmp_path: Path) -> None:
    """A gateway that keeps the channel whatever the patch says (`sticky_config`): the lost answer is
    not taken for success."""
    options = {**FAST, "channel_reload_s": RELOAD_S, "sticky_config": TELEGRAM}
    async with run_simulator(tmp_path / "state", config=BASE_CONFIG, env=sim_env(), **options) as sim, \
            client_for(sim) as gw:
        with pytest.raises(ApplicationError) as refused:
            await write_config(gw, {"channels": {"telegram": None}}, budget_s=RELOAD_S / 3)
        assert refused.value.type == "ConfigNotApplied"
        assert "did not keep the config change" in str(refused.value) and "no answer within" in str(refused.value)


async def test_a_gateway_that_does_not_come_back_fails_the_write_within_its_budget(tmp_path: Path) -> None:
    options = {**FAST, "restart_down_s": 30.0, "channel_reload_s": RELOAD_S}
    async with run_simulator(tmp_path / "state", config=BASE_CONFIG, env=sim_env(), **options) as sim, \
            client_for(sim) as other, client_for(sim, connect_timeout=1) as gw:
        slow = await reload_in_progress(sim, other)
        with pytest.raises(ApplicationError) as down:
            await write_config(gw, TELEGRAM, budget_s=3)
        assert down.value.type == "GatewayNotReady"
        assert "did not answer within 3s of a config change" in str(down.value)
        assert "recovery restart is required" in str(down.value)  # what happened first, for the operator
        await slow


async def test_other_refusals_are_the_gateways_answer_not_confirmed(reloading: GatewaySimulator) -> None:
    async with client_for(reloading) as gw:
        with pytest.raises(InvalidRequestError) as invalid:  # an array shrunk without replacePaths
            await write_config(gw, {**TELEGRAM, "gateway": {"trustedProxies": []}}, budget_s=5)
        assert "would remove entries from array path(s): gateway.trustedProxies" in invalid.value.message
        assert "telegram" not in (on_disk(reloading).get("channels") or {})


@pytest.mark.parametrize(("live", "patch", "applied"), [
    ({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}, True),
    ({"a": {"b": 1}}, {"a": {"b": 2}}, False),
    ({"a": {"b": 1}}, {"a": {"b": None}}, False),
    ({"a": {}}, {"a": {"b": None}}, True),
    ({}, {"a": None}, True),
    ({"a": 1}, {"a": {"b": 1}}, False),
    ({"channels": {"slack": {"botToken": REDACTED}}}, {"channels": {"slack": {"botToken": "xoxb-1"}}}, True),
    ({"list": [1, 2]}, {"list": [1, 2]}, True),
    ({"list": [1, 2]}, {"list": [1]}, False),
], ids=["subset", "changed", "not-deleted", "deleted", "absent-root", "scalar-vs-object", "redacted", "list",
        "list-shrunk"])
def test_patch_applied(live: dict[str, Any], patch: dict[str, Any], applied: bool) -> None:
    assert patch_applied(live, patch) is applied
