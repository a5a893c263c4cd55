"""LocalProvider with a stand-in gateway script (a tiny HTTP server speaking the gateway's CLI)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from providers import ProviderFatal, ProviderRetryable, VmNotFound, VmSpec, VmState, build_provider
from providers.local import LocalProvider, _descendants, _proc_start_time
from settings import Settings

STAND_IN = """\
#!{python}
# Stand-in for `openclaw gateway run --port P --bind loopback`: records what it was given, serves /healthz.
import http.server, json, os, signal, sys

args = sys.argv[1:]
assert args[:2] == ["gateway", "run"], args
port = int(args[args.index("--port") + 1])
mode = {mode!r}
if mode == "bad-config":
    sys.exit(78)
if mode == "crash":
    sys.exit(3)
helper = None
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A helper in its own session, out of reach of the gateway's process group.
    import subprocess
    helper = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
        start_new_session=True,
    ).pid
state = os.environ["OPENCLAW_STATE_DIR"]
with open(os.path.join(state, "seen.json"), "w") as f:
    json.dump({{"argv": args, "env": dict(os.environ), "pid": os.getpid(), "helper": helper}}, f)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"ok": True, "status": "live"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        text = stat.read_text()
        return text[text.rfind(")") + 2] != "Z"
    return True


Factory = Callable[..., LocalProvider]


@pytest.fixture
async def make_provider(tmp_path: Path) -> AsyncIterator[Factory]:
    made: list[LocalProvider] = []

    def make(mode: str = "ok", **overrides: Any) -> LocalProvider:
        script = tmp_path / f"openclaw-{mode}"
        script.write_text(STAND_IN.format(python=sys.executable, mode=mode))
        script.chmod(0o755)
        kwargs: dict[str, Any] = {
            "openclaw_bin": str(script),
            "boot_timeout_s": 15.0,
            "stop_timeout_s": 5.0,
            "poll_s": 0.02,
        }
        kwargs.update(overrides)
        provider = LocalProvider(tmp_path / "data", **kwargs)
        made.append(provider)
        return provider

    yield make
    # Never leave a gateway running, whatever the test did.
    for provider in made:
        for info in await provider.list_managed():
            await provider.destroy(info.provider_ref)


def spec(vps_id: str = "vps-1", **kw: Any) -> VmSpec:
    return VmSpec(
        vps_id=vps_id,
        agent_id="agent-1",
        user_id="user-1",
        files={"openclaw.json": '{"gateway": {"mode": "local"}}', "agents/main/AGENTS.md": "# hi\n"},
        env={"OPENCLAW_LOG_LEVEL": "debug"},
        secret_env={"OPENCLAW_GATEWAY_TOKEN": SecretStr("gw-token-123")},
        **kw,
    )


