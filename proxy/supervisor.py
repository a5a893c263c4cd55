"""`PROXY_PROCESSES` > 1: N proxy workers on the same ports, and a supervisor that keeps N alive.

Why processes: one Python event loop uses one core; the proxy is CPU-bound under load (HTTP
parsing, TLS, JSON of client frames). Each worker binds the gateway and forward ports with
SO_REUSEPORT, so the kernel spreads new connections over them with no hand-off in user space,
and a worker that dies loses only its own connections. Per-user rate limits are shared through
PostgreSQL (`proxy.shared_limits`); connection caps (`PROXY_MAX_CONNECTIONS*`, WebSockets per user)
stay per worker.

The supervisor forks the workers before any event loop or database connection exists (so
nothing is shared that must not be), replaces one that exits (after 1 s, up to 30 s when a
worker keeps dying at once), and on SIGTERM/SIGINT passes SIGTERM on and waits for every worker
to flush its meter. Worker i serves /metrics on `PROXY_METRICS_PORT + i`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from settings import Settings

__all__ = ["supervise"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_STOP_TIMEOUT_S = 30.0
_POLL_S = 0.2


def _worker(target: Callable[[Settings, int], None], settings: Settings, index: int) -> None:
    # A worker whose supervisor is killed outright stops too, instead of serving unsupervised.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    target(settings, index)


def supervise(settings: Settings, target: Callable[[Settings, int], None], *,
              processes: int | None = None) -> None:
    """Run `target(settings, i)` in `processes` forked workers until SIGTERM/SIGINT; replace dead ones."""
    count = processes or settings.proxy_processes
    ctx = multiprocessing.get_context("fork")
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers: dict[int, BaseProcess] = {}
    started: dict[int, float] = {}
    failures: dict[int, int] = {}
    restart_at: dict[int, float] = {}

    def start(index: int) -> None:
        proc = ctx.Process(target=_worker, args=(target, settings, index), name=f"slopbox-proxy-{index}")
        proc.start()
        workers[index] = proc
        started[index] = time.monotonic()
        log.info("proxy worker started", extra={"worker": index, "pid": proc.pid})

    for index in range(count):
        start(index)
    log.info("proxy supervisor running", extra={"processes": count})
    while not stopping:
        time.sleep(_POLL_S)
        now = time.monotonic()
        for index, proc in list(workers.items()):
            if proc.is_alive() or stopping:
                continue
            if index not in restart_at:
                quick = now - started[index] < 5.0
                failures[index] = failures.get(index, 0) + 1 if quick else 0
                delay = min(30.0, 2.0 ** failures[index]) if quick else 1.0
                restart_at[index] = now + delay
                log.warning("proxy worker exited; replacing it", extra={
                    "worker": index, "pid": proc.pid, "exitcode": proc.exitcode, "restart_in_s": delay})
            elif now >= restart_at[index]:
                del restart_at[index]
                proc.close()
                start(index)
    for proc in workers.values():
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in workers.values():
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("proxy worker did not stop in time; killing it", extra={"pid": proc.pid})
            proc.kill()
            proc.join(5.0)
    log.info("proxy supervisor stopped", extra={"processes": count})
