"""`slopbox migrate`: upgrade any database to head, then seed plans and VPS configs."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

HERE = Path(__file__).parent


def alembic_config(sync_url: str) -> Config:
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE / "migrations"))
    cfg.set_main_option("version_locations", str(HERE / "migrations" / "versions"))
    cfg.set_main_option("sqlalchemy.url", sync_url.replace("%", "%%"))
    return cfg


def upgrade(sync_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(sync_url), revision)


def downgrade(sync_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(sync_url), revision)


def migrate_and_seed(sync_url: str, *, local_provider: bool = True) -> None:
    """Upgrade, then seed; the CLI passes `Settings.local_provider_enabled` so that a production
    database (DATABASE_URL set) gets no local VPS config."""
    from db.seed import seed

    upgrade(sync_url)
    engine = create_engine(sync_url)
    try:
        with engine.begin() as conn:
            seed(conn, local=local_provider)
    finally:
        engine.dispose()
