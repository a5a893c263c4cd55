"""Async engine and sessions (psycopg 3) shared by the API, activities and the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from db.encryption import configure_keys
from settings import Settings


def make_engine(settings: Settings, *, pool_size: int = 5) -> AsyncEngine:
    configure_keys(settings.secret_keys())
    return create_async_engine(
        settings.sqlalchemy_url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def transaction(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on any error."""
    async with factory() as session, session.begin():
        yield session
