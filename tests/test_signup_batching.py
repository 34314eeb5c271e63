"""Concurrent sign-ups share transactions; each is still answered on its own merits."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import func, select

from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Confirmation, Subscriber, Subscription
from tests.conftest import SMTPServer, deliver, make_newsletter


async def test_concurrent_signups_each_get_their_own_answer(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily", opt_in="single")
    bodies = [{"email": f"reader{i}@example.com", "newsletters": ["weekly"]} for i in range(40)]
    bodies += [{"email": "Twice@Example.com", "newsletters": ["weekly"]}] * 3
    bodies += [{"email": "bad@@example.com", "newsletters": ["weekly"]}]
    bodies += [{"email": "lost@example.com", "newsletters": ["nope"]}]
    bodies += [{"email": "single@example.com", "newsletters": ["daily"]}]

    answers = await asyncio.gather(*(client.post("/v1/subscriptions", json=b) for b in bodies))

    codes = [a.status_code for a in answers]
    assert codes[:43] == [202] * 43
    assert codes[43:] == [422, 422, 200]
    assert answers[44].json()["errors"][0]["code"] == "unknown_newsletter"
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Subscriber)) == 42
        assert await session.scalar(select(func.count()).select_from(Subscription)) == 42
        twice = await session.scalar(
            select(Subscriber.id).where(Subscriber.email_key == "twice@example.com")
        )
        # The repeated address got one confirmation: the others hit the per-address cap.
        assert (
            await session.scalar(
                select(func.count())
                .select_from(Confirmation)
                .where(Confirmation.subscriber_id == twice)
            )
            == 1
        )
    await deliver(worker)
    recipients = sorted(r for mail in smtp.sink.received for r in mail.rcpt_tos)
    assert len(recipients) == 42
    assert recipients.count("Twice@example.com") == 1
