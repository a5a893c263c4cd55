"""`slopbox dev`: the whole stack on one machine, supervised, with nothing left behind on exit.

Order: PostgreSQL (embedded unless DATABASE_URL) → migrations and seeds → local VMs brought back
→ Temporal dev server (unless TEMPORAL_ADDRESS) → demo user → worker, API, proxy, web app, and (unless
SMTP_HOST is set) a local SMTP sink, `mail`, whose log shows every notification email.

The worker, API, proxy and web app are supervised: one that exits is restarted after a backoff (1 s,
doubling to 30 s; back to 1 s once it stayed up a minute), and the stack says so on stdout and in
`logs/dev.log` and the child's own log. The infrastructure is not: if PostgreSQL or Temporal dies,
the stack stops with a message, because everything above them would fail anyway. Ctrl-C / SIGTERM
stop the children first, then halt the local VMs, then Temporal, then PostgreSQL.

The stack is the local VMs' host: stopping it halts their gateways (see providers/local.py), and
starting it brings back the VMs whose VPS row says `running` before the worker starts, or marks
them `stopped` at once with the reason in `last_error`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from cli.users import create_user
from db.migrate import migrate_and_seed
from devstack import postgres
from devstack.postgres import EmbeddedPostgres
from devstack.processes import spawn, terminate
from devstack.temporal import dev_server_command, wait_port, wait_serving
from providers.base import ProviderError
from providers.local import LocalProvider, reap_children
from settings import Settings

DEMO_EMAIL = "demo@slopbox.local"
REPO = Path(__file__).resolve().parent.parent
INSTALL_OPENCLAW = REPO / "scripts" / "install-openclaw.sh"
INSTALL_TIMEOUT_S = 600.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that stayed up this long restarts after BACKOFF_FIRST_S again when it next exits."""


def _say(line: str) -> None:
    print(line, flush=True)


def _log_event(paths: list[Path], message: str, level: str = "warning") -> None:
    """One JSON line, in the format of the services' own logs, appended to each of `paths`."""
    line = json.dumps({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": level,
                       "service": "dev", "logger": "slopbox.dev", "msg": message}) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)


