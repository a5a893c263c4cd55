"""Child processes that die with their parent, and an orderly stop."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGTERM to the child if the supervisor is killed outright."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn(cmd: list[str], *, log_path: Path, env: dict[str, str] | None = None,
          new_session: bool = True, **kwargs: object) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115  (the child owns it)
    try:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session,
            preexec_fn=_die_with_parent, **kwargs,  # type: ignore[call-overload]  # noqa: PLW1509
        )
    finally:
        log.close()


def terminate(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Signal the child's whole process group, then SIGKILL what is left after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
