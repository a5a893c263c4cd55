"""`python -m tests.fault_figures [--size 20] [--rate 0.2] [--seed 8]`: the provider-fault figures.

Runs the scenario of `test_provider_faults_across_concurrent_provisions` at the size you choose,
on its own embedded PostgreSQL and Temporal dev server: N concurrent provisions against the fake
Hetzner API while `rate` of all its calls fail (429, 500, 503, or performed-then-504), emulated VMs
booting from the user-data they were given, then one Reconcile run. Prints operations run and how
they ended, faults injected by kind, VMs whose bootstrap token was refused while provisioning,
VMs left behind after Reconcile, and VPSes in a wrong state. Exit status 1 when any of the last
three is non-zero. The seed fixes which requests fail (in arrival order; concurrency still varies
the order a little from run to run).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid

import psycopg
from cryptography.fernet import Fernet

from bench.stack import standalone_stack
from settings import Settings
from tests.conftest import API_KEY
from tests.fault_harness import ChaosFigures, run_chaos
from tests.helpers import make_user


async def main(size: int, rate: float, seed: int) -> ChaosFigures:
    async with standalone_stack("slopbox-faults-", remove=True) as stack:
        settings = Settings(database_url=stack.database_url, control_plane_api_key=API_KEY,
                            encryption_keys=[Fernet.generate_key().decode()],
                            temporal_address=stack.temporal_address,
                            temporal_task_queue=f"tq-{uuid.uuid4().hex[:8]}", data_dir=stack.tmp / "data",
                            openclaw_bin=None, hcloud_token=None, fly_api_token=None)
        with psycopg.connect(stack.database_url, autocommit=True) as sql:
            return await run_chaos(settings, stack.temporal.client, lambda: make_user(sql, plan="starter"),
                                   size=size, rate=rate, seed=seed, workdir=stack.tmp)


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20, help="concurrent provisions (default 20)")
    parser.add_argument("--rate", type=float, default=0.2, help="share of provider calls that fail (default 0.2)")
    parser.add_argument("--seed", type=int, default=8, help="random seed for the faults (default 8)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    figures = asyncio.run(main(args.size, args.rate, args.seed))
    print(f"size {args.size}, fault rate {args.rate:.0%}, seed {args.seed}")
    print("\n".join(figures.lines()))
    return 1 if figures.left_behind or figures.wrong_states or figures.broken_vms else 0


if __name__ == "__main__":
    sys.exit(cli())
