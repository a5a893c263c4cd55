"""Small helpers the API tests share."""

from __future__ import annotations

import uuid

import psycopg

from tests.conftest import API_KEY


def make_user(sql: psycopg.Connection, *, plan: str | None = "starter", email: str | None = None) -> uuid.UUID:
    email = email or f"u-{uuid.uuid4().hex[:8]}@example.com"
    row = sql.execute(
        "INSERT INTO users (email, name, plan_id) VALUES (%s, %s, (SELECT id FROM plans WHERE name = %s)) "
        "RETURNING id", (email, email.split("@")[0], plan)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def headers(user_id: uuid.UUID | str, key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-User-Id": str(user_id)}
