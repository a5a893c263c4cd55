"""Request dependencies: database session, BFF authentication, the current user."""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel.ext.asyncio.session import AsyncSession

from api.problems import Problem
from db.models import User
from settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def one_snapshot(session: AsyncSession) -> None:
    """Make every later read of this request see the database at one moment (REPEATABLE READ).

    A worker ends an operation by writing the VPS's state and the operation's row in one transaction;
    read in separate READ COMMITTED statements, a page could take the state from before that commit
    and the operations from after it (`running`, nothing in flight, while a push was powering off
    a weakened gateway). Ends the request's transaction so far (nothing is written by then)."""
    await session.commit()
    await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, type_="unauthorized",
                   headers={"WWW-Authenticate": 'Bearer realm="slopbox"'})


async def frontend(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """The frontend's shared key (constant-time compare): enough for what any visitor may see."""
    expected: bytes = request.app.state.api_key_bytes
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise _unauthorized("Missing 'Authorization: Bearer <CONTROL_PLANE_API_KEY>' header")
    if not hmac.compare_digest(presented.strip().encode(), expected):
        raise _unauthorized("Invalid API key")


Frontend = Annotated[None, Depends(frontend)]


async def current_user(
    session: SessionDep,
    _key: Frontend,
    x_user_id: Annotated[str | None, Header()] = None,
) -> User:
    """BFF auth: the frontend's shared key plus the user it vouches for."""
    if not x_user_id:
        raise _unauthorized("Missing X-User-Id header")
    try:
        user_id = uuid.UUID(x_user_id)
    except ValueError:
        raise _unauthorized("X-User-Id must be a UUID") from None
    user = await session.get(User, user_id)
    if user is None:
        raise _unauthorized("X-User-Id does not name an existing user")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def current_admin(user: CurrentUser) -> User:
    """An admin route's caller: authenticated as above (401 otherwise), and with the admin flag (403)."""
    if not user.is_admin:
        raise Problem(403, "Admins only", "This route is for administrators; the user named by X-User-Id is not "
                      "one (`slopbox user create --admin` makes one).", type_="forbidden")
    return user


CurrentAdmin = Annotated[User, Depends(current_admin)]
