"""What a cloud VM does at first boot, done by the test on loopback.

Reads the files the control plane gave the provider (Hetzner user-data, Fly machine files),
redeems the single-use bootstrap token at the API exactly like `bootstrap.sh` would, starts a
gateway simulator with the redeemed token, runs the pairing step for the control plane's public
keys, and reports ready. Only the shell script itself is not exercised (render's own tests
check it); the protocol between VM and control plane is.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import shlex
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway_simulator.server import run_simulator
from openclaw.pairing import approve_device_keys
from openclaw.render import FLY_LAYOUT, SYSTEMD_LAYOUT, VmLayout


def files_from_cloud_init(user_data: str) -> dict[str, str]:
    doc = yaml.safe_load(user_data)
    out = {}
    for entry in doc["write_files"]:
        content = entry["content"]
        if entry.get("encoding") == "gz+b64":
            content = gzip.decompress(base64.b64decode(content)).decode()
        elif entry.get("encoding") == "b64":
            content = base64.b64decode(content).decode()
        out[entry["path"]] = content
    return out


def files_from_fly_config(config: dict[str, Any]) -> dict[str, str]:
    return {f["guest_path"]: base64.b64decode(f["raw_value"]).decode() for f in config.get("files") or []}


def parse_conf(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, raw = line.partition("=")
            values[key] = shlex.split(raw)[0] if raw else ""
    return values


@asynccontextmanager
async def boot(files: dict[str, str], layout: VmLayout, api: httpx.AsyncClient, *, port: int,
               state_dir: Path) -> AsyncIterator[dict[str, Any]]:
    conf = parse_conf(files[layout.bootstrap_conf])
    token = files[layout.bootstrap_token_file].strip()
    path = conf["BOOTSTRAP_URL"].split("://", 1)[1].split("/", 1)[1]  # host is the control plane = `api`
    auth = {"Authorization": f"Bearer {token}"}
    redeemed = await api.post(f"/{path}/redeem", headers=auth)
    assert redeemed.status_code == 200, redeemed.text
    secrets = redeemed.json()
    again = await api.post(f"/{path}/redeem", headers=auth)
    assert again.status_code == 401, "a bootstrap token must be single-use"
    config = json.loads(files[f"{layout.seed_dir}/openclaw.json"])
    config["gateway"]["bind"] = "loopback"  # the emulated VM's only network is loopback
    gateway_token = secrets["env"]["OPENCLAW_GATEWAY_TOKEN"]
    env = {**os.environ, **secrets["env"]}  # the redeemed env file, as the gateway service would load it
    async with run_simulator(state_dir, port=port, token=gateway_token, config=config, env=env) as sim:
        pairing = asyncio.create_task(approve_device_keys(
            sim.url, token=gateway_token, public_keys=secrets["pair_public_keys"], timeout=60, poll_interval=0.2))
        ready = await api.post(f"/{path}/ready", headers=auth)
        assert ready.status_code == 204, ready.text
        try:
            yield {"secrets": secrets, "sim": sim, "conf": conf}
        finally:
            pairing.cancel()


__all__ = ["FLY_LAYOUT", "SYSTEMD_LAYOUT", "boot", "files_from_cloud_init", "files_from_fly_config"]