async def test_happy_path_lifecycle(make_provider: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HCLOUD_TOKEN", "must-not-leak")
    provider = make_provider()
    info = await provider.create(spec())
    assert info.state == VmState.RUNNING
    assert info.provider_ref == "vps-1" and info.vps_id == "vps-1"
    url = provider.gateway_url(info)
    assert url == f"http://127.0.0.1:{info.gateway_port}"
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/healthz")).json() == {"ok": True, "status": "live"}

    vm = tmp_path / "data" / "vms" / "vps-1"
    assert (vm / "state" / "openclaw.json").read_text() == '{"gateway": {"mode": "local"}}'
    assert (vm / "state" / "agents" / "main" / "AGENTS.md").read_text() == "# hi\n"
    assert (vm / "home").is_dir()
    seen = json.loads((vm / "state" / "seen.json").read_text())
    assert seen["argv"] == ["gateway", "run", "--port", str(info.gateway_port), "--bind", "loopback"]
    env = seen["env"]
    assert env["OPENCLAW_STATE_DIR"] == str(vm / "state")
    assert env["OPENCLAW_CONFIG_PATH"] == str(vm / "state" / "openclaw.json")
    assert env["HOME"] == str(vm / "home")
    assert env["OPENCLAW_GATEWAY_TOKEN"] == "gw-token-123"
    assert env["OPENCLAW_LOG_LEVEL"] == "debug"
    for key in ("OPENCLAW_DISABLE_BONJOUR", "OPENCLAW_NO_AUTO_UPDATE", "OPENCLAW_NO_RESPAWN"):
        assert env[key] == "1"
    assert "OPENCLAW_SKIP_CHANNELS" not in env  # channels run as on a VM (with it, a token reads as missing)
    assert "HCLOUD_TOKEN" not in env  # the worker's secrets stay in the worker
    assert (vm / "env.json").stat().st_mode & 0o077 == 0
    assert "gw-token-123" not in (vm / "vm.json").read_text()

    pid = seen["pid"]
    assert pid_alive(pid)
    assert os.getsid(pid) == pid  # own session: a worker restart does not take it down

    got = await provider.get("vps-1")
    assert got is not None and got.state == VmState.RUNNING

    await provider.stop("vps-1")
    assert not pid_alive(pid)
    got = await provider.get("vps-1")
    assert got is not None and got.state == VmState.STOPPED
    await provider.stop("vps-1")  # idempotent

    await provider.start("vps-1")
    got = await provider.get("vps-1")
    assert got is not None and got.state == VmState.RUNNING
    assert got.gateway_port == info.gateway_port  # the port is kept across restarts
    pid2 = json.loads((vm / "state" / "seen.json").read_text())["pid"]
    assert pid2 != pid and pid_alive(pid2)
    await provider.start("vps-1")  # idempotent

    await provider.destroy("vps-1")
    assert not vm.exists()
    assert not pid_alive(pid2)
    assert await provider.get("vps-1") is None
    await provider.destroy("vps-1")  # already gone = done

    with pytest.raises(VmNotFound):
        await provider.start("vps-1")
    with pytest.raises(VmNotFound):
        await provider.stop("vps-1")


async def test_create_twice_is_one_gateway(make_provider: Factory, tmp_path: Path) -> None:
    provider = make_provider()
    first = await provider.create(spec())
    pid = json.loads((tmp_path / "data" / "vms" / "vps-1" / "gateway.pid").read_text())["pid"]
    second = await provider.create(spec())
    assert second.gateway_port == first.gateway_port
    assert json.loads((tmp_path / "data" / "vms" / "vps-1" / "gateway.pid").read_text())["pid"] == pid
    assert [i.provider_ref for i in await provider.list_managed()] == ["vps-1"]


async def test_new_provider_instance_adopts_running_gateway(make_provider: Factory) -> None:
    """A restarted worker (a new provider object) sees and controls the gateway it did not launch."""
    first = make_provider()
    info = await first.create(spec())
    second = make_provider()
    got = await second.get(info.provider_ref)
    assert got is not None and got.state == VmState.RUNNING
    await second.stop(info.provider_ref)
    got = await first.get(info.provider_ref)
    assert got is not None and got.state == VmState.STOPPED


async def test_stop_kills_a_gateway_that_ignores_sigterm(make_provider: Factory, tmp_path: Path) -> None:
    provider = make_provider("stubborn", stop_timeout_s=0.3)
    await provider.create(spec())
    seen = json.loads((tmp_path / "data" / "vms" / "vps-1" / "state" / "seen.json").read_text())
    assert pid_alive(seen["helper"])
    await provider.stop("vps-1")
    assert not pid_alive(seen["pid"])
    assert not pid_alive(seen["helper"])  # no orphan left behind, even outside the process group


async def test_invalid_config_exit_is_fatal(make_provider: Factory) -> None:
    provider = make_provider("bad-config")
    with pytest.raises(ProviderFatal) as err:
        await provider.create(spec())
    assert "exit code 78" in err.value.message
    got = await provider.get("vps-1")
    assert got is not None and got.state == VmState.STOPPED


async def test_crash_on_start_is_retryable(make_provider: Factory) -> None:
    provider = make_provider("crash")
    with pytest.raises(ProviderRetryable) as err:
        await provider.create(spec())
    assert "gateway.log" in err.value.message
    assert "gw-token-123" not in str(err.value)


async def test_gateway_that_dies_is_reported_as_error(make_provider: Factory, tmp_path: Path) -> None:
    provider = make_provider()
    await provider.create(spec())
    pid = json.loads((tmp_path / "data" / "vms" / "vps-1" / "state" / "seen.json").read_text())["pid"]
    os.kill(pid, 9)
    for _ in range(100):
        got = await provider.get("vps-1")
        assert got is not None
        if got.state == VmState.ERROR:
            break
    assert got.state == VmState.ERROR
    await provider.start("vps-1")  # recovers
    got = await provider.get("vps-1")
    assert got is not None and got.state == VmState.RUNNING


async def test_list_managed_only_sees_complete_vm_folders(make_provider: Factory, tmp_path: Path) -> None:
    provider = make_provider()
    await provider.create(spec("vps-a"))
    (tmp_path / "data" / "vms" / "stray").mkdir()
    (tmp_path / "data" / "vms" / "notes.txt").write_text("x")
    assert [i.provider_ref for i in await provider.list_managed()] == ["vps-a"]


async def test_rejects_paths_outside_the_state_folder(make_provider: Factory) -> None:
    provider = make_provider()
    bad = spec().model_copy(update={"files": {"../escape": "x"}})
    with pytest.raises(ProviderFatal):
        await provider.create(bad)
    with pytest.raises(ProviderFatal):
        await provider.get("../etc")


def test_simulator_command_when_no_openclaw_bin(tmp_path: Path) -> None:
    provider = LocalProvider(tmp_path)
    assert provider.command(4242) == [
        sys.executable,
        "-m",
        "gateway_simulator",
        "gateway",
        "run",
        "--port",
        "4242",
        "--bind",
        "loopback",
    ]
    real = LocalProvider(tmp_path, openclaw_bin="node /opt/openclaw/openclaw.mjs")
    assert real.command(1)[:4] == ["node", "/opt/openclaw/openclaw.mjs", "gateway", "run"]


def test_a_new_gateway_state_starts_with_the_installed_channel_plugin_records(tmp_path: Path) -> None:
    """`scripts/install-openclaw.sh` leaves `.tools/openclaw-plugins/state` next to `.tools/bin/openclaw`;
    a new VM's state dir gets a copy of its record database, never an overwrite of its own."""
    tools = tmp_path / "tools"
    (tools / "bin").mkdir(parents=True)
    (tools / "bin" / "openclaw").write_text("#!/bin/sh\n")
    assert LocalProvider(tmp_path / "d", openclaw_bin=str(tools / "bin" / "openclaw")).channel_plugins_db() is None
    template = tools / "openclaw-plugins" / "state" / "state" / "openclaw.sqlite"
    template.parent.mkdir(parents=True)
    template.write_bytes(b"records")
    provider = LocalProvider(tmp_path / "d", openclaw_bin=str(tools / "bin" / "openclaw"))
    assert provider.channel_plugins_db() == template
    provider._prepare(spec("vps-1"))
    seeded = provider.vm_dir("vps-1") / "state" / "state" / "openclaw.sqlite"
    assert seeded.read_bytes() == b"records" and seeded.stat().st_mode & 0o777 == 0o600
    seeded.write_bytes(b"the gateway's own")
    provider._seed_channel_plugins(provider.vm_dir("vps-1") / "state")
    assert seeded.read_bytes() == b"the gateway's own"
    assert LocalProvider(tmp_path / "d").channel_plugins_db() is None  # the simulator has no plugins


async def test_build_provider_from_settings(tmp_path: Path) -> None:
    settings = Settings(SLOPBOX_DATA_DIR=str(tmp_path), openclaw_bin="/bin/true")  # type: ignore[call-arg]
    provider = build_provider("local", settings)
    assert isinstance(provider, LocalProvider)
    assert provider.root == tmp_path / "vms"
    assert provider.command(5)[0] == "/bin/true"
    assert await provider.list_managed() == []
    with pytest.raises(ProviderFatal):
        build_provider("nope", settings)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members may be zombies not yet reaped by init; only living ones count.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


async def _run_real_lifecycle(provider: LocalProvider, vps_id: str) -> None:
    info = await provider.create(
        VmSpec(
            vps_id=vps_id,
            agent_id="agent-1",
            user_id="user-1",
            files={"openclaw.json": json.dumps({"gateway": {"mode": "local"}})},
            secret_env={"OPENCLAW_GATEWAY_TOKEN": SecretStr("real-gateway-token-0123456789")},
        )
    )
    assert info.state == VmState.RUNNING
    pid = json.loads((provider.vm_dir(vps_id) / "gateway.pid").read_text())["pid"]
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(f"{provider.gateway_url(info)}/healthz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        assert (await client.get(f"{provider.gateway_url(info)}/healthz")).status_code == 200
    # A launcher killed before it wrote the pid file: the retried create adopts the real gateway (it
    # keeps its working directory and `gateway run` on its command line), it does not start a second.
    from tests.fault_harness import gateway_processes

    running = gateway_processes(provider.vm_dir(vps_id).parent)
    assert running == {vps_id: [pid]}, running
    (provider.vm_dir(vps_id) / "gateway.pid").unlink()
    again = await provider.create(VmSpec(vps_id=vps_id, agent_id="agent-1", user_id="user-1", files={}))
    assert again.state == VmState.RUNNING and again.gateway_port == info.gateway_port
    assert json.loads((provider.vm_dir(vps_id) / "gateway.pid").read_text())["pid"] == pid
    assert gateway_processes(provider.vm_dir(vps_id).parent) == running
    family = _descendants(pid)
    await provider.stop(vps_id)
    got = await provider.get(vps_id)
    assert got is not None and got.state == VmState.STOPPED
    await provider.destroy(vps_id)
    assert not provider.vm_dir(vps_id).exists()
    assert not group_alive(pid)  # the gateway and every child it spawned are gone
    assert [p for p, start in family if start is not None and _proc_start_time(p) == start] == []


async def test_gateway_simulator_runs_by_default(tmp_path: Path) -> None:
    provider = LocalProvider(tmp_path, boot_timeout_s=30.0, poll_s=0.05)
    try:
        await _run_real_lifecycle(provider, "vps-sim")
    finally:
        await provider.destroy("vps-sim")


@pytest.mark.real_gateway
async def test_real_openclaw_gateway(tmp_path: Path) -> None:
    provider = LocalProvider(tmp_path, openclaw_bin=os.environ["OPENCLAW_BIN"], boot_timeout_s=120.0, poll_s=0.2)
    try:
        await _run_real_lifecycle(provider, "vps-real")
    finally:
        await provider.destroy("vps-real")


# -- the dev stack is the VMs' host: halted with it, back when it starts or when a call expects them --


def gateway_pid(tmp_path: Path, vps_id: str = "vps-1") -> int:
    return int(json.loads((tmp_path / "data" / "vms" / vps_id / "gateway.pid").read_text())["pid"])


async def healthz(info_port: int) -> int:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{info_port}/healthz")).status_code


async def wait_dead(pid: int) -> None:
    for _ in range(200):
        if not pid_alive(pid):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"pid {pid} still alive")


async def test_create_adopts_the_folder_and_relaunches_a_dead_gateway(make_provider: Factory, tmp_path: Path) -> None:
    provider = make_provider()
    first = await provider.create(spec())
    pid = gateway_pid(tmp_path)
    os.kill(pid, 9)
    await wait_dead(pid)
    again = await make_provider().create(spec())  # a retried create_vm in a restarted worker
    assert again.state == VmState.RUNNING and again.gateway_port == first.gateway_port
    assert gateway_pid(tmp_path) != pid and pid_alive(gateway_pid(tmp_path))
    assert await healthz(again.gateway_port) == 200


async def test_a_gateway_whose_launcher_died_before_its_pid_file_is_adopted_not_doubled(
        make_provider: Factory, tmp_path: Path) -> None:
    """A worker SIGKILLed between starting the gateway and writing `gateway.pid` (seen in CI: two
    gateways on one VM after a worker was killed inside create_vm): the retried create finds the live
    gateway of that folder and adopts it instead of launching a second one."""
    from tests.fault_harness import gateway_processes

    provider = make_provider()
    first = await provider.create(spec())
    pid = gateway_pid(tmp_path)
    (tmp_path / "data" / "vms" / "vps-1" / "gateway.pid").unlink()  # the launcher never got to write it
    again = await make_provider().create(spec())  # the retry, in another worker
    assert again.state == VmState.RUNNING and again.gateway_port == first.gateway_port
    assert gateway_pid(tmp_path) == pid
    assert gateway_processes(tmp_path / "data" / "vms") == {"vps-1": [pid]}
    await provider.stop("vps-1")  # and the adopted gateway is ours to stop
    await wait_dead(pid)


async def test_a_halted_vm_comes_back_at_the_next_get(make_provider: Factory, tmp_path: Path) -> None:
    """A provision interrupted after create: the resumed run only calls get (then waits until running)."""
    provider = make_provider()
    info = await provider.create(spec())
    pid = gateway_pid(tmp_path)
    assert await provider.halt("vps-1") is True  # the dev stack stops
    assert not pid_alive(pid)
    assert (await provider.list_managed())[0].state == VmState.STOPPED  # listing does not relaunch

    resumed = make_provider()  # the next stack's worker
    got = await resumed.get("vps-1")
    assert got is not None and got.state in (VmState.STARTING, VmState.RUNNING)
    running = await resumed.wait_until_running("vps-1", timeout_s=15, poll_s=0.05)
    assert running is not None and running.state == VmState.RUNNING
    assert running.gateway_port == info.gateway_port and await healthz(info.gateway_port) == 200
    new_pid = gateway_pid(tmp_path)
    assert new_pid != pid
    assert (await resumed.get("vps-1")).state == VmState.RUNNING  # type: ignore[union-attr]
    assert gateway_pid(tmp_path) == new_pid  # relaunched once, not at every get


async def test_a_stopped_vm_stays_stopped(make_provider: Factory, tmp_path: Path) -> None:
    provider = make_provider()
    await provider.create(spec())
    await provider.stop("vps-1")
    assert await provider.halt("vps-1") is False
    assert await make_provider().boot() == []
    got = await make_provider().get("vps-1")
    assert got is not None and got.state == VmState.STOPPED
    assert not (tmp_path / "data" / "vms" / "vps-1" / "gateway.pid").exists()
    # a halted VM that the user then stops is not brought back either
    await provider.start("vps-1")
    await provider.halt("vps-1")
    await provider.stop("vps-1")
    got = await make_provider().get("vps-1")
    assert got is not None and got.state == VmState.STOPPED


async def test_boot_brings_back_vms_that_died_with_their_host(make_provider: Factory, tmp_path: Path) -> None:
    """The machine rebooted (or the stack was killed and the gateways died): boot marks them halted."""
    provider = make_provider()
    await provider.create(spec("vps-a"))
    await provider.create(spec("vps-b"))
    await provider.stop("vps-b")
    pid = gateway_pid(tmp_path, "vps-a")
    os.kill(pid, 9)
    await wait_dead(pid)
    host = make_provider()
    assert await host.boot() == ["vps-a"]
    await host.start("vps-a")
    got = await host.get("vps-a")
    assert got is not None and got.state == VmState.RUNNING and pid_alive(gateway_pid(tmp_path, "vps-a"))
    b = await host.get("vps-b")
    assert b is not None and b.state == VmState.STOPPED


async def test_dev_start_brings_back_running_vpses_or_marks_them_stopped(
    make_provider: Factory, tmp_path: Path, settings: Settings, sql: Any
) -> None:
    from cli.dev import bring_back_local_vms
    from tests.helpers import make_user

    provider = make_provider()
    user = make_user(sql)

    def vps_row(state: str, ref: str | None, operation: str | None = None) -> str:
        row = sql.execute(
            "INSERT INTO vpses (user_id, vps_config_id, provider, provider_ref, state) VALUES "
            "(%s, (SELECT id FROM vps_configs WHERE name = 'local-small'), 'local', %s, %s) RETURNING id",
            (user, ref, state)).fetchone()
        if operation is not None:  # an operation in flight owns it
            sql.execute("INSERT INTO vps_operations (id, vps_id, user_id, kind, status) "
                        "VALUES (%s, %s, %s, 'restart', 'running')", (operation, row[0], user))
        return str(row[0])

    # A: running, its gateway died with the previous stack (killed outright: no halt mark left).
    await provider.create(spec("vps-a"))
    pid_a = gateway_pid(tmp_path, "vps-a")
    os.kill(pid_a, 9)
    await wait_dead(pid_a)
    a = vps_row("running", "vps-a")
    # B: running, but its VM folder is gone: cannot come back.
    b = vps_row("running", "vps-b")
    # C: provisioning, halted after its create step: left to the resumed workflow's next get.
    info_c = await provider.create(spec("vps-c"))
    await provider.halt("vps-c")
    c = vps_row("provisioning", "vps-c", operation="provision-c")
    # D: running but an operation owns it: its halted gateway is relaunched, the row left alone.
    await provider.create(spec("vps-d"))
    await provider.halt("vps-d")
    d = vps_row("running", "vps-d", operation="restart-d")

    report = await asyncio.to_thread(bring_back_local_vms, settings, make_provider())

    assert report.running == [a]
    assert list(report.stopped) == [b]
    states = dict(sql.execute("SELECT id::text, state FROM vpses").fetchall())
    assert states == {a: "running", b: "stopped", c: "provisioning", d: "running"}
    last_error = sql.execute("SELECT last_error FROM vpses WHERE id = %s", (b,)).fetchone()[0]
    assert "could not be brought back" in last_error and "not found" in last_error
    assert pid_alive(gateway_pid(tmp_path, "vps-a")) and gateway_pid(tmp_path, "vps-a") != pid_a
    assert (await provider.get("vps-a")).state == VmState.RUNNING  # type: ignore[union-attr]
    assert pid_alive(gateway_pid(tmp_path, "vps-d"))
    assert report.halted == ["vps-a", "vps-c", "vps-d"]  # every gateway that was down at start
    assert not (tmp_path / "data" / "vms" / "vps-c" / "gateway.pid").exists()
    resumed = await provider.wait_until_running("vps-c", timeout_s=15, poll_s=0.05)
    assert resumed is not None and resumed.state == VmState.RUNNING
    assert await healthz(info_c.gateway_port) == 200
