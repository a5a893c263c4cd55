"""The local provider: a "VM" is an OpenClaw gateway process on this machine.

Each VM lives in `<data_dir>/vms/<vps_id>/`:

    vm.json        identity and the loopback port chosen at create (written last: marks a complete create)
    env.json       the environment to launch with, secrets included (mode 0600, like a VM's own disk)
    state/         OPENCLAW_STATE_DIR; the spec's rendered files are written here before the first launch,
                   with the channel plugins' install records (`state/state/openclaw.sqlite`) copied from
                   the template `scripts/install-openclaw.sh` made next to the real gateway, if any
    home/          HOME
    gateway.pid    pid and kernel start time of the gateway; present while the VM is meant to run
    gateway.halted present when the VM is meant to run but its host (the dev stack) went down under it
    gateway.log    its stdout and stderr

The gateway is the real one when `openclaw_bin` is configured, otherwise the gateway simulator
(`python -m gateway_simulator`), both started with the same CLI and environment. It runs in its
own session, so restarting the worker does not take it down; `get` checks the pid (and its start
time, against pid reuse) and whether the port accepts connections.

The dev stack is these VMs' host. When it stops it *halts* them (`halt`: the process ends, the VM
stays meant to run), and when it starts again `boot` marks as halted every VM that was meant to run
but whose process is gone (a crash or reboot of the machine). A halted VM comes back at the next
call that expects it to run: `get` relaunches it (and reports it starting), `create` and `start`
relaunch it and wait until it listens, so an operation interrupted by a restart resumes where it was.
`stop` and `destroy` are the user's word and clear the mark. A gateway that dies by itself while its
host is up is reported as `error` by `get` (a crash-looping gateway is not relaunched behind the
caller's back); `start` or `create` relaunch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from devstack.ports import unused_port
from providers.base import (
    MANAGED_BY,
    ProviderFatal,
    ProviderRetryable,
    VmInfo,
    VmNotFound,
    VmProvider,
    VmSpec,
    VmState,
)

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PLUGINS_DB = Path("state") / "openclaw.sqlite"
"""Where a 2026.9.6 state dir keeps its plugin install records (with the rest of its SQLite state)."""
EX_CONFIG = 78  # the gateway's exit code for an invalid configuration: retrying will not help

# Only these are inherited from the worker's environment: it also holds provider tokens,
# the database URL and encryption keys, none of which an agent may see.
INHERITED_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "NODE_OPTIONS",
    "VIRTUAL_ENV",
)
# No OPENCLAW_SKIP_CHANNELS (a VM's gateway does not set it either): with it the gateway leaves
# `channels` out of its resolved runtime config, so a Telegram token in openclaw.json reads as
# missing (`configured: false`) and no channel ever starts.
DEFAULT_ENV = {
    "OPENCLAW_DISABLE_BONJOUR": "1",
    "OPENCLAW_NO_AUTO_UPDATE": "1",
    "OPENCLAW_NO_RESPAWN": "1",
    "PYTHONUNBUFFERED": "1",
}

# Popen objects of the gateways this process launched, by pid, so that exited ones are reaped
# (a zombie still answers kill(pid, 0)). Gateways from an earlier worker are not our children;
# init reaps those.
_children: dict[int, subprocess.Popen[bytes]] = {}
_exit_codes: dict[int, int] = {}
_children_lock = threading.Lock()


def _proc_start_time(pid: int) -> str | None:
    """Kernel start time of `pid` (Linux), to tell our gateway from a later process reusing its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":
        return None
    return fields[19] if len(fields) > 19 else None


def _orphan_gateway(vm: Path) -> int | None:
    """A live gateway launched in this VM folder that no pid file names (Linux): its launcher was killed
    between starting it and writing `gateway.pid`. Every gateway we start leads its own session with the
    folder as its working directory and "gateway" on its command line (`gateway run`; the real one
    renames itself `openclaw-gateway`), so a session leader that matches all three is ours, not, say,
    an operator's shell opened in the folder. If helpers ever match too, the oldest is the launched one."""
    folder = vm.resolve()
    found: list[tuple[int, int]] = []  # (kernel start time, pid)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")) != folder:
                continue
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        leader = len(fields) > 19 and fields[0] != "Z" and fields[3] == proc.name  # session id == pid
        if leader and any(b"gateway" in arg for arg in argv):
            found.append((int(fields[19]), int(proc.name)))
    return min(found)[1] if found else None


