"""Concurrent sign-ups share transactions; each is still answered on its own merits."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from service import db as db_module
from service import signup_batcher, suppression
from service.config import Settings
from service.db import Database, HeldConnection
from service.errors import InvalidInput
from service.mail.worker import DeliveryWorker
from service.models import Confirmation, Event, Newsletter, Subscriber, Subscription
from service.signup import Consent, SignupResult, subscribe_many, subscribe_on
from service.signup_batcher import SignupBatcher
from service.signup_input import parse_signup
from tests.conftest import SMTPServer, TestDatabase, deliver, make_newsletter


def _signups(settings: Settings, emails: list[str], *newsletters: str) -> list[Any]:
    return [parse_signup({"email": e, "newsletters": list(newsletters)}, settings) for e in emails]


async def _submit_together(batcher: SignupBatcher, signups: list[Any]) -> list[Any]:
    """All in one batch: every submit is queued before the consumer first runs."""
    try:
        return await asyncio.gather(
            *(batcher.submit(data, Consent("api")) for data in signups), return_exceptions=True
        )
    finally:
        await batcher.stop()


async def _rows(db: Database) -> list[tuple[str, str]]:
    async with db.transaction() as session:
        rows = await session.execute(
            select(Subscriber.email_key, Subscription.status)
            .join(Subscription, Subscription.subscriber_id == Subscriber.id)
            .order_by(Subscriber.email_key, Subscription.newsletter_id)
        )
        return [tuple(r) for r in rows.all()]  # type: ignore[misc]


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
        async def _process(self, batch: list[Any], connection: HeldConnection | None) -> None:
            sizes.append(len(batch))
            await super()._process(batch, connection)

    batcher = Observed(
        db,
        settings.model_copy(update={"signup_batch_wait_ms": 2000, "signup_batch_consumers": 1}),
    )

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


async def test_two_consumers_share_the_load_and_write_at_once(
    db: Database, settings: Settings
) -> None:
    """With two consumers (PostgreSQL's default) each gathers half of what is in flight, so
    one batch is gathered while the other is written."""
    await make_newsletter(db, "weekly")
    sizes: list[int] = []
    running = [0, 0]  # batches begun and not ended: now, at most

    class Observed(SignupBatcher):
        async def _process(self, batch: list[Any], connection: HeldConnection | None) -> None:
            sizes.append(len(batch))
            running[0] += 1
            running[1] = max(running)
            try:
                await super()._process(batch, connection)
            finally:
                running[0] -= 1

    batcher = Observed(db, settings.model_copy(update={"signup_batch_consumers": 2}))
    signups = _signups(settings, [f"r{i}@example.com" for i in range(8)], "weekly")
    outcomes = await _submit_together(batcher, signups)
    assert sizes == [4, 4]
    assert running[1] == 2  # the second began before the first had ended
    assert [o.status for o in outcomes] == ["pending"] * 8


async def _batches_of_four(
    batcher: SignupBatcher, settings: Settings, count: int, prefix: str
) -> None:
    """`count` new addresses submitted at once, answered in batches of four."""
    emails = [f"{prefix}{i}@example.com" for i in range(count)]
    outcomes = await asyncio.gather(
        *(batcher.submit(data, Consent("api")) for data in _signups(settings, emails, "weekly"))
    )
    assert [o.status for o in outcomes] == ["pending"] * count


async def _returned(db: Database) -> bool:
    """Whether every connection is back in the pool, waited for a little: the last batch's
    consumer gives them back after answering."""
    for _ in range(100):
        if db.engine.sync_engine.pool.checkedout() == 0:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_consumer_keeps_its_postgresql_connection_while_signups_keep_coming(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's checkout and return are paid once a burst, not once a batch; when nothing
    is left in flight the connection goes back. One idle for a while is given back before
    the next batch (the pool pings such a one)."""
    if db.is_sqlite:
        pytest.skip("SQLite's one connection is shared with the API: never held")
    await make_newsletter(db, "weekly")
    checkouts: list[int] = []
    event.listen(db.engine.sync_engine.pool, "checkout", lambda *_: checkouts.append(1))
    batches: list[int] = []

    class Observed(SignupBatcher):
        async def _process(self, batch: list[Any], connection: HeldConnection | None) -> None:
            batches.append(len(batch))
            await super()._process(batch, connection)

    fours = settings.model_copy(update={"signup_batch_consumers": 1, "signup_batch_size": 4})
    batcher = Observed(db, fours)
    try:
        await _batches_of_four(batcher, settings, 40, prefix="a")
        assert (len(batches), len(checkouts)) == (10, 1)
        assert await _returned(db)  # the burst is over

        await _batches_of_four(batcher, settings, 4, prefix="b")
        assert (len(batches), len(checkouts)) == (11, 2)
        assert await _returned(db)

        checkouts.clear()
        monkeypatch.setattr(db_module, "IDLE_PING_AFTER", 0.0)  # every batch finds it idle
        await _batches_of_four(batcher, settings, 12, prefix="c")
        assert len(checkouts) == 3
    finally:
        await batcher.stop()
    assert await _returned(db)
    assert len(await _rows(db)) == 56


async def test_a_held_connection_killed_between_batches_loses_no_signup(
    db: Database, settings: Settings, test_database: TestDatabase
) -> None:
    if db.is_sqlite:
        pytest.skip("terminating server backends is a PostgreSQL fault")
    await make_newsletter(db, "weekly")
    killed: list[int] = []
    held_before: list[int | None] = []  # the server pid of the connection each batch found held

    def pid(connection: HeldConnection) -> int | None:
        fairy = connection.fairy
        return (
            fairy.driver_connection.get_server_pid() if fairy and fairy.driver_connection else None
        )

    class Observed(SignupBatcher):
        async def _process(self, batch: list[Any], connection: HeldConnection | None) -> None:
            assert connection is not None
            held_before.append(pid(connection))
            await super()._process(batch, connection)
            if len(held_before) == 2:  # kill what the third batch will find held
                victim = pid(connection)
                assert victim is not None
                conn = await asyncpg.connect(test_database.url)
                try:
                    assert await conn.fetchval("SELECT pg_terminate_backend($1)", victim)
                finally:
                    await conn.close()
                killed.append(victim)

    fours = settings.model_copy(update={"signup_batch_consumers": 1, "signup_batch_size": 4})
    batcher = Observed(db, fours)
    try:
        # The batch on the dead connection fails whole and is retried one by one; the
        # batches after it run on a new connection.
        await _batches_of_four(batcher, settings, 20, prefix="k")
    finally:
        await batcher.stop()
    assert len(held_before) == 5 and held_before[2] == killed[0]
    assert held_before[3] is not None and held_before[3] != killed[0]
    assert await _returned(db)
    assert [status for _, status in await _rows(db)] == ["pending"] * 20


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
        confirmations = await session.scalar(select(func.count()).select_from(Confirmation))
        subscribers = await session.scalar(select(func.count()).select_from(Subscriber))
    assert await _rows(db) == [
        ("active@example.com", "pending"),  # weekly, made first
        ("active@example.com", "active"),  # daily
        ("fresh@example.com", "pending"),
        ("fresh@example.com", "active"),
        ("new@example.com", "pending"),
        ("waiting@example.com", "pending"),
    ]
    assert subscribers == 4
    assert confirmations == 3  # waiting's first, new's and fresh's


async def test_a_newsletter_changed_after_it_was_cached_is_applied_as_it_is_now(
    db: Database, settings: Settings
) -> None:
    """PostgreSQL keeps the newsletters sign-ups ask for between batches; a batch's statement
    checks each against its row, so a change (to single opt-in, archived) holds at once."""
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    batcher = SignupBatcher(db, settings)
    await _submit_together(batcher, _signups(settings, ["a@example.com"], "weekly", "daily"))
    async with db.transaction() as session:
        await session.execute(
            Newsletter.__table__.update()  # type: ignore[attr-defined]
            .where(Newsletter.slug == "weekly")
            .values(opt_in="single")
        )
        await session.execute(
            Newsletter.__table__.update()  # type: ignore[attr-defined]
            .where(Newsletter.slug == "daily")
            .values(archived_at=func.now())
        )
    [single, archived] = await _submit_together(
        batcher,
        [
            *_signups(settings, ["b@example.com"], "weekly"),
            *_signups(settings, ["c@example.com"], "daily"),
        ],
    )
    assert isinstance(single, SignupResult) and single.status == "active"
    assert single.mail_queued == "welcome"
    assert isinstance(archived, InvalidInput)
    assert archived.errors[0].code == "unknown_newsletter"
    assert await _rows(db) == [
        ("a@example.com", "pending"),
        ("a@example.com", "pending"),
        ("b@example.com", "active"),
    ]
    # Cached again as it is now: the next batch is new addresses only, applied as such.
    [again] = await _submit_together(batcher, _signups(settings, ["d@example.com"], "weekly"))
    assert isinstance(again, SignupResult) and again.status == "active"


async def test_a_batch_of_new_known_blocked_and_repeated_addresses_on_the_batcher(
    db: Database, settings: Settings, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    """On PostgreSQL the new addresses are written by one statement outside a transaction and
    the rest in a transaction after it; each gets its own rows and mail, exactly once."""
    await make_newsletter(db, "weekly")
    async with db.transaction() as session:
        await suppression.add_block(session, "domain", "spam.example")
    batcher = SignupBatcher(db, settings)
    await _submit_together(batcher, _signups(settings, ["known@example.com"], "weekly"))
    emails = [
        "new1@example.com",
        "known@example.com",  # mailed a moment ago: capped
        "x@mail.spam.example",  # blocked by its parent domain
        "new2@example.com",
        "New1@Example.com",  # the same address again in the batch
    ]
    outcomes = await _submit_together(batcher, _signups(settings, emails, "weekly"))
    assert [o.mail_queued for o in outcomes] == ["confirmation", None, None, "confirmation", None]
    assert await _rows(db) == [
        ("known@example.com", "pending"),
        ("new1@example.com", "pending"),
        ("new2@example.com", "pending"),
    ]
    await deliver(worker)
    recipients = sorted(r for mail in smtp.sink.received for r in mail.rcpt_tos)
    assert recipients == ["known@example.com", "new1@example.com", "new2@example.com"]


async def test_when_the_transaction_after_the_new_addresses_fails_only_the_rest_is_retried(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new addresses' statement has committed before the known ones are applied: a failed
    transaction for those must not apply the new ones a second time."""
    await make_newsletter(db, "weekly")
    batcher = SignupBatcher(db, settings)
    await _submit_together(batcher, _signups(settings, ["known@example.com"], "weekly"))
    failed: list[int] = []

    async def fails_once(runner: Any, settings: Settings, requests: Any) -> Any:
        failed.append(len(requests))
        raise OperationalError("the batch", (), ConnectionError("dropped"))

    monkeypatch.setattr(signup_batcher, "subscribe_on", fails_once)
    outcomes = await _submit_together(
        batcher, _signups(settings, ["new@example.com", "known@example.com"], "weekly")
    )
    assert all(isinstance(o, SignupResult) for o in outcomes)
    # SQLite applies the whole batch in the transaction; PostgreSQL only the known address.
    assert failed == ([2] if db.is_sqlite else [1])
    async with db.transaction() as session:
        events = (
            await session.execute(
                select(Subscriber.email_key, func.count(Event.id))
                .join(Event, Event.subscriber_id == Subscriber.id)
                .where(Event.type == "subscription.pending")
                .group_by(Subscriber.email_key)
                .order_by(Subscriber.email_key)
            )
        ).all()
    assert [tuple(e) for e in events] == [("known@example.com", 2), ("new@example.com", 1)]
