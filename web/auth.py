"""Email + password accounts on the Auth.js tables, the way an Auth.js adapter would use them.

Sessions are Auth.js v5 database sessions: a random token in `sessions."sessionToken"`, sent raw
in `authjs.session-token` (`__Secure-authjs.session-token` over https), so the proxy, and a future
Next.js + Auth.js frontend, accept the same cookie. Verification tokens are stored hashed, as
Auth.js does, so a database read does not yield a working link. Password-reset tokens live in the
same `verification_token` table under the identifier `reset:<email>` and are hashed with a
different prefix, so a reset link can never verify an address and a verification link can never
reset a password.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.responses import Response

from db.models import Account, AuthSession, User, VerificationToken

SESSION_MAX_AGE = timedelta(days=30)  # Auth.js's default maxAge
SESSION_UPDATE_AGE = timedelta(days=1)  # ... and updateAge (sliding expiry, at most one write a day)
VERIFY_MAX_AGE = timedelta(hours=24)
RESET_MAX_AGE = timedelta(hours=1)
RESET_PREFIX = "reset:"
PLAIN_COOKIE = "authjs.session-token"
SECURE_COOKIE = "__Secure-authjs.session-token"

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def cookie_name(secure: bool) -> str:
    return SECURE_COOKIE if secure else PLAIN_COOKIE


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(stored: str | None, password: str) -> bool:
    """argon2 verify; an account without a password costs the same hash, so timing does not tell."""
    try:
        return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def normalize_email(email: str) -> str:
    return email.strip().lower()


def valid_email(email: str) -> bool:
    """What sign-up accepts: one address, no whitespace, and no ':' (never in an unquoted address, and
    it keeps `reset:<email>` identifiers apart from every possible email)."""
    return ("@" in email and 3 <= len(email) <= 255 and ":" not in email
            and not any(c.isspace() or ord(c) < 32 for c in email))


def _token_hash(raw: str, purpose: str = "") -> str:
    return hashlib.sha256((purpose + raw).encode()).hexdigest()


async def user_by_email(db: AsyncSession, email: str) -> User | None:
    return (await db.exec(select(User).where(User.email == email))).first()


async def new_verification_token(db: AsyncSession, email: str) -> str:
    """Replaces any earlier token of this address; returns the raw token for the link."""
    raw = secrets.token_urlsafe(32)
    await db.exec(delete(VerificationToken).where(VerificationToken.identifier == email))  # type: ignore[arg-type]
    db.add(VerificationToken(identifier=email, token=_token_hash(raw), expires=datetime.now(UTC) + VERIFY_MAX_AGE))
    return raw


async def use_verification_token(db: AsyncSession, email: str, raw: str) -> bool:
    """Single use (Auth.js's useVerificationToken deletes and returns in one statement)."""
    row = (await db.exec(
        delete(VerificationToken)
        .where(VerificationToken.identifier == email, VerificationToken.token == _token_hash(raw))  # type: ignore[arg-type]
        .returning(VerificationToken.expires))).first()  # type: ignore[arg-type]
    return row is not None and row[0] > datetime.now(UTC)


async def new_reset_token(db: AsyncSession, email: str) -> str:
    """A password-reset token (1 h, single use); replaces any earlier reset token of this address."""
    raw = secrets.token_urlsafe(32)
    identifier = RESET_PREFIX + email
    await db.exec(delete(VerificationToken).where(VerificationToken.identifier == identifier))  # type: ignore[arg-type]
    db.add(VerificationToken(identifier=identifier, token=_token_hash(raw, RESET_PREFIX),
                             expires=datetime.now(UTC) + RESET_MAX_AGE))
    return raw


async def use_reset_token(db: AsyncSession, email: str, raw: str) -> bool:
    """Single use: deleted whether or not it had expired."""
    if not raw or len(raw) > 255:
        return False
    row = (await db.exec(
        delete(VerificationToken)
        .where(VerificationToken.identifier == RESET_PREFIX + email,  # type: ignore[arg-type]
               VerificationToken.token == _token_hash(raw, RESET_PREFIX))  # type: ignore[arg-type]
        .returning(VerificationToken.expires))).first()  # type: ignore[arg-type]
    return row is not None and row[0] > datetime.now(UTC)


async def create_session(db: AsyncSession, user_id: uuid.UUID) -> tuple[str, datetime]:
    token = str(uuid.uuid4())  # Auth.js's generateSessionToken
    expires = datetime.now(UTC) + SESSION_MAX_AGE
    db.add(AuthSession(user_id=user_id, expires=expires, session_token=token))
    return token, expires


async def session_user(db: AsyncSession, token: str | None) -> User | None:
    """The signed-in user, or None; an expired row is deleted (Auth.js deletes them lazily too)."""
    if not token or len(token) > 255:
        return None
    row = (await db.exec(select(AuthSession, User).join(User, User.id == AuthSession.user_id)  # type: ignore[arg-type]
                            .where(AuthSession.session_token == token))).first()  # type: ignore[arg-type]
    if row is None:
        return None
    session, user = row
    now = datetime.now(UTC)
    if session.expires <= now:
        await db.delete(session)
        await db.commit()
        return None
    if session.expires - SESSION_MAX_AGE + SESSION_UPDATE_AGE <= now:
        session.expires = now + SESSION_MAX_AGE
        await db.commit()
    return user  # type: ignore[no-any-return]


async def delete_session(db: AsyncSession, token: str) -> None:
    await db.exec(delete(AuthSession).where(AuthSession.session_token == token))  # type: ignore[arg-type]


async def delete_user_sessions(db: AsyncSession, user_id: uuid.UUID, *, keep: str | None = None) -> int:
    """Ends the user's sessions (all, or all but `keep`); the proxy closes their Control UI sockets
    within its session sweep (proxy/session_watch.py). Returns how many ended."""
    stmt = delete(AuthSession).where(AuthSession.user_id == user_id)  # type: ignore[arg-type]
    if keep is not None:
        stmt = stmt.where(AuthSession.session_token != keep)  # type: ignore[arg-type]
    result = await db.exec(stmt)
    return int(result.rowcount or 0)


async def linked_providers(db: AsyncSession, user_id: uuid.UUID) -> list[str]:
    rows = await db.exec(select(Account.provider).where(Account.user_id == user_id))  # type: ignore[call-overload]
    return sorted(set(rows.all()))


def set_session_cookie(response: Response, name: str, token: str, expires: datetime, *, secure: bool) -> None:
    """Auth.js's session cookie: host-only, HttpOnly, SameSite=Lax, an Expires attribute."""
    response.set_cookie(name, token, expires=expires, httponly=True, samesite="lax", secure=secure, path="/")


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class LoginLimiter:
    """Failed attempts per email and per client address in a sliding window, shared by every web
    process through PostgreSQL (`web_login_failures`): in each process's memory, N processes let a
    guesser try N times as often. Keys are SHA-256 digests, so the table holds no email or address.

    A success clears the email's failures, not the address's: one address guessing many accounts
    stays limited. Each call is its own short transaction (a failure must count even when the
    request that saw it writes nothing else).
    """

    def __init__(self, scope: str, max_failures: int, window_s: float, per_address_factor: int = 4) -> None:
        self.scope = scope
        self._max_email = max_failures
        self._max_addr = max_failures * per_address_factor
        self._window = float(window_s)

    @staticmethod
    def _key(kind: str, value: str) -> bytes:
        return hashlib.sha256(f"{kind}:{value}".encode()).digest()

    async def blocked(self, sessions: async_sessionmaker[AsyncSession], email: str, address: str) -> bool:
        counts = text("SELECT count(*) FILTER (WHERE key = :e), count(*) FILTER (WHERE key = :a) "
                      "FROM web_login_failures WHERE scope = :s AND key IN (:e, :a) "
                      "AND at > now() - make_interval(secs => :w)")
        async with sessions() as db:
            row = (await db.exec(counts.bindparams(  # type: ignore[call-overload]
                s=self.scope, e=self._key("email", email), a=self._key("addr", address), w=self._window))).one()
        return bool(row[0] >= self._max_email or row[1] >= self._max_addr)

    async def failed(self, sessions: async_sessionmaker[AsyncSession], email: str, address: str) -> None:
        add = text("INSERT INTO web_login_failures (scope, key) VALUES (:s, :e), (:s, :a)")
        # Rows older than the window count for nothing: gone, so the table stays the window's size.
        sweep = text("DELETE FROM web_login_failures WHERE scope = :s AND at < now() - make_interval(secs => :w)")
        async with sessions() as db, db.begin():
            await db.exec(add.bindparams(  # type: ignore[call-overload]
                s=self.scope, e=self._key("email", email), a=self._key("addr", address)))
            await db.exec(sweep.bindparams(s=self.scope, w=self._window))  # type: ignore[call-overload]

    async def succeeded(self, sessions: async_sessionmaker[AsyncSession], email: str) -> None:
        forget = text("DELETE FROM web_login_failures WHERE scope = :s AND key = :e")
        async with sessions() as db, db.begin():
            await db.exec(forget.bindparams(s=self.scope, e=self._key("email", email)))  # type: ignore[call-overload]
