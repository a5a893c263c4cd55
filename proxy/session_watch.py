"""Which open Control UI sockets still have a session: one batched query per sweep.

Why: an open WebSocket was re-checked once a minute, so it kept working up to ~60 s after
logout (Auth.js deletes the `sessions` row) or expiry. The gateway proxy now asks every
`session_sweep_s` (2 s) which of its open sockets' session tokens still exist unexpired, in one
statement for all of them (`"sessionToken" = ANY(...)`, an index lookup per token on the unique
index), and closes the sockets whose session is gone; expiry is also checked locally, without the
database, from the expiry the socket was opened with. Ownership and VM state keep the slower
full re-check (`session_recheck_s`).
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import String, any_, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncEngine

from db.models import AuthSession

__all__ = ["SessionWatch"]

_TOKENS = bindparam("tokens", type_=ARRAY(String))


class SessionWatch:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._stmt = (
            select(AuthSession.session_token)  # type: ignore[call-overload]
            .where(AuthSession.session_token == any_(_TOKENS), AuthSession.expires > func.now())
        )

    async def live(self, tokens: Collection[str]) -> set[str]:
        """The tokens among `tokens` whose session exists and has not expired."""
        if not tokens:
            return set()
        async with self._engine.connect() as conn:
            rows = await conn.execute(self._stmt, {"tokens": list(tokens)})
            return {row[0] for row in rows}
