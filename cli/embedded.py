"""One-shot commands (migrate, user create) against the embedded database when DATABASE_URL is unset.

If `slopbox dev` is running they share its server; otherwise the server is started for the
duration of the command and stopped again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from devstack import postgres
from devstack.postgres import EmbeddedPostgres
from settings import Settings


@contextmanager
def database_available(settings: Settings) -> Iterator[str]:
    """Yield a sync SQLAlchemy URL for the configured database."""
    if not settings.embedded:
        yield settings.sqlalchemy_url
        return
    pg = EmbeddedPostgres(settings.data_dir, settings.embedded_postgres_port)
    if pg.is_running():
        pg.ensure_database()
        yield settings.sqlalchemy_url
        return
    proc = pg.spawn()
    try:
        pg.wait_ready(proc)
        pg.ensure_database()
        yield settings.sqlalchemy_url
    finally:
        postgres.stop(proc)
