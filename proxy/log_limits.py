"""Rate-limited logging for the lines an attacker can make us write.

Why: when accept() failed for lack of descriptors, asyncio logged the failure with a traceback on
every retry and the proxy's log grew about 300 MB a minute. The listener caps (proxy.listener) keep
accept() from failing that way, but the same class of line (asyncio's loop errors, aiohttp's
per-connection errors, our own per-frame refusals) must never be able to fill a disk: each distinct
message (logger, level, first line of the template) is let through `burst` times per window, the
rest are counted, and the next line let through carries `suppressed=N`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LIMITED_LOGGERS", "LogRateLimit", "install_log_limits"]

LIMITED_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal",
                   "aiohttp.websocket", "aiohttp.client", "proxy.ws_relay", "proxy.forward", "proxy.gateway.refusals")


@dataclass
class _Window:
    start: float
    passed: int
    suppressed: int


class LogRateLimit(logging.Filter):
    """At most `burst` records per message template per `window_s`; the rest are counted."""

    def __init__(self, *, burst: int = 20, window_s: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[tuple[str, int, str], _Window] = OrderedDict()
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:160])
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.window_s:
            if window is not None and window.suppressed:
                record.suppressed = window.suppressed
            self._windows[key] = _Window(now, 1, 0)
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
            return True
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.suppressed += 1
        self.suppressed_total += 1
        return False


def install_log_limits(limit: LogRateLimit | None = None,
                       names: tuple[str, ...] = LIMITED_LOGGERS) -> Callable[[], None]:
    """Attach one shared filter to the noisy loggers; returns the function that removes it again."""
    limit = limit or LogRateLimit()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(limit)

    def remove() -> None:
        for logger in loggers:
            logger.removeFilter(limit)

    return remove
