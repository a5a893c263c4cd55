"""OpenClaw gateway protocol v4: device identity, the async RPC client and pairing helpers.

Modules of the protocol side (config rendering lives beside them):
- `openclaw.device`  Ed25519 device identity and the v3 connect signature (no I/O; safe anywhere).
- `openclaw.rpc`     `GatewayClient`, the WebSocket RPC client activities use (websockets).
- `openclaw.probe`   `/readyz` polling over HTTP (httpx).
- `openclaw.pairing` one-shot approval of the control plane's device keys on the gateway host.

Nothing is imported here so that importing `openclaw.device` never pulls in network libraries.
"""
