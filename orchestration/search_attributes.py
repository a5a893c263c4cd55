"""Search attributes on every run, so operators can find a user's operations in the Temporal UI."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

USER_ID = SearchAttributeKey.for_keyword("UserId")
AGENT_ID = SearchAttributeKey.for_keyword("AgentId")
VPS_ID = SearchAttributeKey.for_keyword("VpsId")
SEARCH_ATTRIBUTES = [USER_ID, AGENT_ID, VPS_ID]


def run_attributes(*, user_id: str, agent_id: str | None = None, vps_id: str | None = None) -> TypedSearchAttributes:
    pairs = [SearchAttributePair(USER_ID, user_id)]
    if agent_id:
        pairs.append(SearchAttributePair(AGENT_ID, agent_id))
    if vps_id:
        pairs.append(SearchAttributePair(VPS_ID, vps_id))
    return TypedSearchAttributes(pairs)
