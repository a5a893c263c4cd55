"""Structured logs: one JSON object per line, with the request id when there is one."""