def _descendants(pid: int) -> list[tuple[int, str | None]]:
    """Every process below `pid` with its start time (Linux). Some gateway helpers start their own
    session, so the process group alone does not reach them."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: list[tuple[int, str | None]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append((child, _proc_start_time(child)))
        todo.extend(children.get(child, []))
    return out


def _alive(pid: int, start_time: str | None) -> bool:
    with _children_lock:
        child = _children.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            del _children[pid]
            _exit_codes[pid] = child.returncode
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    if Path("/proc").is_dir():
        current = _proc_start_time(pid)
        return current is not None and (start_time is None or current == start_time)
    return True


def reap_children() -> None:
    """Collect the exit status of gateways this process launched that have exited since (no zombies
    while a long-lived launcher such as `slopbox dev` runs)."""
    with _children_lock:
        for pid, child in list(_children.items()):
            if child.poll() is not None:
                del _children[pid]
                _exit_codes[pid] = child.returncode


def _exit_code(pid: int) -> int | None:
    with _children_lock:
        child = _children.get(pid)
        if child is not None:
            return child.poll()
        return _exit_codes.get(pid)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the gateway's whole process group (it leads its own session), or just the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _free_port(avoid: set[int]) -> int:
    try:
        return unused_port(LOOPBACK, avoid)
    except OSError:
        raise ProviderRetryable("could not find a free loopback port", provider="local") from None


PID_FILE = "gateway.pid"
HALTED_FILE = "gateway.halted"


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by this user only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class LocalProvider(VmProvider):
    """Gateways as local processes. `ref` is the VPS id."""

    kind = "local"

    def __init__(
        self,
        data_dir: Path | str,
        *,
        openclaw_bin: str | None = None,
        python: str = sys.executable,
        boot_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        poll_s: float = 0.1,
    ) -> None:
        self.root = Path(data_dir).absolute() / "vms"
        self.openclaw_bin = openclaw_bin or None
        self.python = python
        self.boot_timeout_s = boot_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LocalProvider:
        kwargs: dict[str, Any] = {"openclaw_bin": settings.openclaw_bin}
        kwargs.update(overrides)
        return cls(settings.data_dir, **kwargs)

    # -- paths & files ---------------------------------------------------------------------------------

    def vm_dir(self, vps_id: str) -> Path:
        if not vps_id or "/" in vps_id or vps_id.startswith(".") or vps_id != Path(vps_id).name:
            raise ProviderFatal(f"not a local VM ref: {vps_id!r}", provider=self.kind)
        return self.root / vps_id

    def _lock(self, vps_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vps_id, asyncio.Lock())

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def command(self, port: int) -> list[str]:
        """The gateway's command line: the real OpenClaw CLI, or the simulator with the same CLI."""
        tail = ["gateway", "run", "--port", str(port), "--bind", "loopback"]
        if self.openclaw_bin:
            head = [self.openclaw_bin] if Path(self.openclaw_bin).exists() else shlex.split(self.openclaw_bin)
            return [*head, *tail]
        return [self.python, "-m", "gateway_simulator", *tail]

    def _env(self, vm: Path, launch_env: dict[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env.update(DEFAULT_ENV)
        env.update(launch_env)
        env.update(
            {
                "OPENCLAW_STATE_DIR": str(vm / "state"),
                "OPENCLAW_CONFIG_PATH": str(vm / "state" / "openclaw.json"),
                "HOME": str(vm / "home"),
            }
        )
        return env

    def _used_ports(self) -> set[int]:
        ports = set()
        if self.root.is_dir():
            for meta_path in self.root.glob("*/vm.json"):
                meta = self._read_json(meta_path)
                if meta and isinstance(meta.get("port"), int):
                    ports.add(meta["port"])
        return ports

    def _prepare(self, spec: VmSpec) -> dict[str, Any]:
        """First create: folders, rendered files, launch env, port. vm.json is written last."""
        vm = self.vm_dir(spec.vps_id)
        targets = []
        for rel in spec.files:
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or not p.parts:
                raise ProviderFatal(f"file path must be relative inside the state folder: {rel!r}", provider=self.kind)
            targets.append((vm / "state" / Path(*p.parts), spec.files[rel]))
        for sub in ("", "state", "home"):
            (vm / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        for target, content in targets:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_private(target, content)
        self._seed_channel_plugins(vm / "state")
        launch_env = dict(spec.env)
        launch_env.update({k: v.get_secret_value() for k, v in spec.secret_env.items()})
        _write_private(vm / "env.json", json.dumps(launch_env))
        meta = {
            "vps_id": spec.vps_id,
            "agent_id": spec.agent_id,
            "user_id": spec.user_id,
            "port": _free_port(self._used_ports()),
            "created_at": datetime.now(UTC).isoformat(),
        }
        _write_private(vm / "vm.json", json.dumps(meta))
        return meta

    def channel_plugins_db(self) -> Path | None:
        """The install records of the channel plugins `scripts/install-openclaw.sh` put next to the real
        gateway (`.tools/openclaw-plugins`), or None (simulator, or installed without them)."""
        if not self.openclaw_bin or not Path(self.openclaw_bin).exists():
            return None
        db = Path(self.openclaw_bin).resolve().parent.parent / "openclaw-plugins" / "state" / PLUGINS_DB
        return db if db.is_file() else None

    def _seed_channel_plugins(self, state: Path) -> None:
        """A new gateway's state dir starts from the template's record database, as a VM's starts with
        the plugins its bootstrap installed: 2026.9.6 loads (and trusts) an installed plugin only when
        the state dir's own database records it. The records point at the shared, installed packages."""
        db = self.channel_plugins_db()
        target = state / PLUGINS_DB
        if db is None or target.exists():
            return
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for suffix in ("", "-wal"):
            if Path(f"{db}{suffix}").exists():
                shutil.copyfile(f"{db}{suffix}", f"{target}{suffix}")
                os.chmod(f"{target}{suffix}", 0o600)

    # -- process management ------------------------------------------------------------------------------

    def _pid(self, vm: Path) -> dict[str, Any] | None:
        return self._read_json(vm / PID_FILE)

    def _running_pid(self, vm: Path) -> int | None:
        info = self._pid(vm)
        if info and _alive(int(info["pid"]), info.get("start_time")):
            return int(info["pid"])
        return None

    def _launch(self, vm: Path, meta: dict[str, Any]) -> int:
        launch_env = self._read_json(vm / "env.json") or {}
        cmd = self.command(int(meta["port"]))
        with open(vm / "gateway.log", "ab") as logf:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=vm,
                    env=self._env(vm, launch_env),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                message = f"cannot start the gateway {cmd[0]!r}: {exc.strerror}"
                raise ProviderFatal(message, provider=self.kind) from None
        with _children_lock:
            _children[proc.pid] = proc
            _exit_codes.pop(proc.pid, None)
        pid_info = {"pid": proc.pid, "start_time": _proc_start_time(proc.pid), "started_at": time.time()}
        _write_private(vm / PID_FILE, json.dumps(pid_info))
        (vm / HALTED_FILE).unlink(missing_ok=True)
        log.info("local: started gateway for vps %s (pid %s, port %s)", meta["vps_id"], proc.pid, meta["port"])
        return proc.pid

    def _adopt_orphan(self, vm: Path) -> int | None:
        """A worker killed inside `_launch` after the gateway started and before its pid file was
        written leaves a gateway nothing names; the retried create or start adopts it rather than
        launching a second one on the same folder and port."""
        pid = _orphan_gateway(vm)
        if pid is not None:
            _write_private(vm / PID_FILE, json.dumps({"pid": pid, "start_time": _proc_start_time(pid),
                                                      "started_at": time.time()}))
            log.warning("local: adopted gateway pid %s that no pid file named (its launcher died)", pid)
        return pid

    async def _listening(self, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout=0.5)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def _wait_listening(self, vm: Path, pid: int, port: int) -> None:
        """Until the port accepts connections (bounded). Raises when the gateway exits instead."""
        deadline = time.monotonic() + self.boot_timeout_s
        while time.monotonic() < deadline:
            if await self._listening(port):
                return
            if self._running_pid(vm) != pid:
                code = _exit_code(pid)
                message = f"the gateway exited during start (exit code {code}); see {vm / 'gateway.log'}"
                (vm / PID_FILE).unlink(missing_ok=True)
                cls = ProviderFatal if code == EX_CONFIG else ProviderRetryable
                raise cls(message, provider=self.kind, code="gateway_exited")
            await asyncio.sleep(self.poll_s)

    async def _ensure_running(self, vm: Path, meta: dict[str, Any]) -> None:
        pid = self._running_pid(vm)
        if pid is None:
            pid = await asyncio.to_thread(self._adopt_orphan, vm)
        if pid is None:
            pid = await asyncio.to_thread(self._launch, vm, meta)
        (vm / HALTED_FILE).unlink(missing_ok=True)  # running as asked: no longer waiting to come back
        await self._wait_listening(vm, pid, int(meta["port"]))

    async def _exited(self, pid: int, start_time: str | None, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if not _alive(pid, start_time):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.poll_s)

    async def _terminate(self, vm: Path) -> None:
        info = self._pid(vm)
        if info is None:
            return
        pid = int(info["pid"])
        start_time = info.get("start_time")
        if _alive(pid, start_time):
            family = _descendants(pid)
            _signal_group(pid, signal.SIGTERM)
            if not await self._exited(pid, start_time, self.stop_timeout_s):
                log.warning("local: gateway pid %s ignored SIGTERM; killing it", pid)
                _signal_group(pid, signal.SIGKILL)
                await self._exited(pid, start_time, 5.0)
            # Helpers outside the group normally exit with the gateway; give them a moment, then kill.
            for child, child_start in family:
                if child_start is not None and not await self._exited(child, child_start, 1.0):
                    log.warning("local: helper pid %s outlived its gateway; killing it", child)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                    await self._exited(child, child_start, 2.0)
        with _children_lock:
            child = _children.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(child.wait, 5)
        (vm / PID_FILE).unlink(missing_ok=True)

    # -- the interface ------------------------------------------------------------------------------------

    async def _info(self, vm: Path, meta: dict[str, Any]) -> VmInfo:
        info = self._pid(vm)
        detail = None
        if info is None:
            state = VmState.STOPPED
            if (vm / HALTED_FILE).exists():
                detail = "halted with the dev stack; comes back at the next get or start"
        elif _alive(int(info["pid"]), info.get("start_time")):
            state = VmState.RUNNING if await self._listening(int(meta["port"])) else VmState.STARTING
        else:
            # A pid file without a process: the gateway died without being stopped.
            state = VmState.ERROR
            code = _exit_code(int(info["pid"]))
            detail = "the gateway process exited" + (f" with code {code}" if code is not None else "")
        created = None
        with contextlib.suppress(KeyError, ValueError, TypeError):
            created = datetime.fromisoformat(meta["created_at"])
        return VmInfo(
            provider=self.kind,
            provider_ref=str(meta["vps_id"]),
            vps_id=str(meta["vps_id"]),
            state=state,
            raw_state=state.value,
            host=LOOPBACK,
            gateway_port=int(meta["port"]),
            location="local",
            labels={"managed-by": MANAGED_BY, "vps-id": str(meta["vps_id"])},
            created_at=created,
            detail=detail,
        )

    async def create(self, spec: VmSpec) -> VmInfo:
        vm = self.vm_dir(spec.vps_id)
        async with self._lock(spec.vps_id):
            meta = self._read_json(vm / "vm.json")
            if meta is None:
                try:
                    meta = await asyncio.to_thread(self._prepare, spec)
                except OSError as exc:
                    raise ProviderRetryable(f"cannot prepare {vm}: {exc.strerror}", provider=self.kind) from None
            else:
                log.info("local: adopting existing VM folder for vps %s", spec.vps_id)
            await self._ensure_running(vm, meta)
            return await self._info(vm, meta)

    async def get(self, ref: str) -> VmInfo | None:
        """Current state; a halted VM is relaunched first (without waiting) and reads `starting`."""
        vm = self.vm_dir(ref)
        meta = self._read_json(vm / "vm.json")
        if meta is None:
            return None
        if (vm / HALTED_FILE).exists():
            async with self._lock(ref):
                if (vm / HALTED_FILE).exists() and self._running_pid(vm) is None:
                    log.info("local: relaunching halted gateway for vps %s", ref)
                    await asyncio.to_thread(self._launch, vm, meta)
        return await self._info(vm, meta)

    async def start(self, ref: str) -> None:
        vm = self.vm_dir(ref)
        async with self._lock(ref):
            meta = self._read_json(vm / "vm.json")
            if meta is None:
                raise VmNotFound(f"local VM {ref} not found", provider=self.kind, code="not_found")
            await self._ensure_running(vm, meta)

    async def stop(self, ref: str) -> None:
        vm = self.vm_dir(ref)
        async with self._lock(ref):
            if self._read_json(vm / "vm.json") is None:
                raise VmNotFound(f"local VM {ref} not found", provider=self.kind, code="not_found")
            (vm / HALTED_FILE).unlink(missing_ok=True)  # first: a stop cut short must not come back up
            await self._terminate(vm)

    async def halt(self, ref: str) -> bool:
        """The host is going down: end the gateway but keep the VM meant to run (see the module doc).

        Returns whether there was a gateway to halt. A stopped VM stays stopped.
        """
        vm = self.vm_dir(ref)
        async with self._lock(ref):
            if self._read_json(vm / "vm.json") is None or self._pid(vm) is None:
                return False
            # The mark first: if we are killed halfway, the VM is still known to be meant to run.
            _write_private(vm / HALTED_FILE, json.dumps({"halted_at": datetime.now(UTC).isoformat()}))
            await self._terminate(vm)
            return True

    async def boot(self) -> list[str]:
        """The host came up: VMs meant to run whose process is gone went down with the previous
        host (a killed stack, a reboot); mark them halted so the next get/start/create relaunches
        them. Call it before any worker runs. Returns their refs."""
        halted: list[str] = []
        if not self.root.is_dir():
            return halted
        for meta_path in sorted(self.root.glob("*/vm.json")):
            vm = meta_path.parent
            async with self._lock(vm.name):
                if self._pid(vm) is not None and self._running_pid(vm) is None:
                    _write_private(vm / HALTED_FILE, json.dumps({"halted_at": datetime.now(UTC).isoformat()}))
                    (vm / PID_FILE).unlink(missing_ok=True)
                if (vm / HALTED_FILE).exists():
                    halted.append(vm.name)
        return halted

    async def destroy(self, ref: str) -> None:
        vm = self.vm_dir(ref)
        async with self._lock(ref):
            if not vm.exists():
                return
            await self._terminate(vm)
            try:
                await asyncio.to_thread(shutil.rmtree, vm)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ProviderRetryable(f"cannot remove {vm}: {exc.strerror}", provider=self.kind) from None
        self._locks.pop(ref, None)

    async def list_managed(self) -> list[VmInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for meta_path in sorted(self.root.glob("*/vm.json")):
            meta = self._read_json(meta_path)
            if meta and meta.get("vps_id") == meta_path.parent.name:
                out.append(await self._info(meta_path.parent, meta))
        return out

    def gateway_url(self, info: VmInfo) -> str:
        return f"http://{info.host or LOOPBACK}:{info.gateway_port}"
