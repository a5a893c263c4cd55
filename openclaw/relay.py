"""The UI-relay identity: how the proxy presents itself to a gateway on behalf of a browser.

Provisioning pairs this identity on every gateway and the proxy connects with it, so both must use
exactly the same client id, mode, platform and scopes (a different platform triggers a
`metadata-upgrade` re-pairing, reference §6.6 T4) and an Origin the rendered config allows.
It never carries `operator.admin`: the gateway refuses admin methods by itself too.
"""

from __future__ import annotations

from openclaw.agent_env import relay_origin
from openclaw.rpc import ClientInfo

__all__ = ["RELAY_CLIENT", "RELAY_SCOPES", "relay_origin"]

RELAY_CLIENT = ClientInfo(id="openclaw-control-ui", mode="webchat", platform="linux",
                          display_name="slopbox-ui-relay")
RELAY_SCOPES: tuple[str, ...] = ("operator.read", "operator.write", "operator.approvals", "operator.questions")
