"""OpenClaw gateway SIMULATOR (not OpenClaw): a protocol-v4 stand-in for development and tests.

Launch it exactly like the real gateway::

    OPENCLAW_STATE_DIR=... OPENCLAW_CONFIG_PATH=.../openclaw.json OPENCLAW_GATEWAY_TOKEN=... \\
        python -m gateway_simulator gateway run --port 18789 --bind loopback [--allow-unconfigured]

or in-process from tests::

    async with run_simulator(tmp_path, token="t") as sim:
        ...  # sim.url (ws), sim.http_url, sim.port

See `SimulatorOptions` for the SLOPBOX_SIM_* test knobs (slow/never ready, WhatsApp plugin, ...).
"""

from gateway_simulator.options import SimulatorOptions
from gateway_simulator.server import GatewaySimulator, SimulatorStartError, run_simulator

__all__ = ["GatewaySimulator", "SimulatorOptions", "SimulatorStartError", "run_simulator"]
