"""The UI-relay identity: how the proxy presents itself to a gateway on behalf of a browser.

Provisioning pairs this identity on every gateway and the proxy connects with it, so both must use
exactly the same client id, mode, platform and scopes (a different platform triggers a
`metadata-upgrade` re-pairing, reference §6.6 T4) and an Origin the rendered config allows.
It never carries `operator.admin`: the gateway refuses admin methods by itself too.
"""

from __future__ import annotations

from openclaw.agent_env import relay_origin
from openclaw.rpc import ClientInfo

__all__ = ["RELAY_CLIENT", "RELAY_SCOPES", "control_ui_build_id", "relay_origin"]

RELAY_CLIENT = ClientInfo(id="openclaw-control-ui", mode="webchat", platform="linux",
                          display_name="slopbox-ui-relay")
RELAY_SCOPES: tuple[str, ...] = ("operator.read", "operator.write", "operator.approvals", "operator.questions")

MAX_BUILD_ID_LEN = 96
"""The gateway's schema for `client.buildId` (and `hello-ok.server.buildId`): 1..96 characters."""


def control_ui_build_id(browser_client: object) -> str | None:
    """The `client.buildId` the relay's own connect carries: the one the browser's Control UI sent.

    The gateway rejects a `openclaw-control-ui` connect whose Origin host equals its Host header
    unless `client.buildId` equals the gateway's own build id (`dist/build-info.json`, the value
    the bundled UI embeds and sends): "protocol mismatch: Control UI updated; reload this page".
    The relay sends Origin = the proxy's address and passes the browser's Host through, so a
    browser on exactly that address (the URL `slopbox dev` prints) is checked. The UI document the
    browser runs was served by this same gateway through the proxy, so its build id is the
    installed gateway's; passing it on keeps the gateway's guard meaningful (a stale tab is told to
    reload) without the proxy knowing or pinning any gateway version. Anything that is not a
    plausible id (wrong type, empty, too long, control characters) is dropped: the gateway then
    decides as it does for a UI that sent none.
    """
    if not isinstance(browser_client, dict):
        return None
    value = browser_client.get("buildId")
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > MAX_BUILD_ID_LEN or not value.isprintable():
        return None
    return value
