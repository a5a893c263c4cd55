"""`slopbox dev`: the whole stack on one machine, supervised, with nothing left behind on exit.

Order: PostgreSQL (embedded unless DATABASE_URL) → migrations and seeds → Temporal dev server
(unless TEMPORAL_ADDRESS) → demo user → worker, API, proxy. If any child dies the whole stack
stops, because a half-running stack is harder to debug than a stopped one. Ctrl-C / SIGTERM stop
the children first, then Temporal, then PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from cli.users import create_user
from db.migrate import migrate_and_seed
from devstack import postgres
from devstack.postgres import EmbeddedPostgres
from devstack.processes import spawn, terminate
from devstack.temporal import dev_server_command, wait_port
from settings import Settings

DEMO_EMAIL = "demo@slopbox.local"


def _say(line: str) -> None:
    print(line, flush=True)


def run_dev(settings: Settings) -> int:
    data = settings.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    logs = data / "logs"
    stop = threading.Event()
    infra: list[tuple[str, subprocess.Popen[bytes]]] = []
    services: list[tuple[str, subprocess.Popen[bytes]]] = []

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
            pg.wait_ready(pg_proc)
            pg.ensure_database()
        _say("migrating database")
        migrate_and_seed(settings.sqlalchemy_url, local_provider=settings.local_provider_enabled)

        if settings.temporal_address is None:
            _say(f"starting Temporal dev server (state in {data / 'temporal.db'})")
            tproc = spawn(dev_server_command(port=settings.temporal_port, ui_port=settings.temporal_ui_port,
                                             namespace=settings.temporal_namespace, db_file=data / "temporal.db"),
                          log_path=logs / "temporal.log")
            infra.append(("temporal", tproc))
            wait_port("127.0.0.1", settings.temporal_port, tproc)
            wait_port("127.0.0.1", settings.temporal_ui_port, tproc)

        user_id = create_user(settings.sqlalchemy_url, email=DEMO_EMAIL, plan="starter", admin=True,
                              name="Demo", exist_ok=True)
        env = dict(os.environ, SLOPBOX_DATA_DIR=str(data))
        # Our VM image ships the WhatsApp plugin; simulated local gateways behave like it.
        env.setdefault("SLOPBOX_SIM_WHATSAPP", "1")
        for name in ("worker", "api", "proxy"):
            proc = spawn([sys.executable, "-m", "cli.main", name], log_path=logs / f"{name}.log", env=env)
            services.append((name, proc))
        wait_port(settings.api_host, settings.api_port, services[1][1])
        wait_port(settings.proxy_host, settings.proxy_port, services[2][1])

        temporal_ui = (f"http://127.0.0.1:{settings.temporal_ui_port}" if settings.temporal_address is None
                       else "(external Temporal: see your cluster's UI)")
        _say("")
        _say("Slopbox is up.")
        _say(f"  API           http://{settings.api_host}:{settings.api_port}   (OpenAPI: /docs)")
        _say(f"  Proxy         http://{settings.proxy_host}:{settings.proxy_port}")
        _say(f"  Temporal UI   {temporal_ui}")
        _say(f"  Logs          {logs}/")
        _say(f"  Demo user id  {user_id}   ({DEMO_EMAIL}, plan starter)")
        _say(f"  API key       {settings.api_key()}")
        _say("")
        _say(f"  curl -H 'Authorization: Bearer {settings.api_key()}' -H 'X-User-Id: {user_id}' "
             f"http://{settings.api_host}:{settings.api_port}/users/me")
        _say("Press Ctrl-C to stop.")

        while not stop.wait(0.5):
            for name, proc in services + infra:
                if proc.poll() is not None:
                    _say(f"error: {name} exited with code {proc.returncode}; see {logs / (name + '.log')}")
                    return 1
        return 0
    finally:
        _say("stopping...")
        for _name, proc in reversed(services):
            terminate(proc)
        _stop_local_vms(settings)
        for _name, proc in reversed(infra):
            terminate(proc)
        if pg_proc is not None:
            postgres.stop(pg_proc)
        _say("stopped.")


def _stop_local_vms(settings: Settings) -> None:
    """Local 'VMs' are gateway processes in their own sessions; they stop with the stack.

    Their VPS rows still say running; the reconciler marks them stopped on the next run, and the
    user starts them again from the API.
    """
    import asyncio

    from providers.local import LocalProvider

    async def stop_all() -> None:
        provider = LocalProvider.from_settings(settings)
        for vm in await provider.list_managed():
            await provider.stop(vm.provider_ref)

    try:
        asyncio.run(stop_all())
    except Exception as err:  # noqa: BLE001  (shutdown goes on regardless)
        _say(f"warning: could not stop every local gateway: {err}")
