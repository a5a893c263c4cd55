"""What a cloud VM does at first boot, done by the test on loopback.

Reads the files the control plane gave the provider (Hetzner user-data, Fly machine files),
redeems the single-use bootstrap token at the API exactly like `bootstrap.sh` would, makes the
gateway's TLS key and self-signed certificate where the rendered `gateway.tls` points, starts a
gateway simulator (HTTPS/WSS) with the redeemed token, reports ready with the certificate's
SHA-256 (in `openssl x509 -fingerprint` form), and runs the pairing step for the control plane's
public keys. `impostor=True` emulates someone else answering at the VM's address: the gateway
serves a different certificate from the one the VM reported. Only the shell script itself is not
exercised (render's own tests check it); the protocol between VM and control plane is.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway_simulator.server import run_simulator
from gateway_simulator.tls import cert_sha256, make_self_signed
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


def ensure_cert(config: dict[str, Any], conf: dict[str, str], layout: VmLayout, home: Path) -> str:
    """bootstrap.sh's `ensure_cert`: the gateway's key and self-signed certificate where the rendered
    `gateway.tls` points (`~` = the service user's HOME), made once; returns the certificate's SHA-256."""
    tls = config["gateway"]["tls"]
    assert tls["enabled"] is True and tls["autoGenerate"] is False, "a cloud gateway serves only our own TLS"
    cert, key = (Path(str(home) + tls[k].removeprefix("~")) for k in ("certPath", "keyPath"))
    assert str(cert.parent) == str(home) + conf["TLS_DIR"].removeprefix(layout.service_home)
    if cert.exists() and key.exists():
        return cert_sha256(cert)
    return make_self_signed(cert, key)


def ready_report(conf: dict[str, str], port: int, cert_hex: str, status: str = "ready") -> dict[str, Any]:
    """bootstrap.sh's `report` body; the fingerprint as its `cert_sha256` prints it (lower-case hex)."""
    return {"agent_id": conf["AGENT_ID"], "status": status, "gateway_port": port, "openclaw_version": "",
            "detail": "", "gateway_cert_sha256": cert_hex}


@asynccontextmanager
async def boot(files: dict[str, str], layout: VmLayout, api: httpx.AsyncClient, *, port: int,
               state_dir: Path, impostor: bool = False,
               after_redeem: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[dict[str, Any]]:
    """`after_redeem` runs between the redemption and the ready report (a gateway's start-up time)."""
    conf = parse_conf(files[layout.bootstrap_conf])
    token = files[layout.bootstrap_token_file].strip()
    path = conf["BOOTSTRAP_URL"].split("://", 1)[1].split("/", 1)[1]  # host is the control plane = `api`
    auth = {"Authorization": f"Bearer {token}"}
    redeemed = await api.post(f"/{path}/redeem", headers=auth)
    assert redeemed.status_code == 200, redeemed.text
    secrets = redeemed.json()
    again = await api.post(f"/{path}/redeem", headers=auth)
    assert again.status_code == 401, "a bootstrap token must be single-use"
    if after_redeem is not None:
        await after_redeem()
    config = json.loads(files[f"{layout.seed_dir}/openclaw.json"])
    config["gateway"]["bind"] = "loopback"  # the emulated VM's only network is loopback
    gateway_token = secrets["env"]["OPENCLAW_GATEWAY_TOKEN"]
    home = state_dir / "home"  # the service user's HOME: where `~` in gateway.tls points
    served = ensure_cert(config, conf, layout, home)  # bootstrap.sh: openssl req -x509 ...
    reported = make_self_signed(state_dir / "other" / "cert.pem", state_dir / "other" / "key.pem") \
        if impostor else served
    # The redeemed env file, as the gateway service would load it, and the service's HOME.
    env = {**os.environ, **secrets["env"], "HOME": str(home)}
    async with run_simulator(state_dir / "state", port=port, token=gateway_token, config=config, env=env) as sim:
        assert sim.cert_sha256 == served and sim.url.startswith("wss://")
        openssl_form = ":".join(reported[i:i + 2] for i in range(0, 64, 2)).upper()
        ready = await api.post(f"/{path}/ready", headers=auth,
                               json=ready_report(conf, port, f"sha256 Fingerprint={openssl_form}"))
        assert ready.status_code == 204, ready.text
        # The VM pairs through its own loopback listener (the CLI on a real VM).
        pairing = asyncio.create_task(approve_device_keys(
            sim.url, token=gateway_token, public_keys=secrets["pair_public_keys"], timeout=60, poll_interval=0.2,
            cert_sha256=served))
        try:
            yield {"secrets": secrets, "sim": sim, "conf": conf, "cert_sha256": served, "reported": reported}
        finally:
            pairing.cancel()


__all__ = ["FLY_LAYOUT", "SYSTEMD_LAYOUT", "boot", "ensure_cert", "files_from_cloud_init", "files_from_fly_config",
           "ready_report"]
