"""`slopbox user create` / `slopbox user admin`: operators add users (Auth.js creates them in production)
and grant or revoke the admin flag. No API route grants it: whoever holds the API key could
otherwise make any user an admin. `slopbox user exempt` exempts a user from usage enforcement."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text


class UserError(RuntimeError):
    pass


def create_user(sync_url: str, *, email: str, plan: str | None, admin: bool, name: str | None = None,
                exist_ok: bool = False) -> uuid.UUID:
    email = email.strip().lower()
    if "@" not in email or len(email) > 255:
        raise UserError(f"not an email address: {email!r}")
    engine = create_engine(sync_url)
    try:
        with engine.begin() as conn:
            plan_id = None
            if plan is not None:
                plan_id = conn.execute(text("SELECT id FROM plans WHERE name = :n"), {"n": plan}).scalar()
                if plan_id is None:
                    names = ", ".join(conn.execute(text("SELECT name FROM plans ORDER BY name")).scalars())
                    raise UserError(f"no plan named {plan!r} (plans: {names or 'none; run slopbox migrate'})")
            existing = conn.execute(text("SELECT id FROM users WHERE email = :e"), {"e": email}).scalar()
            if existing is not None:
                if not exist_ok:
                    raise UserError(f"a user with email {email} already exists: {existing}")
                return existing  # type: ignore[no-any-return]
            return conn.execute(  # type: ignore[no-any-return]
                text("INSERT INTO users (email, name, plan_id, is_admin) VALUES (:e, :n, :p, :a) RETURNING id"),
                {"e": email, "n": name or email.split("@")[0], "p": plan_id, "a": admin},
            ).scalar_one()
    finally:
        engine.dispose()


def set_admin(sync_url: str, *, email: str, admin: bool) -> uuid.UUID:
    """Grant (or revoke) the admin flag of an existing user, by email."""
    return _set_flag(sync_url, email=email, column="is_admin", value=admin)


def set_usage_exempt(sync_url: str, *, email: str, exempt: bool) -> uuid.UUID:
    """Set `users.usage_exempt`: an exempt user is never stopped, refused a start or cut off for usage
    (billing/overage.py); their usage is still counted, and warned about."""
    return _set_flag(sync_url, email=email, column="usage_exempt", value=exempt)


_SET_FLAG = {column: text(f"UPDATE users SET {column} = :v WHERE lower(email) = :e RETURNING id")  # noqa: S608
             for column in ("is_admin", "usage_exempt")}


def _set_flag(sync_url: str, *, email: str, column: str, value: bool) -> uuid.UUID:
    email = email.strip().lower()
    engine = create_engine(sync_url)
    try:
        with engine.begin() as conn:
            user_id = conn.execute(_SET_FLAG[column], {"v": value, "e": email}).scalar()
    finally:
        engine.dispose()
    if user_id is None:
        raise UserError(f"no user with email {email}")
    return user_id  # type: ignore[no-any-return]
