"""Knobs of the gateway simulator: the real gateway's flags/env plus simulator-only test switches."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_PORT = 18789


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    value = env.get(name, "").strip()
    return float(value) if value else default


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SimulatorOptions:
    """Everything that shapes one simulated gateway.

    Real-gateway equivalents: `--port`, `--bind`, `--token`, `--password`, `--auth`,
    `--allow-unconfigured`, `OPENCLAW_STATE_DIR`, `OPENCLAW_CONFIG_PATH`, `OPENCLAW_GATEWAY_*`,
    `OPENCLAW_HANDSHAKE_TIMEOUT_MS`. Simulator-only (env `SLOPBOX_SIM_*`):
    - `ready_after_s`      (`SLOPBOX_SIM_READY_AFTER_S`) stay in "starting" this long after boot;
    - `never_ready`        (`SLOPBOX_SIM_NEVER_READY=1`) never leave "starting";
    - `whatsapp_plugin`    (`SLOPBOX_SIM_WHATSAPP=1`) behave as if `@openclaw/whatsapp` is installed
      (it runs while `plugins.entries.whatsapp.enabled` is true, as on the real gateway);
    - `token_plugins`      (`SLOPBOX_SIM_CHANNEL_PLUGINS=discord,slack`) behave as if these external
      channel plugins are installed: while enabled, each runs its configured channel as 2026.9.6 does
      on a machine that cannot reach the service (Discord gives up with its error, Slack retries);
    - `tick_interval_ms`   (`SLOPBOX_SIM_TICK_MS`) `tick` event period (real: 30000);
    - `channel_reload_s`   (`SLOPBOX_SIM_CHANNEL_RELOAD_S`) a config write that changes `channels.*` or
      `plugins.entries.*` answers only after reloading the channel this long (2026.9.6 with channel
      plugins: 13-26 s on 2 cores). A write that lands while such a reload runs supersedes it: the
      gateway keeps the write, answers UNAVAILABLE "persisted ... recovery restart is required" and
      restarts, as the real one does;
    - `restart_down_s`     (`SLOPBOX_SIM_RESTART_S`) how long the listener is gone during a restart;
    - `restart_cooldown_s` (`SLOPBOX_SIM_RESTART_COOLDOWN_S`) minimum gap between restarts (real: 30);
    - `qr_rotate_s`        (`SLOPBOX_SIM_QR_ROTATE_S`) WhatsApp QR rotation period;
    - `sticky_config`      (`SLOPBOX_SIM_STICKY_CONFIG`, a JSON object) merged into every config the
      simulator writes: a gateway (or a plugin) that keeps a key whatever a patch says.
    """

    state_dir: Path
    config_path: Path | None = None
    port: int | None = None
    bind: str | None = None
    token: str | None = None
    password: str | None = None
    auth_mode: str | None = None
    allow_unconfigured: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    handshake_timeout_ms: int = 15_000
    ready_after_s: float = 0.0
    never_ready: bool = False
    whatsapp_plugin: bool = False
    token_plugins: frozenset[str] = frozenset()
    tick_interval_ms: int = 30_000
    channel_reload_s: float = 0.0
    restart_drain_s: float = 0.2
    restart_down_s: float = 1.0
    restart_startup_s: float = 0.3
    restart_cooldown_s: float = 30.0
    qr_rotate_s: float = 20.0
    sticky_config: Mapping[str, Any] | None = None
    bind_host: str | None = None
    """`SLOPBOX_SIM_BIND_HOST`: with `--bind custom`, listen here whatever the config says (an emulated
    cloud VM's own address, which the control plane's config push knows nothing about)."""

    @property
    def resolved_config_path(self) -> Path:
        return self.config_path or self.state_dir / "openclaw.json"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> SimulatorOptions:
        """Build from the same environment the real gateway reads, plus the SLOPBOX_SIM_* knobs."""
        env = dict(os.environ if env is None else env)
        state = Path(env.get("OPENCLAW_STATE_DIR") or Path(env.get("HOME", "~")).expanduser() / ".openclaw")
        config = env.get("OPENCLAW_CONFIG_PATH")
        base = cls(
            state_dir=state,
            config_path=Path(config) if config else None,
            env=env,
            handshake_timeout_ms=int(_float(env, "OPENCLAW_HANDSHAKE_TIMEOUT_MS", 15_000)),
            ready_after_s=_float(env, "SLOPBOX_SIM_READY_AFTER_S", 0.0),
            never_ready=_flag(env, "SLOPBOX_SIM_NEVER_READY"),
            whatsapp_plugin=_flag(env, "SLOPBOX_SIM_WHATSAPP"),
            token_plugins=frozenset(p.strip() for p in env.get("SLOPBOX_SIM_CHANNEL_PLUGINS", "").split(",")
                                    if p.strip() in ("discord", "slack")),
            tick_interval_ms=int(_float(env, "SLOPBOX_SIM_TICK_MS", 30_000)),
            channel_reload_s=_float(env, "SLOPBOX_SIM_CHANNEL_RELOAD_S", 0.0),
            restart_down_s=_float(env, "SLOPBOX_SIM_RESTART_S", 1.0),
            restart_cooldown_s=_float(env, "SLOPBOX_SIM_RESTART_COOLDOWN_S", 30.0),
            qr_rotate_s=_float(env, "SLOPBOX_SIM_QR_ROTATE_S", 20.0),
            sticky_config=json.loads(sticky) if (sticky := env.get("SLOPBOX_SIM_STICKY_CONFIG")) else None,
            bind_host=env.get("SLOPBOX_SIM_BIND_HOST") or None,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]