@dataclass
class Service:
    """A supervised child: restarted with exponential backoff whenever it exits."""

    name: str
    cmd: list[str]
    logs: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    history: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.name}.log"

    def wait_listening(self, host: str, port: int) -> None:
        """Until the service listens; if it dies or never does, say why with the end of its log."""
        try:
            wait_port(host, port, self.proc)
        except (RuntimeError, TimeoutError) as err:
            try:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            except OSError:
                tail = "(no log)"
            raise RuntimeError(f"{self.name}: {err}; the end of {self.log_path}:\n{tail}") from None

    def start(self) -> None:
        self.proc = spawn(self.cmd, log_path=self.log_path, env=self.env)
        self.started_at = time.monotonic()
        self.restart_at = None

    def tick(self, now: float) -> str | None:
        """Notice an exit (and schedule the restart) or perform a due restart; returns what happened."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return None
            _kill_group(self.proc)  # whatever it left in its process group goes with it
            self.proc = None
            if now - self.started_at >= STABLE_AFTER_S:
                self.backoff_s = BACKOFF_FIRST_S
            delay = self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)
            self.restart_at = now + delay
            return f"{self.name} exited with code {code}; restarting in {delay:g}s"
        if self.restart_at is not None and now >= self.restart_at:
            self.start()
            assert self.proc is not None
            return f"{self.name} restarted (pid {self.proc.pid})"
        return None

    def stop(self) -> None:
        self.restart_at = None
        if self.proc is not None:
            terminate(self.proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_dev(settings: Settings) -> int:
    data = settings.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    logs = data / "logs"
    stop = threading.Event()
    infra: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    services: list[Service] = []

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    pg_proc: subprocess.Popen[bytes] | None = None
    try:
        if settings.embedded:
            pg = EmbeddedPostgres(data, settings.embedded_postgres_port)
            if pg.is_running():
                _say(f"error: something already listens on port {settings.embedded_postgres_port}; "
                     "is another `slopbox dev` running? (set EMBEDDED_POSTGRES_PORT to use another port)")
                return 1
            _say(f"starting PostgreSQL (embedded, data in {pg.pgdata})")
            pg_proc = pg.spawn()
            infra.append(("PostgreSQL", pg_proc, pg.log_path))
            pg.wait_ready(pg_proc)
            pg.ensure_database()
        _say("migrating database")
        migrate_and_seed(settings.sqlalchemy_url, local_provider=settings.local_provider_enabled)
        if settings.local_provider_enabled:
            openclaw_bin = pick_gateway(settings, logs)
            settings = settings.model_copy(update={"openclaw_bin": openclaw_bin})
            _report_local_vms(bring_back_local_vms(settings))

        if settings.temporal_address is None:
            _say(f"starting Temporal dev server (state in {data / 'temporal.db'})")
            tproc = spawn(dev_server_command(port=settings.temporal_port, ui_port=settings.temporal_ui_port,
                                             namespace=settings.temporal_namespace, db_file=data / "temporal.db"),
                          log_path=logs / "temporal.log")
            infra.append(("Temporal", tproc, logs / "temporal.log"))
            wait_serving("127.0.0.1", settings.temporal_port, tproc)
            wait_port("127.0.0.1", settings.temporal_ui_port, tproc)

        user_id = create_user(settings.sqlalchemy_url, email=DEMO_EMAIL, plan="starter", admin=True,
                              name="Demo", exist_ok=True)
        env = dict(os.environ, SLOPBOX_DATA_DIR=str(data))
        if settings.openclaw_bin:
            env["OPENCLAW_BIN"] = settings.openclaw_bin
        else:
            env.pop("OPENCLAW_BIN", None)
        # Our VM image ships the WhatsApp, Discord and Slack plugins; simulated local gateways behave like it.
        env.setdefault("SLOPBOX_SIM_WHATSAPP", "1")
        env.setdefault("SLOPBOX_SIM_CHANNEL_PLUGINS", "discord,slack")
        mail = mail_env(settings)
        env.update(mail)
        for name in ("worker", "api", "proxy", "web"):
            service = Service(name, [sys.executable, "-m", "cli.main", name], logs, env)
            service.start()
            services.append(service)
        if mail:
            sink = Service("mail", [sys.executable, "-m", "cli.main", "mail-sink"], logs, env)
            sink.start()
            services.append(sink)
            sink.wait_listening("127.0.0.1", settings.mail_sink_port)
        services[1].wait_listening(settings.api_host, settings.api_port)
        services[2].wait_listening(settings.proxy_host, settings.proxy_port)
        services[3].wait_listening(settings.web_host, settings.web_port)

        temporal_ui = (f"http://127.0.0.1:{settings.temporal_ui_port}" if settings.temporal_address is None
                       else "(external Temporal: see your cluster's UI)")
        _say("")
        _say("Slopbox is up.")
        _say(f"  Web app       {settings.web_url}   (sign up there; verification mail goes to the mail sink)")
        _say(f"  API           http://{settings.api_host}:{settings.api_port}   (OpenAPI: /docs)")
        _say(f"  Proxy         {settings.proxy_url}")
        _say(f"  Temporal UI   {temporal_ui}")
        _say(f"  Metrics       API /metrics, worker http://{settings.metrics_host}:{settings.worker_metrics_port}/metrics"
             f" (Temporal SDK :{settings.worker_temporal_metrics_port}), proxy "
             f"http://{settings.metrics_host}:{settings.proxy_metrics_port}/metrics")
        _say(f"  Logs          {logs}/")
        _say(f"  Demo user id  {user_id}   ({DEMO_EMAIL}, plan starter, admin: /admin/... works)")
        if mail:
            _say(f"  Mail sink     smtp://127.0.0.1:{settings.mail_sink_port}   (notification email: {logs}/mail.log)")
        else:
            _say(f"  Email         via {settings.smtp_host}:{settings.smtp_port} (SMTP_HOST)")
        _say(f"  API key       {settings.api_key()}")
        _say("")
        _say(f"  curl -H 'Authorization: Bearer {settings.api_key()}' -H 'X-User-Id: {user_id}' "
             f"http://{settings.api_host}:{settings.api_port}/users/me")
        _say(f"  Control UI of a running agent, one click: .venv/bin/slopbox session create --user {DEMO_EMAIL}")
        _say("Press Ctrl-C to stop.")

        while not stop.wait(0.5):
            for name, proc, log_path in infra:
                if proc.poll() is not None:
                    message = f"{name} exited with code {proc.returncode}; stopping the stack (see {log_path})"
                    _say(f"error: {message}")
                    _log_event([logs / "dev.log"], message, "error")
                    return 1
            reap_children()  # gateways this process relaunched at start
            now = time.monotonic()
            for service in services:
                event = service.tick(now)
                if event is not None:
                    _say(event)
                    _log_event([logs / "dev.log", service.log_path], event,
                               "warning" if "exited" in event else "info")
        return 0
    finally:
        _say("stopping...")
        for service in reversed(services):
            service.stop()
        _halt_local_vms(settings)
        for _name, proc, _log in reversed(infra):
            if proc is not pg_proc:
                terminate(proc)
        if pg_proc is not None:
            postgres.stop(pg_proc)
        _say("stopped.")


def mail_env(settings: Settings) -> dict[str, str]:
    """Without SMTP_HOST the stack runs a local sink (`slopbox mail-sink`) and points every service at
    it, so notification email shows up in logs/mail.log instead of going nowhere."""
    if settings.smtp_host is not None:
        return {}
    return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(settings.mail_sink_port), "SMTP_STARTTLS": "false",
            "SMTP_USER": "", "SMTP_PASSWORD": ""}


# -- the local agents' gateway ---------------------------------------------------------------------------


def pick_gateway(settings: Settings, logs: Path, *, installer: Path = INSTALL_OPENCLAW) -> str | None:
    """The gateway command local VMs run: the real OpenClaw by default, None for the simulator.

    Someone running Slopbox wants to chat with an OpenClaw agent, so the default installs the pinned
    Node 24 + openclaw into `.tools/` on first use (`scripts/install-openclaw.sh`, idempotent and
    offline once installed) and uses it. `OPENCLAW_BIN` wins when set; `SLOPBOX_GATEWAY=simulator`
    skips the gateway. An install that fails (no registry reachable, no checkout scripts) falls back
    to the simulator with one line saying so; the installer's output goes to `logs/install-openclaw.log`.
    """
    if settings.gateway == "simulator":
        _say("gateway: the simulator (SLOPBOX_GATEWAY=simulator)")
        return None
    if settings.openclaw_bin:
        _say(f"gateway: OpenClaw ({settings.openclaw_bin}, from OPENCLAW_BIN)")
        return settings.openclaw_bin
    fallback = "local agents run the gateway simulator (SLOPBOX_GATEWAY=simulator skips this attempt)"
    if not installer.is_file():
        _say(f"warning: no {installer.name} next to this installation to fetch OpenClaw; {fallback}")
        return None
    log_path = logs / "install-openclaw.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tools = Path(os.environ.get("OPENCLAW_TOOLS_DIR") or installer.parent.parent / ".tools")
    if not (tools / "bin" / "openclaw").exists():
        _say(f"installing Node 24 and OpenClaw into {tools} (first run only, about 30 s)")
    try:
        with open(log_path, "ab") as log_file:
            done = subprocess.run(["bash", str(installer)], stdout=subprocess.PIPE, stderr=log_file,
                                  stdin=subprocess.DEVNULL, timeout=INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        _say(f"warning: installing OpenClaw took over {INSTALL_TIMEOUT_S:g} s (see {log_path}); {fallback}")
        return None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        _say(f"warning: could not install OpenClaw (no package registry reachable? see {log_path}); {fallback}")
        return None
    _say(f"gateway: OpenClaw ({lines[-1]})")
    return lines[-1]


# -- local VMs: the stack is their host ---------------------------------------------------------------


@dataclass
class LocalVmReport:
    halted: list[str] = field(default_factory=list)
    """VM folders meant to run whose gateway was down when the stack started."""
    running: list[str] = field(default_factory=list)
    """VPSes whose row says running and whose gateway is up now."""
    stopped: dict[str, str] = field(default_factory=dict)
    """VPS id -> why its gateway could not be brought back (its row is now `stopped`)."""


def bring_back_local_vms(settings: Settings, provider: LocalProvider | None = None) -> LocalVmReport:
    """Before the worker starts: every local VPS whose row says `running` gets its gateway back.

    `boot` first marks every VM whose gateway went down with the previous stack as halted, so that
    an operation still in flight (a provision after its create step) relaunches it through the
    provider when it resumes. Rows that no operation owns are started here and now; when that fails
    the row becomes `stopped` with the reason (compare-and-set: only if it still says `running` and
    no operation took it meanwhile). A running row that an operation owns gets its halted gateway
    relaunched (`get`), not started: that operation may be the stop that already stopped it.
    """
    from sqlalchemy import create_engine, text

    local = provider or LocalProvider.from_settings(settings)
    engine = create_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(text(
                "SELECT v.id, v.provider_ref, EXISTS (SELECT 1 FROM vps_operations o WHERE o.vps_id = v.id"
                " AND o.status IN ('queued', 'running')) FROM vpses v WHERE v.provider = 'local'"
                " AND v.state = 'running' ORDER BY v.created_at")).all()
        rows = [(vps_id, ref) for vps_id, ref, busy in found if not busy]
        owned = [ref for _, ref, busy in found if busy and ref]

        async def start(ref: str | None) -> str | None:
            if not ref:
                return "no local VM was ever recorded for it"
            try:
                await local.start(ref)
            except ProviderError as err:
                return err.message
            return None

        async def relaunch_if_halted(ref: str) -> None:
            try:
                await local.get(ref)
            except ProviderError:
                pass  # the operation that owns the VPS meets the same error and reports it

        async def bring_back() -> tuple[list[str], list[str | None]]:
            halted = await local.boot()
            await asyncio.gather(*(relaunch_if_halted(ref) for ref in owned))
            return halted, list(await asyncio.gather(*(start(ref) for _, ref in rows)))

        halted, errors = asyncio.run(bring_back())
        report = LocalVmReport(halted=halted)
        with engine.begin() as conn:
            for (vps_id, _), error in zip(rows, errors, strict=True):
                if error is None:
                    report.running.append(str(vps_id))
                    continue
                reason = f"the local gateway could not be brought back when the dev stack started: {error}"
                changed = conn.execute(text(
                    "UPDATE vpses SET state = 'stopped', state_changed_at = now(), last_error = :reason"
                    " WHERE id = :id AND state = 'running' AND NOT EXISTS (SELECT 1 FROM vps_operations o"
                    " WHERE o.vps_id = vpses.id AND o.status IN ('queued', 'running'))"),
                    {"id": vps_id, "reason": reason}).rowcount
                if changed:
                    report.stopped[str(vps_id)] = reason
        return report
    finally:
        engine.dispose()


def _report_local_vms(report: LocalVmReport) -> None:
    if report.running:
        _say(f"local VMs: {len(report.running)} running (gateways brought back where they were down)")
    for vps_id, reason in report.stopped.items():
        _say(f"local VM {vps_id}: marked stopped ({reason})")


def _halt_local_vms(settings: Settings) -> None:
    """Local 'VMs' are gateway processes in their own sessions; they go down with their host, the
    stack, and stay meant to run: the next `slopbox dev` brings them back."""

    async def halt_all() -> None:
        provider = LocalProvider.from_settings(settings)
        await asyncio.gather(*(provider.halt(vm.provider_ref) for vm in await provider.list_managed()))

    try:
        asyncio.run(halt_all())
    except Exception as err:  # noqa: BLE001  (shutdown goes on regardless)
        _say(f"warning: could not stop every local gateway: {err}")
