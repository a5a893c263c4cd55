"""Random faults on every call, seeded: the fake Hetzner API as a bad day looks.

    fake = ChaosHetzner(seed=8)
    fake.chaos_rate = 0.2            # a fifth of all requests fail; 0 turns chaos off
    fake.injected                    # Counter by kind: "429", "500", "503", "lost"

Kinds, equally likely: 429 with `Retry-After: 1`, 500, 503, and "lost" (the request is performed,
then answered 504, as when a response is lost on the way back and the client cannot tell).
Explicit faults (`fail_next`, `hang_next`) still come first.

Each server also gets its own loopback address (127.2.x.y), so many emulated VMs can listen on
the same gateway port side by side, like real VMs on their own public addresses.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from . import Fault
from .hetzner_api import FakeHetzner

KINDS = ("429", "500", "503", "lost")


class ChaosHetzner(FakeHetzner):
    def __init__(self, token: str = "test-token", *, seed: int = 0, rate: float = 0.0) -> None:
        super().__init__(token)
        self.chaos_rate = rate
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(seed)

    @staticmethod
    def ip_for(server_id: int) -> str:
        return f"127.2.{server_id // 200}.{server_id % 200 + 1}"

    def _new_server(self, name: str, labels: dict[str, str], location: str, server_type: str,
                    image: str | None, firewall_ids: list[int]) -> dict[str, Any]:
        server = super()._new_server(name, labels, location, server_type, image, firewall_ids)
        server["public_net"]["ipv4"]["ip"] = self.ip_for(server["id"])
        return server

    def _take_fault(self, method: str, path: str) -> Fault | None:
        explicit = super()._take_fault(method, path)
        if explicit is not None:
            return explicit
        with self.lock:
            if self.chaos_rate <= 0 or self._rng.random() >= self.chaos_rate:
                return None
            kind = self._rng.choice(KINDS)
            self.injected[kind] += 1
        if kind == "429":
            return Fault(f"{method} {path}", "fail", 1, 429, headers={"Retry-After": "1"})
        if kind == "lost":
            return Fault(f"{method} {path}", "fail", 1, 504, commit=True)
        return Fault(f"{method} {path}", "fail", 1, int(kind))
