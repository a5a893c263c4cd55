"""Migrations, constraints, Auth.js adapter compatibility, and secrets at rest."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from db.encryption import Keyring, SecretDecryptionError, configure_keys
from db.migrate import downgrade, migrate_and_seed, upgrade
from tests.conftest import create_database
from tests.helpers import make_user

ALL_TABLES = {
    "plans", "vps_configs", "plan_vps_configs", "users", "accounts", "sessions", "verification_token",
    "vpses", "agents", "agent_channels", "vps_usage_periods", "overage_budgets", "vps_operations", "admin_audit_log",
    "usage_enforcements", "notifications",
    "vps_meter_state", "vps_usage_daily", "metering_months", "usage_statements", "proxy_rate_buckets",
    "web_login_failures",
}


def sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows} - {"alembic_version"}


def test_migrations_up_from_empty_down_and_up_again(pg_server: str) -> None:
    url = create_database(pg_server, f"slopbox_mig_{uuid.uuid4().hex[:6]}")
    assert tables(url) == set()
    upgrade(sa_url(url))
    assert tables(url) == ALL_TABLES
    downgrade(sa_url(url))
    assert tables(url) == set()
    migrate_and_seed(sa_url(url))
    migrate_and_seed(sa_url(url))  # idempotent: seeds upsert
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM plans").fetchone() == (3,)
        providers = {r[0] for r in conn.execute("SELECT provider FROM vps_configs").fetchall()}
        assert providers == {"hetzner", "fly", "local"}
        assert conn.execute("SELECT count(*) FROM plans WHERE is_default").fetchone() == (1,)


def test_migration_0005_adds_the_gateway_url_and_pin_and_backfills_local_vms(pg_server: str) -> None:
    """Issue 9 #4: a local VM provisioned before 0005 keeps working through the proxy (its plain
    loopback URL is written); a cloud VM gets none, so the proxy never contacts it unpinned."""
    url = create_database(pg_server, f"slopbox_mig_{uuid.uuid4().hex[:6]}")
    migrate_and_seed(sa_url(url))
    downgrade(sa_url(url), "0004")
    with psycopg.connect(url, autocommit=True) as conn:
        user = make_user(conn)
        ids = {}
        for provider, host, port in (("local", "127.0.0.1", 41234), ("hetzner", "203.0.113.7", 18789)):
            ids[provider] = conn.execute(
                "INSERT INTO vpses (user_id, vps_config_id, provider, provider_ref, state, host, gateway_port) "
                "VALUES (%s, (SELECT id FROM vps_configs WHERE provider = %s ORDER BY name LIMIT 1), %s, %s, "
                "'running', %s, %s) RETURNING id",
                (user, provider, provider, f"ref-{provider}", host, port)).fetchone()[0]  # type: ignore[index]
    upgrade(sa_url(url), "0005")
    with psycopg.connect(url) as conn:
        rows = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT provider, gateway_url, gateway_cert_sha256 FROM vpses").fetchall()}
    assert rows == {"local": ("http://127.0.0.1:41234", None), "hetzner": (None, None)}
    downgrade(sa_url(url), "0004")
    with psycopg.connect(url) as conn:
        columns = {r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns "
                                              "WHERE table_name = 'vpses'").fetchall()}
    assert not columns & {"gateway_url", "gateway_cert_sha256"}
    assert ids  # both rows survived the round trip


def test_authjs_pg_adapter_queries_work_unchanged(sql: psycopg.Connection) -> None:
    """The SQL @auth/pg-adapter 1.11 sends, verbatim in shape, against our schema."""
    user = sql.execute(
        'INSERT INTO users (name, email, "emailVerified", image) VALUES (%s, %s, %s, %s) '
        'RETURNING id, name, email, "emailVerified", image',
        ("Ada", "ada@example.com", None, None)).fetchone()
    assert user is not None and isinstance(user[0], uuid.UUID)  # server-side UUID default
    uid = user[0]
    sql.execute('INSERT INTO accounts ("userId", provider, type, "providerAccountId", access_token, expires_at, '
                'refresh_token, id_token, scope, session_state, token_type) '
                'VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *',
                (uid, "github", "oauth", "12345", "at", 1700000000, None, None, "read:user", None, "bearer"))
    expires = datetime.now(UTC) + timedelta(days=30)
    sql.execute('INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (%s, %s, %s) '
                'RETURNING id, "sessionToken", "userId", expires', (uid, expires, "tok-1"))
    row = sql.execute('SELECT * FROM sessions WHERE "sessionToken" = %s', ("tok-1",)).fetchone()
    assert row is not None
    got = sql.execute('SELECT u.* FROM users u JOIN accounts a ON u.id = a."userId" '
                      'WHERE a.provider = %s AND a."providerAccountId" = %s', ("github", "12345")).fetchone()
    assert got is not None and got[0] == uid
    sql.execute('UPDATE users set name = %s, email = %s, "emailVerified" = %s, image = %s WHERE id = %s '
                'RETURNING name, id, email, "emailVerified", image', ("Ada L", "ada@example.com", expires, None, uid))
    sql.execute("INSERT INTO verification_token ( identifier, expires, token ) VALUES ($1, $2, $3)"
                .replace("$1", "%s").replace("$2", "%s").replace("$3", "%s"), ("ada@example.com", expires, "vt"))
    sql.execute("DELETE FROM verification_token WHERE identifier = %s and token = %s "
                "RETURNING identifier, expires, token", ("ada@example.com", "vt"))
    # deleteUser: users first, then sessions and accounts (cascades make the later deletes no-ops).
    sql.execute("DELETE FROM users WHERE id = %s", (uid,))
    sql.execute('DELETE FROM sessions WHERE "userId" = %s', (uid,))
    sql.execute('DELETE FROM accounts WHERE "userId" = %s', (uid,))
    assert sql.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    assert sql.execute("SELECT count(*) FROM accounts").fetchone() == (0,)


def _vps(sql: psycopg.Connection, user: uuid.UUID, provider_ref: str | None = None) -> uuid.UUID:
    row = sql.execute(
        "INSERT INTO vpses (user_id, vps_config_id, provider, provider_ref, state) "
        "VALUES (%s, (SELECT id FROM vps_configs WHERE name = 'local-small'), 'local', %s, 'running') RETURNING id",
        (user, provider_ref)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def test_one_usage_row_per_vps_per_month(sql: psycopg.Connection) -> None:
    vps = _vps(sql, make_user(sql))
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start) VALUES (%s, %s)", (vps, date(2026, 11, 1)))
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start) VALUES (%s, %s)", (vps, date(2026, 11, 1)))
    with pytest.raises(psycopg.errors.CheckViolation, match="ck_usage_period_is_month_start"):
        sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start) VALUES (%s, %s)", (vps, date(2026, 12, 2)))


@pytest.mark.parametrize("column", ["bandwidth_in_bytes", "bandwidth_out_bytes", "cpu_ms", "memory_mb_seconds",
                                    "storage_bytes"])
def test_usage_counters_cannot_go_negative(sql: psycopg.Connection, column: str) -> None:
    vps = _vps(sql, make_user(sql))
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute(f"INSERT INTO vps_usage_periods (vps_id, period_start, {column}) VALUES (%s, %s, -1)",
                    (vps, date(2026, 11, 1)))


def test_provider_reference_is_unique_per_provider(sql: psycopg.Connection) -> None:
    user = make_user(sql)
    _vps(sql, user, "srv-1")
    with pytest.raises(psycopg.errors.UniqueViolation):
        _vps(sql, user, "srv-1")
    _vps(sql, user, None)
    _vps(sql, user, None)  # many VPSes may not have a provider reference yet


def test_vps_state_and_budget_checks(sql: psycopg.Connection) -> None:
    user = make_user(sql)
    vps = _vps(sql, user)
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("UPDATE vpses SET state = 'exploded' WHERE id = %s", (vps,))
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("INSERT INTO overage_budgets (user_id, period_start, budget_cents) VALUES (%s, %s, -5)",
                    (user, date(2026, 11, 1)))
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("INSERT INTO agent_channels (agent_id, kind) VALUES (gen_random_uuid(), 'myspace')")


def test_deleting_a_user_cascades_to_everything_they_own(sql: psycopg.Connection) -> None:
    user = make_user(sql)
    vps = _vps(sql, user)
    agent = sql.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) "
                        "VALUES (%s, 'a', 'x', 'abcd', %s) RETURNING id", (user, vps)).fetchone()[0]  # type: ignore[index]
    sql.execute("INSERT INTO agent_channels (agent_id, kind) VALUES (%s, 'telegram')", (agent,))
    sql.execute("INSERT INTO vps_usage_periods (vps_id, period_start) VALUES (%s, '2026-11-01')", (vps,))
    sql.execute('INSERT INTO sessions ("userId", expires, "sessionToken") VALUES (%s, now(), %s)', (user, "t"))
    sql.execute("DELETE FROM users WHERE id = %s", (user,))
    for table in ("agents", "agent_channels", "vpses", "vps_usage_periods", "sessions"):
        assert sql.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table


def test_an_agent_links_at_most_one_vps(sql: psycopg.Connection) -> None:
    user = make_user(sql)
    vps = _vps(sql, user)
    sql.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) "
                "VALUES (%s, 'a', 'x', 'abcd', %s)", (user, vps))
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4, vps_id) "
                    "VALUES (%s, 'b', 'x', 'abcd', %s)", (user, vps))


# --- secrets at rest ------------------------------------------------------------------------------

def test_encryption_round_trip_never_stores_plaintext(db: str, encryption_key: str) -> None:
    from sqlmodel import Session, select

    from db.models import Agent

    configure_keys([encryption_key])
    engine = create_engine(sa_url(db))
    with psycopg.connect(db, autocommit=True) as sql:
        user = make_user(sql)
    token = "ab" * 32
    with Session(engine) as s:
        s.add(Agent(user_id=user, name="enc", gateway_token=token, gateway_token_last4=token[-4:]))
        s.commit()
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT gateway_token FROM agents")).scalar_one()
    assert token not in stored and stored.startswith("gAAAAA")
    with Session(engine) as s:
        agent = s.exec(select(Agent)).one()
        assert agent.gateway_token == token
        assert token not in repr(agent.gateway_token)
    engine.dispose()


def test_key_rotation_keeps_old_ciphertexts_readable() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    ciphertext = Keyring([old]).encrypt("telegram-bot-token")
    rotated_ring = Keyring([new, old])
    assert rotated_ring.decrypt(ciphertext) == "telegram-bot-token"
    rewritten = rotated_ring.rotate(ciphertext)
    assert Keyring([new]).decrypt(rewritten) == "telegram-bot-token"  # old key can now be dropped
    with pytest.raises(SecretDecryptionError):
        Keyring([new]).decrypt(ciphertext)  # ...but only after rotating
    with pytest.raises(SecretDecryptionError):
        Keyring([new]).decrypt(ciphertext[:-4] + "AAAA")
