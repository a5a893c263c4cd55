"""What the Channels and Settings tabs share: the agent (or a 404), the operation a form started
(shown until it ends), and API refusals in words a user acts on.

A form that starts an operation redirects to its tab with `?op=<operation id>`; the tab shows that
operation's status and step from the API and keeps polling a small fragment until it ends.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from web.api_client import ApiError, ControlPlane
from web.pages import PageError

OP_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
UNFINISHED = ("queued", "running")
# "(DELETE /agents/…)" or "(PUT /users/me/…)": how an API client would fix it, not a person.
_API_HINT = re.compile(r"\s*\((?:[A-Z]+ )?/[^)]*\)")


async def agent_or_404(api: ControlPlane, agent_id: uuid.UUID) -> dict[str, Any]:
    """The user's agent; another user's agent is a 404 exactly like a missing one (the API says so)."""
    try:
        return await api.get(f"/agents/{agent_id}")  # type: ignore[no-any-return]
    except ApiError as err:
        if err.status == 404:
            raise PageError(404, "Agent not found", "There is no such agent in your account.") from None
        raise


async def operation(api: ControlPlane, agent_id: uuid.UUID, op: str | None) -> dict[str, Any] | None:
    """The operation named in the URL, if it is this agent's; None otherwise (a stale or forged link)."""
    if not op or not OP_ID.fullmatch(op):
        return None
    try:
        return await api.get(f"/agents/{agent_id}/operations/{op}")  # type: ignore[no-any-return]
    except ApiError:
        return None


def running(op: dict[str, Any] | None) -> bool:
    return bool(op and op.get("status") in UNFINISHED)


def plain(detail: str) -> str:
    """The API's sentence without the endpoint it names for API clients."""
    return _API_HINT.sub("", detail).strip()


def no_vps(err: ApiError) -> bool:
    return err.status == 404 and err.title == "No VPS"


def page_status(err: ApiError) -> int:
    """The status of the page that shows a refusal: a form's mistake is a 400, a missing VPS a conflict."""
    if err.status == 422:
        return 400
    return 409 if no_vps(err) else err.status


def explain(err: ApiError) -> str:
    """An API refusal as a reason and what to do about it."""
    if no_vps(err):
        return "Start the agent first: it has no VPS yet (Overview tab → Create its VPS)."
    if err.status == 409 and "not running" in err.title.lower():
        return f"Start the agent first: {plain(err.detail)} (Overview tab → Start)."
    if err.status == 409:
        return (f"{err.title}: {plain(err.detail)} If something is running, wait: this page updates when it ends.")
    if err.status == 422:
        parts = []
        for part in err.detail.split("; "):
            text = part.split(": ", 1)[1] if part.startswith("body") and ": " in part else part
            text = text.removeprefix("Value error, ")
            text = re.sub(r"credentials\.(\w+)", lambda m: m.group(1).replace("_", " "), text)
            parts.append(text[:1].upper() + text[1:])
        return "Check the form: " + "; ".join(parts)
    return f"{err.title}: {plain(err.detail)}"
