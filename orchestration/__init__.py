"""How every process reaches Temporal: one task queue, one data converter, three search attributes."""

from orchestration.search_attributes import AGENT_ID, SEARCH_ATTRIBUTES, USER_ID, VPS_ID

__all__ = ["AGENT_ID", "SEARCH_ATTRIBUTES", "USER_ID", "VPS_ID"]
