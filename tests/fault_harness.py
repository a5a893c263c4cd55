"""Helpers for the fault-injection tests (tests/test_faults.py) and `python -m tests.fault_figures`.

- worker subprocesses (`slopbox worker`, or `tests.fault_worker` that holds a chosen step open);
- a private Temporal dev server with its state in a file, to stop and restart under a test;
- the gateway processes of local VMs, found through /proc (one VM = one gateway process);
- the provider-chaos scenario: N concurrent provisions on the fake Hetzner API with random faults
  and emulated VMs, then one Reconcile run, summed up as figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from pydantic import SecretStr
from temporalio.client import Client

from devstack.temporal import dev_server_command, wait_serving
from gateway_simulator.server import run_simulator
from openclaw.pairing import approve_device_keys
from openclaw.tls import CertificatePinError, check_peer, pinned_context
from providers import build_provider
from settings import Settings
from tests.conftest import free_port
from tests.fakes.chaos import ChaosHetzner
from tests.helpers import headers
from tests.lifecycle_harness import FAST, Stack, running_stack
from tests.vm_emulator import SYSTEMD_LAYOUT, ensure_cert, files_from_cloud_init, parse_conf, ready_report
from workflows.contracts import LifecycleTimeouts

ROOT = Path(__file__).resolve().parent.parent


def plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# --- workers ------------------------------------------------------------------------------------------


def start_worker(settings: Settings, log: Path, *, hold_file: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`slopbox worker` in its own process; with `hold_file`, the step-holding variant."""
    full = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": settings.database_url or "",
        "TEMPORAL_ADDRESS": settings.temporal_target,
        "TEMPORAL_TASK_QUEUE": settings.temporal_task_queue,
        "CONTROL_PLANE_API_KEY": settings.api_key(),
        "SLOPBOX_ENCRYPTION_KEYS": ",".join(settings.secret_keys()),
        "SLOPBOX_DATA_DIR": str(settings.data_dir),
        # Tests share one database: a sweep from this worker's data dir would judge other tests' VMs gone.
        "RECONCILE_INTERVAL_S": "0",
        # Its VMs are local processes: the worker meters them too (DestroyVps's final collection).
        "SLOPBOX_LOCAL_PROVIDER": "true",
        # A test worker must not schedule metering in the shared Temporal server (it would meter other tests).
        "METERING_INTERVAL_S": "0",
        **(env or {}),
    }
    module = "cli.main"
    args = ["worker"]
    if hold_file is not None:
        full["SLOPBOX_TEST_HOLD_FILE"] = str(hold_file)
        module, args = "tests.fault_worker", []
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=full,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


class HeldWorkers:
    """The crash matrices' workers: one that holds a chosen step open (tests/fault_worker.py), killed
    with SIGKILL once every case is held, and a plain one that finishes what it left.

    `with HeldWorkers(settings, work) as workers:`; `arm({user_id: step})` after the set-up,
    `held(user_id, step)` once the worker is inside that step, `kill_and_replace()`. Nothing outlives
    the block: a live worker would run its reconcile schedule over the next tests' rows.
    """

    def __init__(self, settings: Settings, work: Path, env: dict[str, str] | None = None) -> None:
        self.settings, self.work, self.env = settings, work, env
        self.hold = work / "hold.json"
        self.first: subprocess.Popen[bytes] | None = None
        self.second: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> HeldWorkers:
        self.hold.write_text("{}")
        self.first = start_worker(self.settings, self.work / "worker1.log", hold_file=self.hold, env=self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.first)
        stop_process(self.second)

    def arm(self, targets: dict[str, str]) -> None:
        self.hold.write_text(json.dumps(targets))

    def held(self, user: Any, step: str) -> bool:
        """The worker says: inside this step for this user, body done, held."""
        marker = self.work / "held" / str(user)
        return marker.exists() and marker.read_text() == step

    def kill_and_replace(self, *, held: bool = False) -> None:
        """SIGKILL the holding worker; its replacement holds the same steps again when `held`
        (kill_and_replace once more to end that), otherwise it finishes what was left."""
        assert self.first is not None
        self.first.send_signal(signal.SIGKILL)  # no graceful shutdown, no heartbeat, nothing
        self.first.wait()
        stop_process(self.second)
        for marker in (self.work / "held").glob("*"):
            marker.unlink()
        if held:
            self.first = start_worker(self.settings, self.work / "worker1.log", hold_file=self.hold, env=self.env)
        else:
            self.second = start_worker(self.settings, self.work / "worker2.log", env=self.env)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- local VMs as processes ---------------------------------------------------------------------------


