"""Housekeeping: purging stale pending sign-ups, retrying dead mail, revoking keys."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import func, select, text, update

from service.db import Database
from service.keys import create_key
from service.mail import outbox
from service.mail.worker import DeliveryWorker
from service.models import OutboxMessage, Subscriber, Subscription, utcnow
from service.purge import parse_age, purge_pending
from tests.conftest import SMTPServer, deliver, make_newsletter


async def test_purge_deletes_people_who_never_confirmed_and_only_them(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily", opt_in="single")
    for email, lists in (
        ("never@example.com", ["weekly"]),
        ("mixed@example.com", ["weekly", "daily"]),
        ("fresh@example.com", ["weekly"]),
    ):
        await client.post("/v1/subscriptions", json={"email": email, "newsletters": lists})
    await deliver(worker)
    async with db.transaction() as session:
        old = utcnow() - timedelta(days=40)
        await session.execute(
            update(Subscription)
            .where(
                Subscription.subscriber_id.in_(
                    select(Subscriber.id).where(Subscriber.email_key != "fresh@example.com")
                )
            )
            .values(pending_at=old)
        )
        result = await purge_pending(session, parse_age("30d"))
    assert result is not None
    assert (result.subscriptions, result.subscribers) == (2, 1)
    async with db.transaction() as session:
        left = sorted(await session.scalars(select(Subscriber.email_key)))
        statuses = (
            await session.execute(
                select(Subscriber.email_key, Subscription.status)
                .join(Subscription, Subscription.subscriber_id == Subscriber.id)
                .order_by(Subscriber.email_key)
            )
        ).all()
        traces = await session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.recipient == "never@example.com")
        )
    assert left == ["fresh@example.com", "mixed@example.com"]
    assert [tuple(r) for r in statuses] == [
        ("fresh@example.com", "pending"),
        ("mixed@example.com", "active"),
    ]
    assert traces == 0


def test_purge_age_parsing() -> None:
    assert parse_age("30d") == timedelta(days=30)
    assert parse_age("12h") == timedelta(hours=12)


async def test_dead_mail_can_be_retried(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    await make_newsletter(db, "weekly")
    smtp.sink.fail_with = "550 mailbox unavailable"
    await client.post(
        "/v1/subscriptions", json={"email": "dead@example.com", "newsletters": ["weekly"]}
    )
    await deliver(worker)
    async with db.transaction() as session:
        assert (await outbox.status_counts(session))["dead"] == 1
    smtp.sink.fail_with = None
    async with db.transaction() as session:
        assert await outbox.retry_dead(session) == 1
    await deliver(worker)
    assert [m.rcpt_tos for m in smtp.sink.received] == [["dead@example.com"]]


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["NEWSLETTER_DATA_DIR"] = str(tmp_path)
    env["NEWSLETTER_JSON_LOGS"] = "false"
    script = Path(sys.executable).with_name("newsletter")
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_revokes_keys_and_purges(tmp_path: Path) -> None:
    assert _cli(tmp_path, "migrate").returncode == 0
    created = _cli(tmp_path, "keys", "create", "--name", "ops")
    assert created.returncode == 0, created.stderr
    listed = _cli(tmp_path, "keys", "list")
    assert " live " in listed.stdout
    revoked = _cli(tmp_path, "keys", "revoke", "1")
    assert revoked.returncode == 0, revoked.stderr
    assert " revoked " in _cli(tmp_path, "keys", "list").stdout
    missing = _cli(tmp_path, "keys", "revoke", "99")
    assert missing.returncode == 1 and "No key 99" in missing.stderr
    purged = _cli(tmp_path, "purge-pending", "--older-than", "30d")
    assert purged.returncode == 0 and "purged 0 pending" in purged.stdout
    bad = _cli(tmp_path, "purge-pending", "--older-than", "soon")
    assert bad.returncode == 1
    retried = _cli(tmp_path, "outbox", "retry")
    assert retried.returncode == 0 and "0 messages queued again" in retried.stdout


async def test_revoked_key_is_refused(client: httpx.AsyncClient, db: Database) -> None:
    from service.keys import revoke_key

    async with db.transaction() as session:
        created = await create_key(session, "temp", "read")
    headers = {"authorization": f"Bearer {created.key}"}
    assert (await client.get("/v1/admin/newsletters", headers=headers)).status_code == 200
    async with db.transaction() as session:
        await revoke_key(session, created.record.id)
        assert await session.scalar(text("SELECT count(*) FROM api_keys")) == 1
    assert (await client.get("/v1/admin/newsletters", headers=headers)).status_code == 401
