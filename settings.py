"""One typed settings object, read from the environment.

A missing or malformed value stops the process at start with one line naming the variable
(`load_settings_or_exit`). With `DATABASE_URL` unset the process is in *embedded mode*: it uses
the PostgreSQL that `slopbox dev` runs under `SLOPBOX_DATA_DIR`, and secrets that are not set
(API key, encryption key) come from the file the dev stack generated there.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True)

    # Storage and orchestration
    database_url: str | None = Field(default=None, description="PostgreSQL URL; unset = embedded")
    data_dir: Path = Field(default=Path(".slopbox"), validation_alias="SLOPBOX_DATA_DIR")
    embedded_postgres_port: Port = 54329
    temporal_address: str | None = Field(default=None, description="host:port; unset = embedded")
    temporal_namespace: str = "default"
    temporal_task_queue: str = "slopbox"
    reconcile_interval_s: int = Field(
        default=300, ge=0,
        description="how often the Reconcile schedule sweeps every VPS against its provider; 0 = the worker "
                    "creates no schedule (a worker whose providers see only part of the fleet must not sweep)")

    # Secrets
    control_plane_api_key: SecretStr | None = None
    encryption_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("SLOPBOX_ENCRYPTION_KEYS", "ENCRYPTION_KEYS"),
    )

    # Listeners
    api_host: str = "127.0.0.1"
    api_port: Port = 8000
    proxy_host: str = "127.0.0.1"
    proxy_port: Port = 8080
    forward_proxy_port: Port = 8081
    temporal_port: Port = 7233
    temporal_ui_port: Port = 8233
    max_request_body_bytes: int = Field(
        default=1024 * 1024, ge=1024,
        description="largest request body the API reads; a bigger one is answered 413 without reading it all")
    # Listener budgets (proxy/listener.py): sized together against the process's descriptor limit
    proxy_header_timeout_s: float = Field(
        default=10.0, gt=0,
        description="a browser connection that has not sent a complete request head this long after opening "
                    "(or after its first byte following a response) is closed")
    proxy_keepalive_timeout_s: float = Field(
        default=30.0, gt=0, description="an idle keep-alive browser connection is closed after this long")
    proxy_max_connections: int = Field(default=8000, ge=1, description="open connections on the gateway proxy")
    proxy_max_connections_per_ip: int = Field(
        default=256, ge=1, description="open gateway-proxy connections per source address (IPv6: per /64)")
    forward_proxy_max_connections: int = Field(default=1000, ge=1, description="open connections on the forward proxy")
    forward_proxy_max_connections_per_ip: int = Field(
        default=256, ge=1, description="open forward-proxy connections per source address (IPv6: per /64)")
    proxy_asset_cache_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0,
        description="memory per proxy process for the Control UI's fingerprinted assets (proxy/asset_cache.py); "
                    "0 = off")
    proxy_control_ui_manifest: str | None = Field(
        default=None,
        description="asset-manifest.json of the Control UI build the VMs run: assets whose SHA-256 matches are "
                    "shared by all users' requests; unset = derived from OPENCLAW_BIN's install when present, "
                    "else assets are cached per user only")
    proxy_processes: int = Field(
        default=1, ge=1, le=64,
        description="proxy worker processes sharing the listening ports (SO_REUSEPORT) under a supervisor "
                    "that replaces any that die; >1 shares the per-user rate limits through PostgreSQL")

    # Providers
    hcloud_token: SecretStr | None = None
    hcloud_api_endpoint: str = "https://api.hetzner.cloud/v1"
    fly_api_token: SecretStr | None = None
    fly_api_base_url: str = "https://api.machines.dev/v1"
    fly_org_slug: str = "personal"
    openclaw_bin: str | None = None
    gateway: Literal["openclaw", "simulator"] = Field(
        default="openclaw", validation_alias="SLOPBOX_GATEWAY",
        description="what `slopbox dev` runs as local agents' gateway: the real OpenClaw (installed into .tools/ "
                    "on first use unless OPENCLAW_BIN is set) or the simulator")
    local_provider: bool | None = Field(
        default=None, validation_alias="SLOPBOX_LOCAL_PROVIDER",
        description="offer local gateway-process VMs; unset = only in embedded mode (DATABASE_URL unset)")
    control_plane_public_url: str = "http://127.0.0.1:8000"
    control_plane_ips: Annotated[list[str], NoDecode] = Field(default_factory=list)
    forward_proxy_public_url: str | None = Field(
        default=None, description="how cloud VMs reach the forward proxy (https://, the TLS listener, unless a "
                                  "private address); unset = their egress is not proxied")
    forward_proxy_tls_cert: str | None = Field(
        default=None, description="PEM certificate (chain) of the forward proxy's TLS listener for cloud VMs; "
                                  "the VMs verify it against the system CAs")
    forward_proxy_tls_key: str | None = Field(default=None, description="PEM key for forward_proxy_tls_cert")
    forward_proxy_tls_port: Port = Field(
        default=8443, description="the forward proxy's TLS listener (on when the certificate and key are set)")
    forward_proxy_allowed_ports: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [80, 443],
        description="destination ports agents may reach through the forward proxy (LLM APIs and every channel "
                    "transport use 443); SMTP and the rest are refused")

    # LLM keys handed to each agent's gateway (host env on the VM, never inside the sandbox)
    anthropic_api_key: SecretStr | None = None
    openai_api_key: SecretStr | None = None
    openrouter_api_key: SecretStr | None = None

    # Metrics (Prometheus text on GET /metrics; see telemetry/metrics.py)
    api_metrics: bool = Field(
        default=True, description="serve GET /metrics on the API's own listener (no auth; no secrets in it)")
    metrics_host: str = Field(
        default="127.0.0.1", description="address the worker's and the proxy's metrics listeners bind")
    worker_metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="the worker's GET /metrics (our series); 0 = off")
    worker_temporal_metrics_port: int = Field(
        default=9465, ge=0, le=65535,
        description="the Temporal SDK's own Prometheus endpoint in the worker (temporal_* series); 0 = off")
    proxy_metrics_port: int = Field(
        default=9466, ge=0, le=65535,
        description="the proxy's GET /metrics, a listener apart from the user-facing ones; 0 = off")
    # Email (notifications): unset SMTP_HOST = notifications are shown in the API only
    smtp_host: str | None = Field(default=None, description="SMTP server for notification email; unset = no email")
    smtp_port: Port = 587
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "Slopbox <noreply@slopbox.local>"
    smtp_starttls: bool = Field(default=True, description="upgrade the connection with STARTTLS before sending")
    smtp_timeout_s: float = Field(default=15.0, gt=0, le=300)
    mail_sink_port: Port = Field(
        default=8025, validation_alias="SLOPBOX_MAIL_SINK_PORT",
        description="`slopbox dev`: the local SMTP sink's port (used when SMTP_HOST is unset); "
                    "its log shows every message")
    # Web app (web/): the BFF people use in the browser
    web_host: str = "127.0.0.1"
    web_port: Port = 3000
    web_api_url: str | None = Field(
        default=None, description="the control-plane API the web app calls; unset = http://API_HOST:API_PORT")
    web_public_url: str | None = Field(
        default=None, description="the web app's address as browsers see it (links in email; https = "
                                  "`__Secure-` cookie names); unset = http://WEB_HOST:WEB_PORT")
    web_login_max_failures: int = Field(
        default=5, ge=1, description="failed logins per email, and 4x that per client address, per window")
    web_login_window_s: int = Field(default=900, ge=1, description="the login rate limit's window")
    web_reset_max_requests: int = Field(
        default=3, ge=1, description="password-reset mails asked per email, and 4x that per client address, per "
                                     "WEB_LOGIN_WINDOW_S")
    # OAuth sign-in (web/routes/oauth.py); a provider's button shows only when its id and secret are set.
    google_client_id: str | None = None
    google_client_secret: SecretStr | None = None
    github_client_id: str | None = None
    github_client_secret: SecretStr | None = None
    oauth_google_authorize_url: str = "https://accounts.google.com/o/oauth2/v2/auth"
    oauth_google_token_url: str = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
    oauth_google_userinfo_url: str = "https://openidconnect.googleapis.com/v1/userinfo"
    oauth_github_authorize_url: str = "https://github.com/login/oauth/authorize"
    oauth_github_token_url: str = "https://github.com/login/oauth/access_token"  # noqa: S105 (a URL)
    oauth_github_api_url: str = Field(default="https://api.github.com", description="GitHub's REST API "
                                      "(/user, /user/emails)")
    # Metering (README "Metering")
    metering_interval_s: int = Field(
        default=3600, ge=0, description="seconds between MeteringCycle runs (a Temporal Schedule); 0 = this worker "
                                        "creates no metering schedule (neither MeteringCycle nor CloseMonth)")
    metering_batch_size: int = Field(default=50, ge=1, le=10_000, description="VPSes per metering batch")
    metering_hetzner_requests_per_hour: int = Field(
        default=1800, ge=0, le=3600,
        description="metering's share of the Hetzner project's 3,600 requests/hour; the rest is the lifecycle's")
    metering_hetzner_reserve: int = Field(
        default=300, ge=0, le=3600,
        description="metering stops for the cycle when Hetzner's RateLimit-Remaining falls to this")
    metering_settle_s: int = Field(default=120, ge=0, description="provider metrics younger than this are left "
                                                                  "for the next cycle (they may still change)")
    metering_enforce: bool = Field(default=True, description="MeteringCycle ends by starting the EnforceUsage "
                                                             "workflow for the users whose usage changed")
    fly_prometheus_url: str = "https://api.fly.io/prometheus"

    # Logs
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Traces (OpenTelemetry; telemetry/tracing.py). The standard OTEL_* names; off unless one is set.
    otel_traces_exporter: Literal["none", "console", "otlp"] | None = Field(
        default=None, description="none, console (JSON spans on stdout) or otlp; unset = otlp when an OTLP "
                                  "endpoint is set, else none (tracing off, nothing installed)")
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318); traces go to "
                                  "<endpoint>/v1/traces")
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None, description="full OTLP/HTTP traces URL, overriding the base endpoint")
    otel_service_name: str | None = Field(
        default=None, description="service.name of every span; unset = slopbox-api / -worker / -proxy / -web")

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not v.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return v

    @field_validator("hcloud_token", "fly_api_token", "local_provider", "smtp_host", "smtp_user", "smtp_password",
                     "google_client_id", "google_client_secret", "github_client_id", "github_client_secret",
                     "otel_traces_exporter", "otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint",
                     "otel_service_name", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        """`HCLOUD_TOKEN=""` (a blank line in an env file) means "not configured", not "configured as empty"."""
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("temporal_address")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("must be host:port, e.g. localhost:7233")
        return v

    @field_validator("control_plane_api_key")
    @classmethod
    def _long_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @field_validator("encryption_keys", mode="before")
    @classmethod
    def _fernet_keys(cls, v: object) -> list[str]:
        if v is None or v == "":
            return []
        items = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v)  # type: ignore[arg-type]
        for key in items:
            raw = key.get_secret_value() if isinstance(key, SecretStr) else str(key)
            try:
                Fernet(raw)
            except (ValueError, TypeError):
                raise ValueError(
                    "each comma-separated key must be 32 url-safe base64-encoded bytes "
                    "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
                ) from None
        return items  # type: ignore[return-value]

    @field_validator("control_plane_ips", mode="before")
    @classmethod
    def _csv(cls, v: object) -> list[str]:
        if v is None or v == "":
            return []
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v)  # type: ignore[arg-type]

    @field_validator("forward_proxy_public_url")
    @classmethod
    def _forward_proxy_url_private_or_tls(cls, v: str | None) -> str | None:
        """Agents send their credentials (agent id, gateway token) to this URL: never in clear text
        over the internet. Plain http is accepted only for private or loopback addresses."""
        if not v:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s):// URL")
        if parts.scheme == "http":
            try:
                private = ipaddress.ip_address(parts.hostname).is_private
            except ValueError:
                private = parts.hostname == "localhost" or parts.hostname.endswith((".internal", ".flycast"))
            if not private:
                raise ValueError("must be https:// (the forward proxy's TLS listener) unless it is a private address")
        return v

    @field_validator("forward_proxy_allowed_ports", mode="before")
    @classmethod
    def _ports_csv(cls, v: object) -> list[int]:
        """`80,443,8443`: each a TCP port; at least one (an empty list would silently cut all egress)."""
        items = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else list(v)  # type: ignore[arg-type]
        try:
            ports = sorted({int(p) for p in items})
        except (TypeError, ValueError):
            raise ValueError("must be comma-separated port numbers, e.g. 80,443") from None
        if not ports or not all(1 <= p <= 65535 for p in ports):
            raise ValueError("must be comma-separated port numbers between 1 and 65535, e.g. 80,443")
        return ports

    # -- derived -------------------------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def sqlalchemy_url(self) -> str:
        url = self.database_url or embedded_database_url(self)
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def proxy_url(self) -> str:
        """The address `slopbox dev` prints for the proxy, and the Origin the UI relay sends upstream."""
        return f"http://{self.proxy_host}:{self.proxy_port}"

    @property
    def web_url(self) -> str:
        return (self.web_public_url or f"http://{self.web_host}:{self.web_port}").rstrip("/")

    @property
    def web_api_base(self) -> str:
        return (self.web_api_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or f"127.0.0.1:{self.temporal_port}"

    def api_key(self) -> str:
        if self.control_plane_api_key is not None:
            return self.control_plane_api_key.get_secret_value()
        if self.embedded:
            return dev_secrets(self)["control_plane_api_key"]
        raise MissingSetting("CONTROL_PLANE_API_KEY", "is required when DATABASE_URL is set")

    @property
    def local_provider_enabled(self) -> bool:
        """Local VMs are gateway processes on the worker's own host: a development facility, offered in
        embedded mode only unless SLOPBOX_LOCAL_PROVIDER says otherwise."""
        return self.embedded if self.local_provider is None else self.local_provider

    def configured_providers(self) -> list[str]:
        """VM providers this control plane can use: local (see `local_provider_enabled`), clouds when
        their token is set (a blank token counts as unset)."""
        kinds = ["local"] if self.local_provider_enabled else []
        if self.hcloud_token is not None:
            kinds.append("hetzner")
        if self.fly_api_token is not None:
            kinds.append("fly")
        return kinds

    def llm_api_keys(self) -> dict[str, SecretStr]:
        """Env var name -> key, for the keys that are set."""
        keys = {"ANTHROPIC_API_KEY": self.anthropic_api_key, "OPENAI_API_KEY": self.openai_api_key,
                "OPENROUTER_API_KEY": self.openrouter_api_key}
        return {name: value for name, value in keys.items() if value is not None}

    def secret_keys(self) -> list[str]:
        """Fernet keys, newest first; the first encrypts, all decrypt (rotation)."""
        if self.encryption_keys:
            return [k.get_secret_value() for k in self.encryption_keys]
        if self.embedded:
            return [dev_secrets(self)["encryption_key"]]
        raise MissingSetting("SLOPBOX_ENCRYPTION_KEYS", "is required when DATABASE_URL is set")


class MissingSetting(RuntimeError):
    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable


def embedded_database_url(settings: Settings) -> str:
    return f"postgresql://postgres@127.0.0.1:{settings.embedded_postgres_port}/slopbox"


def dev_secrets(settings: Settings) -> dict[str, str]:
    """Secrets generated once for the embedded stack and kept with its data (mode 0600)."""
    path = settings.data_dir / "dev-secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {
        "control_plane_api_key": secrets.token_urlsafe(32),
        "encryption_key": Fernet.generate_key().decode(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.chmod(0o600)
    tmp.replace(path)
    return values


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def describe_error(err: ValidationError) -> str:
    """The first problem as one line: `VARIABLE: message`."""
    first = err.errors()[0]
    loc = first["loc"][0] if first["loc"] else "settings"
    name = str(loc).upper()
    aliases = {"DATA_DIR": "SLOPBOX_DATA_DIR", "ENCRYPTION_KEYS": "SLOPBOX_ENCRYPTION_KEYS",
               "LOCAL_PROVIDER": "SLOPBOX_LOCAL_PROVIDER", "GATEWAY": "SLOPBOX_GATEWAY",
               "MAIL_SINK_PORT": "SLOPBOX_MAIL_SINK_PORT"}
    msg = first["msg"].removeprefix("Value error, ")
    return f"configuration error: {aliases.get(name, name)}: {msg}"


def load_settings_or_exit() -> Settings:
    try:
        return get_settings()
    except ValidationError as err:
        print(describe_error(err), file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
