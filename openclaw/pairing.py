"""One-shot approval of the control plane's device keys, run on the gateway's own host.

Why: a remote operator device gets `NOT_PAIRED / PAIRING_REQUIRED` until someone approves it, and in
token mode no config key auto-approves a remote operator (reference §6.1). The documented, version
-stable fix (reference §6.3 / §6.7 "(c)") is a pairing step *on the VM*: connect on loopback as
`gateway-client`/`backend` with the gateway token (the local backend path keeps all scopes without a
device), find the pending requests whose `deviceId` **and** `publicKey` equal keys the control plane
registered, approve exactly those, and exit. Nothing else is ever approved.

How each provider runs it:

- **local provider** (gateways on this machine): call `approve_device_keys(ws_url, token=...,
  public_keys=[admin_pub, ui_relay_pub])` after starting the gateway and while the control plane
  retries its connect (each retry re-creates the pending request if needed). Works the same against
  the real gateway and the simulator.
- **Hetzner / Fly VM at boot**: the VM has the gateway token (fetched with its bootstrap token) and the
  control plane's *public* keys (not secret; they may sit in cloud-init user_data / Fly machine
  config). A systemd oneshot `openclaw-pair.service` (`After=openclaw-gateway.service`,
  `Restart=on-failure`) runs either
  `python -m openclaw.pairing --url ws://127.0.0.1:18789 --public-key <b64url> ... --timeout 900`
  (token from `OPENCLAW_GATEWAY_TOKEN`) when the image ships this package, or the shell script from
  `boot_pairing_script(...)`, which uses only the `openclaw` CLI (`openclaw devices list --json`,
  `openclaw devices approve <requestId> --json`) and `node` for JSON, both already on the VM.
  The unit exits once every key is paired; the control plane then stops seeing PAIRING_REQUIRED,
  gets `auth.deviceToken` in hello-ok and stores it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openclaw.device import b64url_encode, decode_public_key, device_id_for_public_key
from openclaw.rpc import (
    DEFAULT_OPERATOR_SCOPES,
    ClientInfo,
    GatewayClient,
    GatewayTimeoutError,
)

__all__ = ["PairingResult", "approve_device_keys", "boot_pairing_script", "main", "wanted_devices"]

log = logging.getLogger(__name__)


@dataclass
class PairingResult:
    approved: dict[str, dict[str, Any]] = field(default_factory=dict)  # deviceId -> approved device record
    already_paired: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)  # deviceIds never seen before the deadline

    @property
    def complete(self) -> bool:
        return not self.missing


def wanted_devices(public_keys: Iterable[str | bytes]) -> dict[str, bytes]:
    """deviceId -> raw key for base64url/PEM strings or raw 32-byte keys."""
    out: dict[str, bytes] = {}
    for key in public_keys:
        raw = key if isinstance(key, bytes) else decode_public_key(key)
        out[device_id_for_public_key(raw)] = raw
    return out


def _same_key(value: Any, raw: bytes) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return decode_public_key(value) == raw
    except ValueError:
        return False


def _has_operator_token(record: Mapping[str, Any]) -> bool:
    tokens = record.get("tokens")
    if isinstance(tokens, list):
        return any(isinstance(t, Mapping) and t.get("role") == "operator" and not t.get("revokedAtMs") for t in tokens)
    return False


async def approve_device_keys(
    url: str,
    *,
    token: str,
    public_keys: Sequence[str | bytes],
    timeout: float = 120.0,  # noqa: ASYNC109 (overall deadline of the pairing step)
    poll_interval: float = 2.0,
    headers: Mapping[str, str] | None = None,
    cert_sha256: str | None = None,
) -> PairingResult:
    """Approve the pending requests for exactly these keys; wait up to `timeout` for them to appear.

    A key counts as done when its device is paired with an operator token (approved now or earlier).
    Requests from any other device are left pending. Returns what was approved and what is missing.
    """
    wanted = wanted_devices(public_keys)
    result = PairingResult(missing=set(wanted))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = GatewayClient(
        url,
        token=token,
        client=ClientInfo(id="gateway-client", mode="backend", display_name="slopbox-pairing"),
        scopes=DEFAULT_OPERATOR_SCOPES,
        headers=headers,
        connect_timeout=max(1.0, min(30.0, timeout)),
        cert_sha256=cert_sha256,
    )
    async with client:
        with client.subscribe("device.pair.requested") as requested:
            while result.missing:
                listing = await client.device_pair_list()
                for record in listing.get("paired") or []:
                    device_id = record.get("deviceId")
                    if device_id in result.missing and _same_key(record.get("publicKey"), wanted[device_id]):
                        if _has_operator_token(record):
                            result.missing.discard(device_id)
                            if device_id not in result.approved:
                                result.already_paired.add(device_id)
                for request in listing.get("pending") or []:
                    device_id = request.get("deviceId")
                    if device_id not in result.missing or not _same_key(request.get("publicKey"), wanted[device_id]):
                        continue
                    approved = await client.device_pair_approve(str(request["requestId"]))
                    log.info("approved pairing request for device %s…", device_id[:12])
                    result.approved[device_id] = approved.get("device") or {}
                    result.missing.discard(device_id)
                remaining = deadline - loop.time()
                if not result.missing or remaining <= 0:
                    break
                try:  # wake up early when a new request arrives
                    await requested.get(timeout=min(poll_interval, remaining))
                except GatewayTimeoutError:
                    pass
    return result


def boot_pairing_script(
    public_keys: Sequence[str | bytes],
    *,
    port: int = 18789,
    timeout_s: int = 900,
    openclaw_bin: str = "openclaw",
    interval_s: int = 3,
) -> str:
    """A POSIX sh script for a VM without this package: approve exactly these device keys, then exit 0.

    It expects `OPENCLAW_GATEWAY_TOKEN` (and the usual OPENCLAW_STATE_DIR/OPENCLAW_CONFIG_PATH) in the
    environment, like the gateway's own unit. Exit 1 if the keys were not all paired in time.
    """
    wanted = {device_id: b64url_encode(raw) for device_id, raw in wanted_devices(public_keys).items()}
    selector = (
        "const want=JSON.parse(process.argv[1]);let d='';process.stdin.on('data',c=>d+=c).on('end',()=>{"
        "const l=JSON.parse(d);const ok=new Set((l.paired||[]).filter(p=>want[p.deviceId]===p.publicKey&&"
        "(p.tokens||[]).some(t=>t.role==='operator'&&!t.revokedAtMs)).map(p=>p.deviceId));"
        "const ids=(l.pending||[]).filter(r=>want[r.deviceId]===r.publicKey&&!ok.has(r.deviceId)).map(r=>r.requestId);"
        "console.log(JSON.stringify({done:Object.keys(want).every(k=>ok.has(k)),approve:ids}));});"
    )
    ids = (
        "let d='';process.stdin.on('data',c=>d+=c).on('end',()=>{"
        "try{console.log(JSON.parse(d).approve.join(' '))}catch(e){}})"
    )
    return f"""#!/bin/sh