def gateway_processes(vm_root: Path) -> dict[str, list[int]]:
    """Live gateway processes per local VM folder (the local provider starts them with cwd = the folder;
    "gateway" is on the command line: `gateway run`, or the title the real one gives itself,
    `openclaw-gateway`). A retried start that launched a second gateway would show up here as two pids.
    """
    root = vm_root.resolve()
    found: dict[str, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].split()[0] == "Z" or cwd.parent != root:
            continue
        if any(b"gateway" in arg for arg in cmdline):
            found.setdefault(cwd.name, []).append(int(proc.name))
    return found


# --- a Temporal server of one's own -----------------------------------------------------------------


class TemporalDevServer:
    """The dev server on a fixed port with SQLite state in `db_file`: stop it, start it, nothing is lost."""

    def __init__(self, db_file: Path, log: Path, namespace: str = "default") -> None:
        self.port = free_port()
        self.ui_port = free_port()
        self.db_file = db_file
        self.log = log
        self.namespace = namespace
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = dev_server_command(port=self.port, ui_port=self.ui_port, namespace=self.namespace,
                                 db_file=self.db_file)
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_serving("127.0.0.1", self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


# --- emulated cloud VMs, tolerant of what goes wrong -------------------------------------------------


@dataclass
class VmFleet:
    """One emulated VM per server the fake Hetzner API holds, booted as `bootstrap.sh` would.

    A VM boots once its server is `running` at the fake (`boot_delay_s` after the create), like a
    real one. Unlike `vm_emulator.boot`, a VM whose bootstrap redemption (or ready report) is
    refused does not fail the test: it stays up without a gateway, as a real one would, and is
    counted in `broken` (its VPS was still provisioning: a defect) or `refused_late` (the operation
    had already ended).
    """

    fake: ChaosHetzner
    api: httpx.AsyncClient
    port: int
    state_root: Path
    database_url: str
    booted: set[int] = field(default_factory=set)
    broken: dict[int, str] = field(default_factory=dict)
    refused_late: dict[int, str] = field(default_factory=dict)
    _tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)

    async def _vps_state(self, server_id: int) -> str | None:
        """The VPS's state, or `provisioning/<step>` while its provision runs (compensating included)."""
        vps_id = self.fake.servers.get(server_id, {}).get("labels", {}).get("vps-id")
        async with await psycopg.AsyncConnection.connect(plain_url(self.database_url), autocommit=True) as db:
            cur = await db.execute(
                "SELECT v.state, o.step FROM vpses v LEFT JOIN vps_operations o ON o.vps_id = v.id "
                "AND o.status IN ('queued', 'running') WHERE v.id::text = %s", (vps_id,))
            row = await cur.fetchone()
        if row is None:
            return None
        return f"{row[0]}/{row[1]}" if row[0] == "provisioning" and row[1] else str(row[0])

    async def _refused(self, server_id: int, what: str) -> None:
        """Count a refused redemption or ready report: `broken` while the VPS provisions, else late."""
        state = await self._vps_state(server_id)
        # A provision that already failed and is removing its VM has withdrawn the token: late, not broken.
        late = state is None or not state.startswith("provisioning") or state.endswith("/compensate_destroy_vm")
        (self.refused_late if late else self.broken)[server_id] = f"{what} while the VPS was {state}"

    async def _vm(self, server_id: int, user_data: str) -> None:
        while True:  # a VM runs its first-boot script once it has booted, not when it is ordered
            with self.fake.lock:
                self.fake.before_request()  # the fake advances its clock lazily, on requests
                status = self.fake.servers.get(server_id, {}).get("status")
            if status is None:
                return  # deleted before it ever booted
            if status == "running":
                break
            await asyncio.sleep(0.05)
        files = files_from_cloud_init(user_data)
        conf = parse_conf(files[SYSTEMD_LAYOUT.bootstrap_conf])
        token = files[SYSTEMD_LAYOUT.bootstrap_token_file].strip()
        path = conf["BOOTSTRAP_URL"].split("://", 1)[1].split("/", 1)[1]
        auth = {"Authorization": f"Bearer {token}"}
        config = json.loads(files[f"{SYSTEMD_LAYOUT.seed_dir}/openclaw.json"])
        # As bootstrap.sh's main(): the gateway's certificate first (where the rendered gateway.tls
        # points, `~` = the service user's HOME), then the redemption.
        home = self.state_root / f"{server_id}-home"
        cert_sha256 = ensure_cert(config, conf, SYSTEMD_LAYOUT, home)
        redeemed = await self.api.post(f"/{path}/redeem", headers=auth)
        if redeemed.status_code != 200:
            # Refused for a VM whose VPS is still being provisioned: the VM we were given can never
            # come up. (After the operation ended, a refusal is right: the token was withdrawn.)
            await self._refused(server_id, f"redeem answered {redeemed.status_code}")
            return
        secrets = redeemed.json()
        config["gateway"]["bind"] = "custom"
        config["gateway"]["customBindHost"] = self.fake.ip_for(server_id)
        gateway_token = secrets["env"]["OPENCLAW_GATEWAY_TOKEN"]
        env = {**os.environ, **secrets["env"], "HOME": str(home)}
        # bind=custom and bind_host pin the listener to this VM's own address whatever the control
        # plane pushes (the push makes the gateway section exactly what it renders, `bind: lan` and no
        # customBindHost; on a real VM "all interfaces" are its own).
        async with run_simulator(self.state_root / str(server_id), port=self.port, token=gateway_token,
                                 config=config, env=env, bind="custom",
                                 bind_host=self.fake.ip_for(server_id)) as sim:
            self.booted.add(server_id)
            if sim.cert_sha256 != cert_sha256:  # the gateway serves what the VM made and reports
                self.broken[server_id] = "the gateway serves another certificate than the one made"
            pairing = asyncio.create_task(approve_device_keys(
                sim.url, token=gateway_token, public_keys=secrets["pair_public_keys"], timeout=120,
                poll_interval=0.2, cert_sha256=cert_sha256))
            try:
                ready = await self.api.post(f"/{path}/ready", headers=auth,
                                            json=ready_report(conf, self.port, cert_sha256))
                if ready.status_code != 204:  # as for the redemption: a defect only while it provisions
                    await self._refused(server_id, f"ready answered {ready.status_code}")
                while True:  # powered until the server is deleted
                    if server_id not in self.fake.servers:
                        break
                    await asyncio.sleep(0.2)
            finally:
                pairing.cancel()

    async def _watch(self) -> None:
        while True:
            with self.fake.lock:
                new = [(sid, ud) for sid, ud in self.fake.user_data.items() if sid not in self._tasks]
            for sid, user_data in new:
                self._tasks[sid] = asyncio.create_task(self._vm(sid, user_data or ""))
            await asyncio.sleep(0.05)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[VmFleet]:
        watcher = asyncio.create_task(self._watch())
        try:
            yield self
        finally:
            watcher.cancel()
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(watcher, *self._tasks.values(), return_exceptions=True)


