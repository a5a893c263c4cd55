"""The relay's per-frame CPU in process, without sockets: where the µs of one round trip go.

Builds a real `proxy.ws_relay.Relay` (production limiters, counting meter) over two in-memory
transports and pushes the bench's `chat.send` request (masked, as a browser sends it) through
`data_received` on the browser side and the gateway's answer through the gateway side, as many
times as asked; prints µs per round trip, and the same for each step alone (unmasking, bounds
scan, strict parse, method check, limiters, meter, gateway pass-through).

Usage: `.venv/bin/python -m bench.ws_frame [--n 200000] [--profile | --quick]`. Complements `bench.proxy`
(which measures the whole process with real sockets, kernel included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import timeit
import uuid
from datetime import UTC, datetime
from typing import Any

from proxy.access import GatewayTarget
from proxy.config import ProxyConfig
from proxy.frames import blocked, parse_client_frame
from proxy.json_limits import check_json_bounds
from proxy.limits import RateLimiter
from proxy.metrics import CountingMeter, CountingRateLimiter
from proxy.ws_relay import Relay, RelayContext, _Socket, _Upstream
from proxy.ws_wire import TEXT, Assembler, PassThrough, encode, mask

REQUEST = json.dumps({"type": "req", "id": "12345", "method": "chat.send",
                      "params": {"sessionKey": "agent:main:main", "message": "y" * 200,
                                 "idempotencyKey": "12345"}}).encode()
RESPONSE = json.dumps({"type": "res", "id": "12345", "ok": True,
                       "payload": {"runId": "12345", "status": "started"}}).encode()


class _Sink:
    """An in-memory transport: counts what is written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written += sum(len(d) for d in data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


async def build() -> tuple[Relay, _Sink, _Sink]:
    cfg = ProxyConfig(ws_frame_rate_per_s=1e9, ws_frame_burst=10**9, ws_byte_rate_per_s=1e12,
                      ws_byte_burst=10**12)
    meter = CountingMeter(None, flush_interval_s=5.0)  # type: ignore[arg-type]  # never flushed here
    ctx = RelayContext(config=cfg, meter=meter,
                       frame_limiter=CountingRateLimiter(RateLimiter(cfg.ws_frame_rate_per_s, cfg.ws_frame_burst),
                                                         "gateway_ws_frame_rate"),
                       relay_origin="http://127.0.0.1", recheck=None, access_key=None,  # type: ignore[arg-type]
                       open_relays=set(), byte_limiter=RateLimiter(cfg.ws_byte_rate_per_s, cfg.ws_byte_burst))
    target = GatewayTarget(user_id=uuid.uuid4(), agent_id=uuid.uuid4(), vps_id=uuid.uuid4(),
                           base_url="http://127.0.0.1:1", gateway_token="t", relay_key_pem="k",
                           session_expires=datetime.now(UTC))
    browser = _Socket(Assembler(require_mask=True, max_message=cfg.max_client_frame_bytes,
                                too_large=(1008, "frame too large")), browser_side=True)
    upstream = _Upstream(Assembler(require_mask=False, max_message=cfg.max_upstream_frame_bytes,
                                   too_large=(1009, "message too big")), "key", cfg.max_upstream_frame_bytes)
    upstream.upgraded.set_result(101)
    to_browser, to_gateway = _Sink(), _Sink()
    browser.connection_made(to_browser)  # type: ignore[arg-type]
    upstream.connection_made(to_gateway)  # type: ignore[arg-type]
    relay = Relay(ctx, target, browser, upstream, lambda: None)
    relay.start(authenticated=True)
    return relay, to_browser, to_gateway


def per_call(stmt: Any, n: int) -> float:
    """Best of 5 runs, CPU µs per call (process time: steadier than wall time on a shared machine)."""
    return min(timeit.repeat(stmt, number=n, repeat=5, timer=time.process_time)) / n * 1e6


async def main(n: int, profile: bool, quick: bool = False) -> None:
    relay, to_browser, to_gateway = await build()
    request = encode(TEXT, REQUEST, masked=True)
    response = encode(TEXT, RESPONSE)
    browser, upstream = relay.browser, relay.upstream

    def round_trip() -> None:
        browser.data_received(request)
        upstream.data_received(response)

    round_trip()
    assert to_gateway.written == len(request) and to_browser.written == len(response), "not relayed"
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            round_trip()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    if quick:
        print(f"round trip: {per_call(round_trip, n):.2f} µs")
        return
    steps: dict[str, Any] = {
        "round trip (browser frame up + gateway frame down)": round_trip,
        "  browser frame: data_received -> gateway write": lambda: browser.data_received(request),
        "  gateway frame: data_received -> browser write": lambda: upstream.data_received(response),
    }
    asm = Assembler(require_mask=True, max_message=1 << 23, too_large=(1008, "x"))

    def assemble() -> None:
        asm.feed(request)
        asm.next()

    key = request[2:6]
    body = request[6:]
    stream = PassThrough(max_message=1 << 25)
    ctx = relay.ctx
    user = relay.target.user_id
    vps = relay.vps_id
    req = parse_client_frame(REQUEST)
    steps.update({
        "    Assembler feed + next (unmask)": assemble,
        "      mask() alone": lambda: mask(key, body),
        "    check_json_bounds": lambda: check_json_bounds(REQUEST),
        "    parse_client_frame (bounds + strict parse)": lambda: parse_client_frame(REQUEST),
        "      json.loads, no hook": lambda: json.loads(REQUEST),
        "    blocked (method allow-list)": lambda: blocked(req),
        "    byte limiter acquire_now": lambda: ctx.byte_limiter.acquire_now(user, 300.0),  # type: ignore[union-attr]
        "    frame limiter acquire_now": lambda: ctx.frame_limiter.acquire_now(user),
        "    meter.add": lambda: ctx.meter.add(vps, inbound=300),
        "    PassThrough.feed": lambda: stream.feed(response, [], []),
    })
    for label, stmt in steps.items():
        print(f"{label:60} {per_call(stmt, n):7.2f} µs")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the round trip instead")
    parser.add_argument("--quick", action="store_true", help="only the round trip")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.profile, args.quick))


if __name__ == "__main__":
    cli()