# Slopbox one-shot pairing: approve only the control plane's device keys on this gateway.
set -u
OPENCLAW={shlex.quote(openclaw_bin)}
export OPENCLAW_GATEWAY_PORT={int(port)}
WANT={shlex.quote(json.dumps(wanted, separators=(",", ":")))}
SELECT={shlex.quote(selector)}
IDS={shlex.quote(ids)}
deadline=$(( $(date +%s) + {int(timeout_s)} ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  plan=$("$OPENCLAW" devices list --json 2>/dev/null | node -e "$SELECT" "$WANT") || plan=''
  case "$plan" in
    *'"done":true'*) echo "slopbox pairing: all control-plane keys paired"; exit 0 ;;
  esac
  for id in $(printf '%s' "$plan" | node -e "$IDS"); do
    "$OPENCLAW" devices approve "$id" --json >/dev/null && echo "slopbox pairing: approved $id"
  done
  sleep {int(interval_s)}
done
echo "slopbox pairing: timed out waiting for control-plane pairing requests" >&2
exit 1
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openclaw.pairing", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:18789/")
    parser.add_argument("--public-key", action="append", required=True, help="base64url Ed25519 key (repeatable)")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    token = os.environ.get("OPENCLAW_GATEWAY_TOKEN")
    if not token:
        print("OPENCLAW_GATEWAY_TOKEN is required", file=sys.stderr)  # noqa: T201
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    result = asyncio.run(approve_device_keys(args.url, token=token, public_keys=args.public_key, timeout=args.timeout))
    summary = {
        "approved": sorted(result.approved),
        "alreadyPaired": sorted(result.already_paired),
        "missing": sorted(result.missing),
    }
    print(json.dumps(summary))  # noqa: T201
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
