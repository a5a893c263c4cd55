"""Notifications: the API (paginated, user-scoped, mark read), dedupe, admin alerts, and email through
the outbox to a real SMTP server in-process: exactly once under retries, retried while SMTP is down."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.notifications import NotificationActivities
from api.app import create_app
from db.engine import make_engine, session_factory
from notifications import alert_admins, notify_user
from settings import Settings
from tests.conftest import free_port
from tests.enforcement_harness import (
    Mailbox,
    enforce,
    full_worker,
    mail_settings,
    plan_limits,
    smtp_server,
    stopped_vps_row,
    write_usage,
)
from tests.helpers import headers, make_user

pytestmark = pytest.mark.asyncio(loop_scope="session")



async def _notify(settings: Settings, user: uuid.UUID, n: int, **kw: object) -> list[uuid.UUID | None]:
    engine = make_engine(settings)
    try:
        async with session_factory(engine)() as s, s.begin():
            return [await notify_user(s, user, kind="info", title=f"note {i}", body=f"body {i}", **kw)  # type: ignore[arg-type]
                    for i in range(n)]
    finally:
        await engine.dispose()


async def test_list_is_paginated_newest_first_with_the_unread_count(api: httpx.AsyncClient, settings: Settings,
                                                                    sql: psycopg.Connection) -> None:
    alice, bob = make_user(sql), make_user(sql)
    for i in range(25):  # distinct timestamps: one transaction each
        await _notify(settings, alice, 1, data={"i": i})
    await _notify(settings, bob, 1)
    first = (await api.get("/users/me/notifications?limit=10", headers=headers(alice))).json()
    assert first["total"] == 25 and first["unread_count"] == 25 and len(first["items"]) == 10
    assert [n["data"]["i"] for n in first["items"]] == list(range(24, 14, -1))  # newest first
    last = (await api.get("/users/me/notifications?limit=10&offset=20", headers=headers(alice))).json()
    assert [n["data"]["i"] for n in last["items"]] == [4, 3, 2, 1, 0]
    assert (await api.get("/users/me/notifications?limit=0", headers=headers(alice))).status_code == 422
    assert (await api.get("/users/me/notifications?limit=101", headers=headers(alice))).status_code == 422
    bobs = (await api.get("/users/me/notifications", headers=headers(bob))).json()
    assert bobs["total"] == 1 and bobs["unread_count"] == 1


async def test_mark_read_is_user_scoped_and_idempotent(api: httpx.AsyncClient, settings: Settings,
                                                       sql: psycopg.Connection) -> None:
    alice, bob = make_user(sql), make_user(sql)
    mine = [n for n in await _notify(settings, alice, 3) if n]
    (theirs,) = await _notify(settings, bob, 1)
    # Another user's notification is a 404, exactly like one that does not exist, and stays unread.
    other = await api.post(f"/users/me/notifications/{theirs}/read", headers=headers(alice))
    assert other.status_code == 404 and other.headers["content-type"].startswith("application/problem+json")
    missing = await api.post(f"/users/me/notifications/{uuid.uuid4()}/read", headers=headers(alice))
    assert missing.status_code == 404 and missing.json()["title"] == other.json()["title"]
    assert (await api.get("/users/me/notifications", headers=headers(bob))).json()["unread_count"] == 1
    assert (await api.post("/users/me/notifications/not-a-uuid/read", headers=headers(alice))).status_code == 422

    read = await api.post(f"/users/me/notifications/{mine[0]}/read", headers=headers(alice))
    assert read.status_code == 200 and read.json()["read_at"] is not None
    again = await api.post(f"/users/me/notifications/{mine[0]}/read", headers=headers(alice))
    assert again.json()["read_at"] == read.json()["read_at"]  # the first read time stays
    page = (await api.get("/users/me/notifications", headers=headers(alice))).json()
    assert page["unread_count"] == 2
    unread = (await api.get("/users/me/notifications?unread=true", headers=headers(alice))).json()
    assert {n["id"] for n in unread["items"]} == {str(m) for m in mine[1:]}

    marked = (await api.post("/users/me/notifications/read-all", headers=headers(alice))).json()
    assert marked == {"marked": 2, "unread_count": 0}
    assert (await api.post("/users/me/notifications/read-all", headers=headers(alice))).json()["marked"] == 0
    assert (await api.get("/users/me/notifications", headers=headers(bob))).json()["unread_count"] == 1  # untouched


async def test_dedupe_key_writes_once_and_alert_admins_reaches_only_admins(settings: Settings,
                                                                          sql: psycopg.Connection) -> None:
    user = make_user(sql)
    first = await _notify(settings, user, 1, dedupe_key="usage:2026-12-01:cpu:80")
    second = await _notify(settings, user, 1, dedupe_key="usage:2026-12-01:cpu:80")
    assert first[0] is not None and second == [None]
    admins = [make_user(sql), make_user(sql)]
    for a in admins:
        sql.execute("UPDATE users SET is_admin = true WHERE id = %s", (a,))
    engine = make_engine(settings)
    try:
        for _ in range(2):
            async with session_factory(engine)() as s, s.begin():
                await alert_admins(s, title="Hetzner metrics unavailable", body="503 from the metrics API",
                                   kind="provider_outage", dedupe_key="provider-outage:hetzner:2026-12-02T10")
    finally:
        await engine.dispose()
    rows = sql.execute("SELECT user_id, kind FROM notifications WHERE kind = 'provider_outage'").fetchall()
    assert sorted(r[0] for r in rows) == sorted(admins)  # each admin once, nobody else


async def _warned_user(sql: psycopg.Connection, email: str) -> uuid.UUID:
    """A user whose CPU is at 60% of the starter plan: one 50% warning to send."""
    user = make_user(sql, plan="starter", email=email)
    write_usage(sql, stopped_vps_row(sql, user), cpu_ms=plan_limits(sql, "starter")["cpu"] * 6 // 10)
    return user


async def test_email_arrives_exactly_once_when_the_send_is_retried(settings: Settings, temporal_client: Client,
                                                                   sql: psycopg.Connection) -> None:
    port = free_port()
    s = mail_settings(settings, port)
    user = await _warned_user(sql, f"warned-{uuid.uuid4().hex[:6]}@example.com")
    async with smtp_server(port, Mailbox()) as mailbox, full_worker(s, temporal_client):
        mailbox.fail_next = 1  # the first attempt gets a 451: Temporal retries the activity
        result = await enforce(temporal_client, s, [user])
        assert [e.outcome for e in result.emails] == ["sent"] and result.email_failures == 0
        assert mailbox.refused == 1 and len(mailbox.messages) == 1
        message = mailbox.messages[0]
        assert message["to"] == [sql.execute("SELECT email FROM users WHERE id = %s", (user,)).fetchone()[0]]  # type: ignore[index]
        assert "CPU time at 50% of your plan" in message["raw"]
        row = sql.execute("SELECT email_status, email_attempts, emailed_at, id FROM notifications "
                          "WHERE user_id = %s", (user,)).fetchone()
        assert row is not None and row[0] == "sent" and row[1] == 2 and row[2] is not None  # 451, then sent
        assert f"<notification-{row[3]}@slopbox>" in message["raw"]
        # The schedule fires again: the warning is not written again, nor mailed again.
        again = await enforce(temporal_client, s, [user])
        assert again.emails == [] and len(mailbox.messages) == 1

        # A retry of the send activity after its completion was lost (the worker died after the
        # commit) finds the row sent and mails nothing.
        engine = make_engine(s)
        try:
            activities = NotificationActivities(s, session_factory(engine))
            outcome = await ActivityEnvironment().run(activities.send_email, str(row[3]))
            assert outcome.outcome == "already" and len(mailbox.messages) == 1
        finally:
            await engine.dispose()
    assert sql.execute("SELECT count(*) FROM notifications WHERE user_id = %s", (user,)).fetchone() == (1,)


async def test_smtp_down_is_retried_and_the_notification_stays_visible(settings: Settings, temporal_client: Client,
                                                                       sql: psycopg.Connection) -> None:
    port = free_port()  # nothing listens here yet: connection refused
    s = mail_settings(settings, port)
    user = await _warned_user(sql, f"down-{uuid.uuid4().hex[:6]}@example.com")
    app = create_app(s)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as api, full_worker(s, temporal_client):
        result = await enforce(temporal_client, s, [user])
        assert result.email_failures == 1 and result.emails == []
        row = sql.execute("SELECT email_status, email_attempts, email_error FROM notifications WHERE user_id = %s",
                          (user,)).fetchone()
        assert row is not None and row[0] == "pending" and row[1] >= 2, row  # retried, still in the outbox
        assert "Connect" in (row[2] or "") or "refused" in (row[2] or "").lower(), row
        page = (await api.get("/users/me/notifications", headers=headers(user))).json()
        assert page["unread_count"] == 1 and page["items"][0]["kind"] == "usage_warning"
        assert page["items"][0]["emailed_at"] is None
        # SMTP comes back: the next run delivers it, once.
        async with smtp_server(port, Mailbox()) as mailbox:
            later = await enforce(temporal_client, s, [])
            assert [e.outcome for e in later.emails] == ["sent"]
            assert len(mailbox.messages) == 1
            await enforce(temporal_client, s, [])
            assert len(mailbox.messages) == 1
        page = (await api.get("/users/me/notifications", headers=headers(user))).json()
        assert page["items"][0]["emailed_at"] is not None


async def test_without_smtp_notifications_are_kept_and_not_mailed(settings: Settings, temporal_client: Client,
                                                                  sql: psycopg.Connection) -> None:
    s = mail_settings(settings, None)
    user = await _warned_user(sql, f"nosmtp-{uuid.uuid4().hex[:6]}@example.com")
    async with full_worker(s, temporal_client):
        result = await enforce(temporal_client, s, [user])
    assert [e.outcome for e in result.emails] == ["skipped"]
    row = sql.execute("SELECT email_status, email_error FROM notifications WHERE user_id = %s", (user,)).fetchone()
    assert row == ("skipped", "no SMTP_HOST configured")


async def test_threshold_warnings_once_per_period_resource_and_threshold(settings: Settings, temporal_client: Client,
                                                                        sql: psycopg.Connection) -> None:
    s = mail_settings(settings, None)
    user = make_user(sql, plan="starter")
    vps = stopped_vps_row(sql, user)
    limits = plan_limits(sql, "starter")

    def warnings() -> list[tuple[str, int]]:
        rows = sql.execute("SELECT data FROM notifications WHERE user_id = %s AND kind = 'usage_warning' "
                           "ORDER BY created_at", (user,)).fetchall()
        return [(r[0]["resource"], r[0]["threshold"]) for r in rows]

    async with full_worker(s, temporal_client):
        write_usage(sql, vps, cpu_ms=limits["cpu"] * 49 // 100)
        await enforce(temporal_client, s, [user])
        assert warnings() == []
        write_usage(sql, vps, cpu_ms=limits["cpu"] * 6 // 10, bandwidth_out=limits["bandwidth"] * 8 // 10)
        await enforce(temporal_client, s, [user])
        await enforce(temporal_client, s, [user])  # again: nothing new
        assert sorted(warnings()) == [("bandwidth", 80), ("cpu", 50)]
        write_usage(sql, vps, cpu_ms=limits["cpu"], bandwidth_out=limits["bandwidth"] * 9 // 10)
        result = await enforce(temporal_client, s, [user])
        assert [(d.decision, d.warnings) for d in result.decisions] == [("ok", 1)]  # exactly at the limit: no cost
        assert sorted(warnings()) == [("bandwidth", 80), ("cpu", 50), ("cpu", 100)]
    # Nothing was over budget: no enforcement, no stop notice.
    assert sql.execute("SELECT count(*) FROM usage_enforcements WHERE user_id = %s", (user,)).fetchone() == (0,)