# --- the provider-chaos scenario ------------------------------------------------------------------------


@dataclass
class ChaosFigures:
    operations: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    """running / error / unfinished."""
    errors: Counter[str] = field(default_factory=Counter)
    """last_error of the VPSes that ended in error, grouped."""
    faults: Counter[str] = field(default_factory=Counter)
    provider_calls: int = 0
    servers_before_reconcile: int = 0
    reconcile: dict[str, Any] = field(default_factory=dict)
    left_behind: list[str] = field(default_factory=list)
    """Servers at the provider after Reconcile that no live VPS owns."""
    wrong_states: list[str] = field(default_factory=list)
    broken_vms: dict[int, str] = field(default_factory=dict)
    """VMs that could not redeem their bootstrap token while their VPS was still provisioning."""

    def lines(self) -> list[str]:
        return [
            f"operations run:        {self.operations} provisions "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.outcomes.items()))})",
            f"provider calls:        {self.provider_calls}",
            f"faults injected:       {sum(self.faults.values())} "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(self.faults.items()))})",
            *(f"  error reason x{n}: {reason}" for reason, n in self.errors.most_common()),
            f"VMs whose boot broke:  {len(self.broken_vms)} (bootstrap token refused during provisioning)",
            *(f"  server {sid}: {why}" for sid, why in sorted(self.broken_vms.items())),
            f"servers before reconcile: {self.servers_before_reconcile}; reconcile: "
            f"{len(self.reconcile.get('orphans_destroyed', []))} orphans destroyed, "
            f"{len(self.reconcile.get('errors', []))} errors",
            f"VMs left behind:       {len(self.left_behind)} {self.left_behind or ''}",
            f"wrong states:          {len(self.wrong_states)}",
            *(f"  {w}" for w in self.wrong_states),
        ]


