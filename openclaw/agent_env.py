"""From an agent's row and the settings to the renderer's input and the gateway's secret env.

Shared by the activities (local gateways get the env directly) and the API's bootstrap
redemption (cloud VMs get it once, in exchange for their single-use token), so both hand a
gateway exactly the same secrets.
"""

from __future__ import annotations

import hashlib
import hmac

from db.models import Agent
from openclaw.render import AgentRenderInput, render_env_vars
from settings import Settings

DEFAULT_MODEL = "anthropic/claude-sonnet-5"


def hooks_token(gateway_token: str) -> str:
    """Derived, so it needs no column of its own, and differs from the gateway token."""
    return hmac.new(gateway_token.encode(), b"openclaw-hooks-token", hashlib.sha256).hexdigest()


def relay_origin(settings: Settings) -> str:
    """The Origin the proxy's UI relay sends upstream; the rendered `allowedOrigins` lists exactly it."""
    return f"http://{settings.proxy_host}:{settings.proxy_port}"


def render_input(settings: Settings, agent: Agent, *, local: bool) -> AgentRenderInput:
    return AgentRenderInput(
        agent_id=str(agent.id),
        agent_name=agent.name,
        model=agent.model or DEFAULT_MODEL,
        personality=dict(agent.personality or {}),
        bind="loopback" if local else "lan",
        allowed_origins=[relay_origin(settings)],
        trusted_proxies=["127.0.0.1"] if local else list(settings.control_plane_ips),
        control_plane_public_url=settings.control_plane_public_url,
        forward_proxy_url=forward_proxy_url(settings, local=local),
    )


def forward_proxy_url(settings: Settings, *, local: bool) -> str | None:
    """Where the agent's outbound traffic goes (metered, plan-enforced, SSRF-guarded by proxy/)."""
    if local:
        return f"http://127.0.0.1:{settings.forward_proxy_port}"
    return settings.forward_proxy_public_url


def gateway_env(settings: Settings, agent: Agent, *, local: bool) -> dict[str, str]:
    """The gateway's secret env: gateway and hooks tokens plus the LLM keys that are configured."""
    secrets = {
        "OPENCLAW_GATEWAY_TOKEN": str(agent.gateway_token),
        "OPENCLAW_HOOKS_TOKEN": hooks_token(str(agent.gateway_token)),
    }
    secrets.update({k: v.get_secret_value() for k, v in settings.llm_api_keys().items()})
    return render_env_vars(render_input(settings, agent, local=local), secrets)
