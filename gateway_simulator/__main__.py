"""`python -m gateway_simulator gateway run ...`: the same command line as `openclaw gateway run`.

Exit codes as the real gateway: 0 after SIGTERM/SIGINT, 78 when the config is invalid or the start
is blocked (no `gateway.mode=local` without `--allow-unconfigured`), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace

from gateway_simulator.config import VERSION
from gateway_simulator.options import SimulatorOptions
from gateway_simulator.server import GatewaySimulator, SimulatorStartError

EXIT_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_simulator",
        description="Slopbox's OpenClaw gateway SIMULATOR (not OpenClaw); CLI-compatible with `openclaw gateway`.",
    )
    parser.add_argument("--version", action="version", version=f"{VERSION} (gateway simulator)")
    sub = parser.add_subparsers(dest="command", required=True)
    gateway = sub.add_parser("gateway", help="run the simulated gateway")
    gateway_sub = gateway.add_subparsers(dest="action")
    run = gateway_sub.add_parser("run", help="run in the foreground")
    for target in (gateway, run):
        target.add_argument("--port", type=int)
        target.add_argument("--bind", choices=["loopback", "lan", "tailnet", "auto", "custom"])
        target.add_argument("--token")
        target.add_argument("--password")
        target.add_argument("--auth", choices=["none", "token", "password", "trusted-proxy"])
        target.add_argument("--allow-unconfigured", action="store_true")
        target.add_argument("--verbose", action="store_true")
        target.add_argument("--force", action="store_true", help="accepted for compatibility; ignored")
        target.add_argument("--ws-log", help="accepted for compatibility; ignored")
    return parser


async def _serve(options: SimulatorOptions) -> int:
    sim = GatewaySimulator(options)
    try:
        await sim.start()
    except SimulatorStartError as exc:
        print(str(exc), file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    except OSError as exc:
        print(f"Gateway failed to start: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(sim.stop()))
    loop.add_signal_handler(signal.SIGUSR2, lambda: sim.schedule_restart("SIGUSR2"))
    print(f"gateway simulator ready on ws://{sim.host}:{sim.port} (state {sim.state_dir})", file=sys.stderr)  # noqa: T201
    await sim.stopped.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s [gateway-simulator] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    options = replace(
        SimulatorOptions.from_env(),
        port=args.port,
        bind=args.bind,
        token=args.token,
        password=args.password,
        auth_mode=args.auth,
        allow_unconfigured=args.allow_unconfigured,
    )
    return asyncio.run(_serve(options))


if __name__ == "__main__":
    sys.exit(main())
