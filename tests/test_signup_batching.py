"""Concurrent sign-ups share transactions; each is still answered on its own merits."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import func, select

from service import suppression
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Confirmation, Subscriber, Subscription
from service.signup import Consent, SignupResult, subscribe_many, subscribe_on
from service.signup_batcher import SignupBatcher
from service.signup_input import parse_signup
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


async def test_signing_up_again_after_unsubscribing_makes_it_pending_with_new_consent(
    client: httpx.AsyncClient, db: Database, app: object
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily", opt_in="single")
    body = {"email": "again@example.com", "newsletters": ["weekly", "daily"]}
    await client.post("/v1/subscriptions", json=body, headers={"user-agent": "First/1"})
    async with db.transaction() as session:
        await session.execute(
            Subscription.__table__.update().values(status="unsubscribed")  # type: ignore[attr-defined]
        )
    await client.post("/v1/subscriptions", json=body, headers={"user-agent": "Second/2"})
    async with db.transaction() as session:
        rows = (
            await session.execute(
                select(
                    Subscription.status,
                    Subscription.consent_user_agent,
                    Subscription.pending_at,
                    Subscription.confirmed_at,
                ).order_by(Subscription.newsletter_id)
            )
        ).all()
    [(weekly, weekly_ua, weekly_pending, _), (daily, daily_ua, _, daily_confirmed)] = rows
    assert (weekly, weekly_ua) == ("pending", "Second/2")
    assert (daily, daily_ua) == ("active", "Second/2")
    assert weekly_pending is not None and daily_confirmed is not None


async def test_under_load_a_batch_waits_to_be_as_full_as_the_last(
    db: Database, settings: Settings
) -> None:
    """Without the wait, a burst that trickles in is split into a batch of one and the rest."""
    await make_newsletter(db, "weekly")
    sizes: list[int] = []

    class Observed(SignupBatcher):
        async def _process(self, batch: list[Any]) -> None:
            sizes.append(len(batch))
            await super()._process(batch)

    batcher = Observed(db, settings.model_copy(update={"signup_batch_wait_ms": 2000}))

    def signup(i: int) -> Any:
        data = parse_signup({"email": f"r{i}@example.com", "newsletters": ["weekly"]}, settings)
        return batcher.submit(data, Consent("api"))

    async def trickle(start: int) -> list[SignupResult]:
        first = asyncio.ensure_future(signup(start))
        await asyncio.sleep(0.05)  # the consumer has taken the first and is waiting
        rest = asyncio.gather(*(signup(i) for i in range(start + 1, start + 8)))
        return [await first, *await rest]

    try:
        burst = await asyncio.gather(*(signup(i) for i in range(8)))
        later = await trickle(100)
        alone = await signup(200)  # idle again: the last batch set the level to one
    finally:
        await batcher.stop()
    assert sizes == [8, 8, 1]
    assert [r.status for r in [*burst, *later, alone]] == ["pending"] * 17
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Subscriber)) == 17


async def test_one_batch_refuses_each_blocked_address_and_no_other(db: Database) -> None:
    """The batch reads the blocklist with the newsletters: every entry that matches one of its
    addresses, by address or by a parent domain, and only those addresses are dropped."""
    await make_newsletter(db, "weekly")
    async with db.transaction() as session:
        for kind, value in (
            ("address", "one@example.com"),
            ("domain", "spam.example"),
            ("address", "x@mail.spam.example"),
            ("domain", "other.example"),
        ):
            await suppression.add_block(session, kind, value)
    settings = Settings(secret_keys=["k"])
    emails = ["one@example.com", "x@mail.spam.example", "two@example.com", "y@spam.example"]
    batch = [
        (parse_signup({"email": e, "newsletters": ["weekly"]}, settings), Consent("api"))
        for e in emails
    ]
    async with db.transaction() as session:
        outcomes = await subscribe_many(session, settings, batch)
    assert all(isinstance(o, SignupResult) for o in outcomes)  # answered like everyone else
    async with db.transaction() as session:
        stored = (await session.scalars(select(Subscriber.email))).all()
    assert stored == ["two@example.com"]


async def test_one_batch_of_new_and_known_addresses_treats_each_as_what_it_is(
    db: Database, settings: Settings
) -> None:
    """On PostgreSQL a batch's new addresses are written in one statement and the known ones
    after it: each must still get exactly its own rows and mail."""
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily", opt_in="single")

    def signup(email: str, *newsletters: str) -> tuple[Any, Consent]:
        return parse_signup({"email": email, "newsletters": list(newsletters)}, settings), Consent(
            "api"
        )

    async with db.transaction() as session:
        await subscribe_many(
            session,
            settings,
            [signup("active@example.com", "daily"), signup("waiting@example.com", "weekly")],
        )
    batch = [
        signup("new@example.com", "weekly"),
        signup("Active@Example.com", "daily"),  # nothing new: "already subscribed"
        signup("waiting@example.com", "weekly"),  # mailed a minute ago: capped
        signup("fresh@example.com", "daily", "weekly"),
        signup("active@example.com", "weekly"),  # known, and something new to confirm
    ]
    outcomes = await db.run_on_driver(lambda runner: subscribe_on(runner, settings, batch))

    assert [o.mail_queued for o in outcomes if isinstance(o, SignupResult)] == [
        "confirmation",
        "already_subscribed",
        None,
        "confirmation",
        None,  # one address twice in a batch: the second is capped by the first's mail
    ]
    async with db.transaction() as session:
        rows = (
            await session.execute(
                select(Subscriber.email_key, Subscription.status)
                .join(Subscription, Subscription.subscriber_id == Subscriber.id)
                .order_by(Subscriber.email_key, Subscription.newsletter_id)
            )
        ).all()
        confirmations = await session.scalar(select(func.count()).select_from(Confirmation))
        subscribers = await session.scalar(select(func.count()).select_from(Subscriber))
    assert [tuple(r) for r in rows] == [
        ("active@example.com", "pending"),  # weekly, made first
        ("active@example.com", "active"),  # daily
        ("fresh@example.com", "pending"),
        ("fresh@example.com", "active"),
        ("new@example.com", "pending"),
        ("waiting@example.com", "pending"),
    ]
    assert subscribers == 4
    assert confirmations == 3  # waiting's first, new's and fresh's
