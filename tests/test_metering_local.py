"""The local collector reads a real process tree from /proc: CPU as a counter, memory held over the window."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from metering.collectors import LocalCollector, Window, process_tree_usage

pytestmark = pytest.mark.asyncio(loop_scope="session")

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(60)"


def _start_stat(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2:].split()[19]


async def test_local_collector_counts_cpu_once_and_memory(tmp_path: Path) -> None:
    vps_id = str(uuid.uuid4())
    # A gateway with a child process: the tree's CPU is counted, the child's too.
    proc = subprocess.Popen([sys.executable, "-c",  # noqa: ASYNC220 (starting it does not block)
                             f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {BUSY!r}])\n"
                             f"exec({BUSY!r})"])
    try:
        vm = tmp_path / "vms" / vps_id
        vm.mkdir(parents=True)
        (vm / "gateway.pid").write_text(json.dumps({"pid": proc.pid, "start_time": _start_stat(proc.pid)}))
        deadline = time.monotonic() + 20
        while (usage := process_tree_usage(proc.pid)) is None or usage[0] < 700:
            assert time.monotonic() < deadline, usage
            await asyncio.sleep(0.1)
        collector = LocalCollector(tmp_path)
        first = (await collector.collect([Window(vps_id, vps_id, 1000, 1060, 1024)])).collected[0]
        a = first.samples[0].amounts
        assert a.cpu_ms >= 700 and a.memory_mb_seconds > 0 and first.until == 1060
        assert (first.samples[0].start, first.samples[0].end) == (1000, 1060)
        # The next window starts from the stored counter: the CPU already counted is not counted again.
        second = (await collector.collect([Window(vps_id, vps_id, 1060, 1120, 1024, counter_ref=first.counter_ref,
                                                  counter_cpu_ms=first.counter_cpu_ms)])).collected[0]
        assert second.samples[0].amounts.cpu_ms < 100
        # A restarted gateway (another pid/start time) counts from zero, not from a negative delta.
        other = (await collector.collect([Window(vps_id, vps_id, 1120, 1180, 1024, counter_ref="1:1",
                                                 counter_cpu_ms=10**9)])).collected[0]
        assert other.samples[0].amounts.cpu_ms >= 700
    finally:
        proc.kill()
        proc.wait()
    stopped = (await LocalCollector(tmp_path).collect([Window(vps_id, vps_id, 1180, 1240, 1024, counter_ref="x",
                                                              counter_cpu_ms=5)])).collected[0]
    assert stopped.samples == [] and stopped.until == 1240 and stopped.counter_ref == "x"  # nothing ran, kept