def chaos_timeouts() -> LifecycleTimeouts:
    return LifecycleTimeouts(**{**FAST.model_dump(), "gateway_ready_s": 45, "vm_running_s": 60})


async def _settle(stack: Stack, user: uuid.UUID, agent: str, timeout: float) -> dict[str, Any] | str:
    try:
        return await stack.wait_vps(user, agent, "running", "error", timeout=timeout)
    except AssertionError as err:
        return str(err)


async def run_chaos(settings: Settings, client: Client, make_user: Callable[[], uuid.UUID], *, size: int,
                    rate: float, seed: int, workdir: Path, settle_timeout: float = 600,
                    boot_delay_s: float = 2.0) -> ChaosFigures:
    """`size` concurrent provisions while `rate` of all provider calls fail, then one Reconcile run."""
    figures = ChaosFigures(operations=size)
    fake = ChaosHetzner(seed=seed)
    fake.boot_delay_s = boot_delay_s
    await fake.start()
    try:
        port = free_port()
        cloud = settings.model_copy(update={
            "hcloud_token": SecretStr(fake.token), "hcloud_api_endpoint": fake.base_url,
            "control_plane_ips": ["127.0.0.1"], "data_dir": workdir / "data",
            "temporal_task_queue": f"tq-chaos-{uuid.uuid4().hex[:8]}"})
        provider = build_provider("hetzner", cloud, gateway_port=port, poll_interval_s=0.05)
        async with running_stack(cloud, client, providers={"hetzner": provider}, timeouts=chaos_timeouts()) as stack:
            fleet = VmFleet(fake, stack.api, port, workdir / "vms", cloud.database_url or "")
            users = [make_user() for _ in range(size)]
            agents = [await stack.new_agent(u, f"chaos-{i}") for i, u in enumerate(users)]
            config_id = await stack.config_id(users[0], "hetzner")
            async with fleet.running():
                fake.chaos_rate = rate
                answers = await asyncio.gather(*(
                    stack.api.post(f"/agents/{a}/vps", json={"vps_config_id": config_id}, headers=headers(u))
                    for u, a in zip(users, agents, strict=True)))
                for answer in answers:
                    assert answer.status_code == 202, answer.text
                settled = await asyncio.gather(*(_settle(stack, u, a, settle_timeout)
                                                 for u, a in zip(users, agents, strict=True)))
                fake.chaos_rate = 0.0
                figures.faults = Counter(fake.injected)
                figures.provider_calls = len(fake.requests)
                figures.servers_before_reconcile = len(fake.servers)
                for vps in settled:
                    if isinstance(vps, str):
                        figures.outcomes["unfinished"] += 1
                        figures.wrong_states.append(f"operation never finished: {vps}")
                        continue
                    figures.outcomes[vps["state"]] += 1
                    if vps["state"] == "error":
                        figures.errors[vps["last_error"] or "(no reason given)"] += 1
                        if not vps["last_error"]:
                            figures.wrong_states.append(f"{vps['id']}: error without a reason")
                report = await client.execute_workflow(
                    "Reconcile", {"orphan_grace_s": 0}, id=f"reconcile-chaos-{uuid.uuid4().hex[:8]}",
                    task_queue=cloud.temporal_task_queue, result_type=dict)
                figures.reconcile = dict(report)
                figures.broken_vms = dict(fleet.broken)
                await _judge(cloud, fake, fleet, figures)
    finally:
        await fake.aclose()
    return figures


READY_WITHIN_S = 20.0
"""The config push may end in a gateway restart (as a real gateway's hot reload does): a running VPS's
gateway must answer /readyz again within this long, not at the very instant it is looked at."""


async def _ready_within(http: httpx.AsyncClient, url: str, pin: str, seconds: float) -> str | None:
    """None once `url` answers 200 from the pinned certificate; else why not (a wrong certificate at
    once, since no wait makes it right)."""
    deadline = time.monotonic() + seconds
    last = "no answer"
    while True:
        try:
            resp = await http.get(url)
            stream = resp.extensions.get("network_stream")
            check_peer(stream.get_extra_info("ssl_object") if stream else None, pin)
            if resp.status_code == 200:
                return None
            last = f"answered {resp.status_code}"
        except CertificatePinError as err:
            return str(err)
        except httpx.HTTPError as err:
            last = type(err).__name__
        if time.monotonic() >= deadline:
            return f"{last} within {seconds:.0f}s"
        await asyncio.sleep(0.25)


async def _judge(settings: Settings, fake: ChaosHetzner, fleet: VmFleet, figures: ChaosFigures) -> None:
    """Every server belongs to a running VPS that knows it, and every running VPS has a working VM."""
    async with await psycopg.AsyncConnection.connect(plain_url(settings.database_url or ""), autocommit=True) as db:
        cur = await db.execute(
            "SELECT v.id::text, v.state, v.provider_ref, v.last_error, (SELECT o.id FROM vps_operations o "
            "WHERE o.vps_id = v.id AND o.status IN ('queued', 'running') LIMIT 1), v.gateway_url, "
            "v.gateway_cert_sha256 "
            "FROM vpses v WHERE v.provider = 'hetzner'")
        rows = {r[0]: r for r in await cur.fetchall()}
    with fake.lock:
        servers = {sid: dict(s) for sid, s in fake.servers.items()}
    owned: dict[str, list[int]] = {}
    for sid, server in sorted(servers.items()):
        vps_id = server["labels"].get("vps-id", "")
        owner = rows.get(vps_id)
        owned.setdefault(vps_id, []).append(sid)
        if owner is None or owner[1] != "running" or owner[2] != str(sid):
            state = "no VPS" if owner is None else f"VPS {owner[1]}, provider_ref {owner[2]}"
            figures.left_behind.append(f"server {sid} ({server['status']}; {state})")
    # As the control plane and the proxy reach it: the row's URL, TLS trusting only the row's pin.
    async with httpx.AsyncClient(timeout=5, verify=pinned_context(), trust_env=False) as http:
        for vps_id, (_, state, ref, _error, operation, gateway_url, pin) in sorted(rows.items()):
            if operation is not None:
                figures.wrong_states.append(f"{vps_id}: still holds operation {operation}")
            if state != "running":
                continue
            mine = owned.get(vps_id, [])
            if len(mine) != 1 or str(mine[0]) != ref:
                figures.wrong_states.append(f"{vps_id}: running, provider_ref {ref}, servers at Hetzner {mine}")
                continue
            if servers[mine[0]]["status"] != "running":
                figures.wrong_states.append(f"{vps_id}: running, but its server is {servers[mine[0]]['status']}")
            if not gateway_url or not gateway_url.startswith("https://") or not pin:
                figures.wrong_states.append(f"{vps_id}: running, but its row has gateway_url {gateway_url!r} "
                                            f"and {'a' if pin else 'no'} certificate pin")
                continue
            why = await _ready_within(http, f"{gateway_url}/readyz", pin, READY_WITHIN_S)
            if why is not None:
                figures.wrong_states.append(f"{vps_id}: running, but its gateway at {gateway_url} is not ready "
                                            f"over pinned TLS ({why})")
