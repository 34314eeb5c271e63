"""The outbox under failure: SMTP outages and refusals, leases, killed workers, rivals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib
import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi import FastAPI
from sqlalchemy import select, update

from service.config import Settings
from service.db import Database
from service.mail import outbox
from service.mail.render import OutgoingMail
from service.mail.transports import DeliveryError, SMTPTransport
from service.mail.worker import DeliveryWorker, SendPacer
from service.models import DeliveryAttempt, OutboxMessage, Subscription, utcnow
from tests.conftest import (
    SMTPServer,
    SMTPSink,
    deliver,
    free_port,
    make_newsletter,
    start_smtp,
)
from tests.test_admin import make_key
from tests.test_journey import link

if TYPE_CHECKING:
    from tests.conftest import TestDatabase

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))


# ---------------------------------------------------------------- helpers


@dataclass
class CountingSink(SMTPSink):
    """Counts SMTP sessions: aiosmtplib greets with EHLO once per connection."""

    greetings: int = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        self.greetings += 1
        return await super().handle_EHLO(server, session, envelope, hostname, responses)


@dataclass
class StallingSink(SMTPSink):
    """Accepts `stall_after` messages, then holds the next DATA until `release` is set and
    answers it with a 4xx (nothing stored). One-shot: later messages are accepted again."""

    stall_after: int | None = None
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.stall_after is not None and len(self.received) >= self.stall_after:
            self.stall_after = None
            self.stalled.set()
            # Ends when released, or is cancelled when the client's connection drops.
            for _ in range(1200):
                if self.release.is_set():
                    break
                await asyncio.sleep(0.05)
            return "451 try later"
        return await super().handle_DATA(server, session, envelope)


@contextlib.contextmanager
def own_smtp(sink: SMTPSink | None = None, smtputf8: bool = True) -> Iterator[SMTPServer]:
    """A dedicated SMTP server a test may stop, start or slow down without touching others;
    with `sink`, it offers SMTPUTF8 or not."""
    if sink is None:
        server = start_smtp()
    else:
        port = free_port()
        controller = Controller(sink, hostname="127.0.0.1", port=port, enable_SMTPUTF8=smtputf8)
        controller.start()
        server = SMTPServer(sink, port, controller)
    try:
        yield server
    finally:
        if isinstance(server.sink, StallingSink):
            server.sink.release.set()
        with contextlib.suppress(AssertionError):  # already stopped
            server.stop()


def recipients(sink: SMTPSink) -> Counter[str]:
    return Counter(rcpt for mail in sink.received for rcpt in mail.rcpt_tos)


async def signup(client: httpx.AsyncClient, email: str, newsletter: str = "weekly") -> None:
    answer = await client.post(
        "/v1/subscriptions", json={"email": email, "newsletters": [newsletter]}
    )
    assert answer.status_code in (200, 202), answer.text


async def signup_many(app: FastAPI, emails: list[str], newsletter: str = "weekly") -> None:
    """Sign-ups through the HTTP API, each from its own client address."""
    for i, email in enumerate(emails):
        ip = f"198.18.{i // 250}.{i % 250 + 1}"
        transport = httpx.ASGITransport(app=app, client=(ip, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            await signup(http, email, newsletter)


async def rows(db: Database) -> list[OutboxMessage]:
    async with db.transaction() as session:
        return list(await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def is_set(event: threading.Event) -> bool:
    return event.is_set()


def addresses(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}@example.com" for i in range(n)]


# ---------------------------------------------------------------- SMTP outages and answers


async def test_smtp_outage_loses_nothing_and_sends_nothing_twice(
    app: FastAPI, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    emails = addresses("outage", 5)
    await signup_many(app, emails)

    with own_smtp() as server:
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))
        server.stop()
        assert await worker.run_once() == 5
        assert server.sink.received == []
        queued = await rows(db)
        # After three failures in a row the server counts as down: the rest of the batch is
        # deferred without spending an attempt.
        assert [(r.status, r.attempts) for r in queued] == [("queued", 1)] * 3 + [("queued", 0)] * 2
        assert all(r.last_error for r in queued)
        assert all(r.payload for r in queued)  # the body waits for the next attempt

        server.start()
        assert await deliver(worker) == 5
        assert recipients(server.sink) == dict.fromkeys(emails, 1)
        assert all("/confirm/" in mail.text() for mail in server.sink.received)

        assert await deliver(worker) == 0
        assert len(server.sink.received) == 5
        assert {r.status for r in await rows(db)} == {"sent"}


@pytest.mark.parametrize("pipelining", [True, False])
async def test_temporary_refusal_is_retried_and_delivered_once(
    app: FastAPI, db: Database, smtp: SMTPServer, worker: DeliveryWorker, pipelining: bool
) -> None:
    smtp.sink.pipelining = pipelining
    await make_newsletter(db, "weekly")
    await signup_many(app, ["later@example.com"])

    smtp.sink.fail_with = "451 try later"
    assert await worker.run_once() == 1
    [row] = await rows(db)
    assert (row.status, row.attempts) == ("queued", 1)
    assert row.last_error is not None and "451" in row.last_error
    assert smtp.sink.received == []

    smtp.sink.fail_with = None
    assert await deliver(worker) == 1
    assert recipients(smtp.sink) == {"later@example.com": 1}
    [row] = await rows(db)
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, None)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_permanent_refusal_is_dead_and_not_retried(
    app: FastAPI, db: Database, smtp: SMTPServer, worker: DeliveryWorker, pipelining: bool
) -> None:
    smtp.sink.pipelining = pipelining
    await make_newsletter(db, "weekly")
    await signup_many(app, ["nobody@example.com"])

    smtp.sink.fail_with = "550 no such user"
    assert await deliver(worker) == 1
    [row] = await rows(db)
    assert (row.status, row.attempts) == ("dead", 1)
    assert row.last_error is not None and "550" in row.last_error

    smtp.sink.fail_with = None
    assert await deliver(worker) == 0
    assert smtp.sink.received == []
    [row] = await rows(db)
    assert row.status == "dead"


@dataclass
class RefusingSink(SMTPSink):
    """Refuses RCPT for the addresses in `refuse` with their answer."""

    refuse: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_refused_recipient_fails_alone(
    app: FastAPI, db: Database, settings: Settings, pipelining: bool
) -> None:
    await make_newsletter(db, "weekly")
    emails = ["ok0@example.com", "gone@example.com", "full@example.com", "ok1@example.com"]
    await signup_many(app, emails)
    refuse = {"gone@example.com": "550 no such user", "full@example.com": "452 mailbox full"}
    sink = RefusingSink(pipelining=pipelining, refuse=refuse)
    with own_smtp(sink) as server:
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))
        assert await worker.run_once() == 4
    assert recipients(sink) == {"ok0@example.com": 1, "ok1@example.com": 1}
    by_address = {r.recipient: r for r in await rows(db)}
    assert by_address["gone@example.com"].status == "dead"
    assert "550" in str(by_address["gone@example.com"].last_error)
    assert by_address["full@example.com"].status == "queued"
    assert "452" in str(by_address["full@example.com"].last_error)
    assert {by_address[e].status for e in ("ok0@example.com", "ok1@example.com")} == {"sent"}


@pytest.mark.parametrize("pipelining", [True, False])
async def test_an_internationalised_domain_is_sent_in_its_ascii_form(
    app: FastAPI, db: Database, settings: Settings, pipelining: bool
) -> None:
    """A mail server without SMTPUTF8 takes an IDN domain only in its IDNA form; it died on the
    first send (UnicodeEncodeError). A non-ASCII local part needs SMTPUTF8, which this server
    does not offer: dead at once, with the reason, and its neighbours go out."""
    await make_newsletter(db, "weekly")
    await signup_many(app, ["Reader@EXÄMPLE.com", "ünï@exämple.com", "plain@example.com"])
    sink = SMTPSink(pipelining=pipelining)
    with own_smtp(sink, smtputf8=False) as server:
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))
        assert await worker.run_once() == 3
    assert recipients(sink) == {"Reader@xn--exmple-cua.com": 1, "plain@example.com": 1}
    idn = next(m for m in sink.received if m.rcpt_tos == ["Reader@xn--exmple-cua.com"])
    assert idn.message["To"] == "Reader@xn--exmple-cua.com"
    assert "/confirm/" in idn.text()
    by_address = {r.recipient: r for r in await rows(db)}
    assert by_address["Reader@exämple.com"].status == "sent"  # stored as it was given
    dead = by_address["ünï@exämple.com"]
    assert (dead.status, dead.attempts) == ("dead", 1)
    assert "SMTPUTF8" in str(dead.last_error)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_non_ascii_local_part_goes_out_over_smtputf8(
    app: FastAPI, db: Database, settings: Settings, pipelining: bool
) -> None:
    """To a server that offers SMTPUTF8 (RFC 6531): the address in UTF-8 on RCPT and, as it
    is, in the To header (RFC 6532); the link in the mail works."""
    await make_newsletter(db, "weekly")
    await signup_many(app, ["ünï@exämple.com", "plain@example.com"])
    sink = SMTPSink(pipelining=pipelining)
    with own_smtp(sink) as server:
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))
        assert await worker.run_once() == 2
    assert recipients(sink) == {"ünï@exämple.com": 1, "plain@example.com": 1}
    [utf8] = [m for m in sink.received if m.rcpt_tos == ["ünï@exämple.com"]]
    assert str(utf8.message["To"]) == "ünï@exämple.com"
    assert "/confirm/" in utf8.text()
    assert {r.status for r in await rows(db)} == {"sent"}
    # The link works: it confirms the subscription.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        confirmed = await http.post(link(utf8.text(), "confirm"))
    assert confirmed.status_code == 200, confirmed.text
    async with db.transaction() as session:
        statuses = set(await session.scalars(select(Subscription.status)))
    assert statuses == {"active", "pending"}  # ünï's is active, plain@'s still pending


async def test_a_reused_row_id_never_repeats_a_message_id(
    app: FastAPI, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    """SQLite gives a deleted last row's id to the next row: an erase deletes the person's
    outbox rows, and the next sign-up's mail took the same id and, within the same second,
    the same Message-ID as a different message."""
    await make_newsletter(db, "weekly")
    admin = await make_key(db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        await signup(http, "first@example.com")
        assert await deliver(worker) == 1
        [first] = await rows(db)
        found = await http.get("/v1/admin/subscribers", params={"email": "first@"}, headers=admin)
        [person] = found.json()["items"]
        erased = await http.delete(f"/v1/admin/subscribers/{person['id']}", headers=admin)
        assert erased.status_code == 204
        await signup(http, "second@example.com")
    assert await deliver(worker) == 1
    [second] = await rows(db)
    ids = [m.message["Message-ID"] for m in smtp.sink.received]
    assert len(ids) == 2 and ids[0] != ids[1], (first.id, second.id, ids)


async def test_message_is_dead_after_max_attempts(
    app: FastAPI, db: Database, smtp: SMTPServer, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    await signup_many(app, ["flaky@example.com"])
    worker = DeliveryWorker(db, settings.model_copy(update={"worker_max_attempts": 2}))

    smtp.sink.fail_with = "451 try later"
    assert await worker.run_once() == 1
    assert [(r.status, r.attempts) for r in await rows(db)] == [("queued", 1)]
    assert await worker.run_once() == 1
    [row] = await rows(db)
    assert (row.status, row.attempts) == ("dead", 2)
    assert row.last_error is not None and "451" in row.last_error

    smtp.sink.fail_with = None
    assert await deliver(worker) == 0
    assert smtp.sink.received == []


async def test_delivered_row_is_scrubbed_and_keeps_its_metadata(
    app: FastAPI, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await signup_many(app, ["scrub@example.com"])
    [queued] = await rows(db)
    assert queued.payload and "token" in queued.payload

    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    [row] = await rows(db)
    assert row.status == "sent"
    assert row.payload is None
    assert row.message_id == mail.message["Message-ID"]
    assert row.sent_at is not None and row.sent_at >= row.created_at
    assert (row.recipient, row.template, row.leased_until) == (
        "scrub@example.com",
        "confirmation",
        None,
    )


# ---------------------------------------------------------------- leases


async def test_live_lease_of_another_worker_is_respected(
    app: FastAPI, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await signup_many(app, addresses("lease", 3))

    async with db.transaction() as session:
        dead = await outbox.claim(session, "dead-worker", 100, timedelta(minutes=10))
    assert len(dead) == 3

    assert await worker.run_once() == 0
    assert smtp.sink.received == []
    assert {(r.status, r.lease_owner) for r in await rows(db)} == {("sending", "dead-worker")}

    # Once the lease has run out, another worker takes the rows over...
    later = utcnow() + timedelta(minutes=11)
    async with db.transaction() as session:
        rescued = await outbox.claim(session, "rescuer", 100, timedelta(minutes=10), now=later)
    assert sorted(m.id for m in rescued) == sorted(m.id for m in dead)
    assert {m.attempts for m in rescued} == {2}

    # ...and the late answers of the dead owner change nothing.
    async with db.transaction() as session:
        await outbox.mark_sent(session, "dead-worker", [(m.id, "<late@x>") for m in dead])
        await outbox.mark_failed(session, "dead-worker", dead[0].id, "late", None)
    after = await rows(db)
    assert {(r.status, r.lease_owner, r.message_id) for r in after} == {
        ("sending", "rescuer", None)
    }
    assert all(r.payload for r in after)


async def test_expired_lease_is_taken_over_and_delivered_once(
    app: FastAPI, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    emails = addresses("expired", 3)
    await signup_many(app, emails)

    async with db.transaction() as session:
        dead = await outbox.claim(session, "dead-worker", 100, timedelta(0))
    assert len(dead) == 3

    assert await deliver(worker) == 3
    assert recipients(smtp.sink) == dict.fromkeys(emails, 1)

    async with db.transaction() as session:
        await outbox.mark_failed(session, "dead-worker", dead[0].id, "late", None)
        await outbox.mark_sent(session, "dead-worker", [(m.id, "<late@x>") for m in dead])
    after = await rows(db)
    assert {(r.status, r.lease_owner) for r in after} == {("sent", worker.owner)}
    assert all(r.message_id != "<late@x>" and r.last_error is None for r in after)


async def test_worker_whose_lease_ran_out_stops_sending(
    app: FastAPI, db: Database, settings: Settings
) -> None:
    """A live but slow worker must not go on sending rows that another worker took over."""
    await make_newsletter(db, "weekly")
    emails = addresses("slow", 6)
    await signup_many(app, emails)

    sink = StallingSink(stall_after=0)
    with own_smtp(sink) as server:
        fast = settings.model_copy(
            update={
                "mail_url": server.url,
                "worker_lease": timedelta(seconds=4),
                "worker_smtp_connections": 1,  # one slow connection holds the whole batch
            }
        )
        slow_worker = DeliveryWorker(db, fast)
        other_db = Database(fast)
        try:
            other = DeliveryWorker(other_db, fast)
            slow = asyncio.create_task(slow_worker.run_once())
            await wait_until(lambda: is_set(sink.stalled), 30, "the stall")

            # The slow worker's lease runs out while its first message hangs; the other one
            # takes the batch over and delivers all of it.
            async def taken_over() -> bool:
                return await other.run_once() > 0

            await wait_until(taken_over, 30, "the lease to run out")
            await deliver(other)
            assert recipients(sink) == dict.fromkeys(emails, 1)

            sink.release.set()
            await asyncio.wait_for(slow, 30)
        finally:
            await other_db.dispose()

        assert recipients(sink) == dict.fromkeys(emails, 1)
        assert {(r.status, r.lease_owner) for r in await rows(db)} == {("sent", other.owner)}


async def test_batch_left_when_lease_runs_short_is_handed_back_untried(
    app: FastAPI, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    emails = addresses("handback", 4)
    await signup_many(app, emails)

    sink = StallingSink(stall_after=0)
    with own_smtp(sink) as server:
        short = settings.model_copy(
            update={"mail_url": server.url, "worker_lease": timedelta(seconds=4)}
        )
        worker = DeliveryWorker(db, short)
        task = asyncio.create_task(worker.run_once())
        await wait_until(lambda: is_set(sink.stalled), 30, "the stall")
        # Hold the first message past the point where the lease leaves no room to send.
        await asyncio.sleep(2.2)
        sink.release.set()
        assert await asyncio.wait_for(task, 30) == 4

        assert sink.received == []
        after = await rows(db)
        assert [(r.status, r.attempts) for r in after] == [("queued", 1)] + [("queued", 0)] * 3
        assert after[0].last_error is not None and "451" in after[0].last_error

        assert await deliver(worker) == 4
        assert recipients(sink) == dict.fromkeys(emails, 1)


# ---------------------------------------------------------------- a real process, killed


def worker_env(settings: Settings, database: TestDatabase, mail_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATA_DIR=str(settings.data_dir),
        NEWSLETTER_DATABASE_URL=database.url,
        NEWSLETTER_MAIL_URL=mail_url,
        NEWSLETTER_MAIL_FROM=settings.mail_from,
        NEWSLETTER_BASE_URL=settings.base_url,
        NEWSLETTER_SECRET_KEYS=",".join(settings.secret_keys),
        NEWSLETTER_WORKER_LEASE="3",
        NEWSLETTER_WORKER_SMTP_CONNECTIONS="1",  # the test counts sends on one connection
        NEWSLETTER_WORKER_POLL_INTERVAL="0.2",
        NEWSLETTER_WORKER_BACKOFF_BASE="0",
        NEWSLETTER_MAIL_TIMEOUT="60",
    )
    return env


async def test_killed_worker_process_loses_nothing_and_sends_nothing_twice(
    app: FastAPI,
    db: Database,
    settings: Settings,
    test_database: TestDatabase,
    tmp_path: Path,
) -> None:
    await make_newsletter(db, "weekly")
    emails = addresses("killed", 8)
    await signup_many(app, emails)

    # The server takes three messages, then hangs on the fourth: the process is killed there.
    sink = StallingSink(stall_after=3)
    with own_smtp(sink) as server:
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [NEWSLETTER, "worker"],
                env=worker_env(settings, test_database, server.url),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:

            async def stalled() -> bool:
                assert process.poll() is None, log_path.read_text()
                return sink.stalled.is_set()

            await wait_until(stalled, 60, "the worker process to reach the stalled server")
            assert "sending" in {r.status for r in await rows(db)}
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        assert process.returncode == -signal.SIGKILL
        assert recipients(sink) == dict.fromkeys(emails[:3], 1)

        # Another worker picks up what the dead one held once its lease has run out.
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))

        async def all_sent() -> bool:
            await deliver(worker)
            return {r.status for r in await rows(db)} == {"sent"}

        await wait_until(all_sent, 60, "every message to be sent")
        assert recipients(sink) == dict.fromkeys(emails, 1)


# ---------------------------------------------------------------- rivals and reuse


async def test_two_workers_deliver_each_message_exactly_once(
    app: FastAPI, db: Database, smtp: SMTPServer, settings: Settings, test_database: TestDatabase
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("several workers at once is the PostgreSQL deployment")
    await make_newsletter(db, "weekly")
    emails = addresses("rival", 300)
    await signup_many(app, emails)

    tuned = settings.model_copy(update={"worker_batch_size": 50})
    databases = [Database(tuned), Database(tuned)]
    try:
        workers = [DeliveryWorker(database, tuned) for database in databases]
        assert workers[0].owner != workers[1].owner
        claimed = await asyncio.gather(*(deliver(w) for w in workers))
    finally:
        for database in databases:
            await database.dispose()

    assert sum(claimed) == 300
    assert all(n > 0 for n in claimed), claimed  # both really took part
    assert recipients(smtp.sink) == dict.fromkeys(emails, 1)
    assert {r.status for r in await rows(db)} == {"sent"}


async def test_one_batch_uses_one_smtp_connection(
    app: FastAPI, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    emails = addresses("reuse", 50)
    await signup_many(app, emails)

    sink = CountingSink()
    with own_smtp(sink) as server:
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))
        assert await worker.run_once() == 50
        assert recipients(sink) == dict.fromkeys(emails, 1)
        assert sink.greetings == 1


async def test_several_smtp_lanes_deliver_each_message_once(
    app: FastAPI, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    emails = addresses("lanes", 50)
    await signup_many(app, emails)

    sink = CountingSink()
    with own_smtp(sink) as server:
        lanes = settings.model_copy(update={"mail_url": server.url, "worker_smtp_connections": 4})
        worker = DeliveryWorker(db, lanes)
        assert await worker.run_once() == 50
        assert recipients(sink) == dict.fromkeys(emails, 1)
        assert sink.greetings == 4  # one reused connection per lane
        assert {r.status for r in await rows(db)} == {"sent"}


def test_send_pacer_spaces_sends_to_the_quota() -> None:
    clock = [100.0]
    pacer = SendPacer(rate=4, clock=lambda: clock[0])
    waits = [pacer.reserve() for _ in range(5)]
    assert waits == [0.0, 0.25, 0.5, 0.75, 1.0]
    clock[0] = 110.0  # idle for a while: no debt is carried over
    assert pacer.reserve() == 0.0
    assert SendPacer(rate=0).reserve() == 0.0


async def test_every_attempt_is_logged(app: FastAPI, db: Database, settings: Settings) -> None:
    await make_newsletter(db, "weekly")
    await signup_many(app, ["logged@example.com"])
    sink = SMTPSink(fail_with="451 try later")
    with own_smtp(sink) as server:
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))
        await worker.run_once()
        sink.fail_with = None
        await deliver(worker)
    async with db.transaction() as session:
        log = (
            await session.execute(
                select(
                    DeliveryAttempt.attempt, DeliveryAttempt.result, DeliveryAttempt.error
                ).order_by(DeliveryAttempt.id)
            )
        ).all()
    assert [(n, result) for n, result, _ in log] == [(1, "retry"), (2, "sent")]
    assert "451" in (log[0][2] or "")


@pytest.mark.parametrize("pipelining", [True, False])
async def test_smtp_transport_pipelines_when_the_server_offers_it(pipelining: bool) -> None:
    sink = SMTPSink(pipelining=pipelining)
    with own_smtp(sink) as server:
        async with SMTPTransport(server.url, timeout=5.0) as transport:
            for i in range(3):
                body = b"Subject: hi\n\n.leading dot\n..two\nlast line without end"
                await transport.send(OutgoingMail("from@example.org", f"to{i}@example.com", body))
            assert (transport.pipeline is not None) == pipelining
    assert recipients(sink) == {f"to{i}@example.com": 1 for i in range(3)}
    for mail in sink.received:
        assert mail.message["Subject"] == "hi"
        content = mail.message.get_content().replace("\r\n", "\n")
        assert content == ".leading dot\n..two\nlast line without end\n"


async def test_record_sent_marks_only_own_rows_and_logs_every_send(
    app: FastAPI, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    await signup_many(app, ["mine@example.com", "lost@example.com"])
    async with db.transaction() as session:
        claimed = await outbox.claim(session, "me", 10, timedelta(minutes=5))
    mine, lost = claimed
    async with db.transaction() as session:
        # Another worker took this one over after our lease ran out.
        await session.execute(
            update(OutboxMessage).where(OutboxMessage.id == lost.id).values(lease_owner="other")
        )
    async with db.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await outbox.record_sent(conn, "me", [(mine.id, "<a@x>", 1), (lost.id, "<b@x>", 1)])
        else:
            async with conn.begin():
                await outbox.record_sent(conn, "me", [(mine.id, "<a@x>", 1), (lost.id, "<b@x>", 1)])
    by_id = {r.id: r for r in await rows(db)}
    assert (by_id[mine.id].status, by_id[mine.id].message_id) == ("sent", "<a@x>")
    assert by_id[mine.id].payload is None and by_id[mine.id].sent_at is not None
    assert (by_id[lost.id].status, by_id[lost.id].message_id) == ("sending", None)
    assert by_id[lost.id].payload
    async with db.transaction() as session:
        log = (
            await session.execute(
                select(DeliveryAttempt.outbox_id, DeliveryAttempt.attempt, DeliveryAttempt.result)
            )
        ).all()
    # Both were handed to the mail server: both sends are logged.
    assert sorted(log) == sorted([(mine.id, 1, "sent"), (lost.id, 1, "sent")])


@dataclass
class SilentSink(SMTPSink):
    """Takes MAIL and never answers it."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        await asyncio.sleep(3)
        return "250 OK"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_server_that_stops_answering_is_a_transient_failure(pipelining: bool) -> None:
    with own_smtp(SilentSink(pipelining=pipelining)) as server:
        async with SMTPTransport(server.url, timeout=0.3) as transport:
            with pytest.raises(DeliveryError) as failure:
                await transport.send(OutgoingMail("a@example.org", "b@example.com", b"x\n"))
    assert not failure.value.permanent


async def test_announced_message_is_not_sent_until_its_own_turn() -> None:
    def mail(n: int) -> OutgoingMail:
        return OutgoingMail("from@example.org", f"to{n}@example.com", b"Subject: %d\n\nbody\n" % n)

    first, announced, other, last = mail(1), mail(2), mail(3), mail(4)
    sink = SMTPSink()
    with own_smtp(sink) as server:
        async with SMTPTransport(server.url, timeout=5.0) as transport:
            await transport.send(first, then=(announced, None))
            assert [m.rcpt_tos for m in sink.received] == [["to1@example.com"]]
            # Another message than the one announced: the connection starts afresh.
            await transport.send(other, then=(last, None))
            await transport.send(last)
            await transport.send(first, then=(announced, None))
        # Closed with a message announced: its content never went out.
    assert [m.rcpt_tos[0] for m in sink.received] == [
        "to1@example.com",
        "to3@example.com",
        "to4@example.com",
        "to1@example.com",
    ]


def self_signed(directory: Path) -> ssl.SSLContext:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_pipelining_works_after_starttls(tmp_path: Path) -> None:
    """The replies reader takes over the TLS transport aiosmtplib set up after STARTTLS."""
    sink = SMTPSink()
    port = free_port()
    controller = Controller(
        sink, hostname="127.0.0.1", port=port, tls_context=self_signed(tmp_path)
    )
    controller.start()
    try:
        transport = SMTPTransport(f"smtp://127.0.0.1:{port}?starttls=require", timeout=5.0)
        # A self-signed certificate: the one thing the URL cannot say.
        unverified = aiosmtplib.SMTP
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(aiosmtplib, "SMTP", lambda **kw: unverified(**kw, validate_certs=False))
            await transport._connect()
        assert transport.client is not None
        assert transport.client.get_transport_info("sslcontext") is not None
        assert transport.pipeline is not None
        async with transport:
            first = OutgoingMail("a@example.org", "one@example.com", b"Subject: 1\n\nx\n")
            second = OutgoingMail("a@example.org", "two@example.com", b"Subject: 2\n\ny\n")
            await transport.send(first, then=(second, None))
            await transport.send(second)
    finally:
        controller.stop()
    assert [m.rcpt_tos for m in sink.received] == [["one@example.com"], ["two@example.com"]]


class _LoopbackEnd(asyncio.WriteTransport):
    """The client's end of a connection whose server this test plays by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True


async def test_replies_are_read_in_order_however_they_arrive() -> None:
    from service.mail.transports import _Replies

    end = _LoopbackEnd()
    replies = _Replies(end, timeout=1.0)
    replies.data_received(b"250 OK\r\n250-first line\r\n250-sec")
    replies.data_received(b"ond line\r\n250 last\r\n35")
    assert await replies.replies(2) == [(250, "OK"), (250, "first line\nsecond line\nlast")]
    waiting = asyncio.ensure_future(replies.replies(2))
    await asyncio.sleep(0)
    assert not waiting.done()
    replies.data_received(b"4 go ahead\r\nnonsense\r\n")
    first, second = await waiting
    assert first == (354, "go ahead")
    assert second[0] == 0  # not an SMTP reply
    replies.data_received(b"x" * 70000)
    assert end.closed  # no line end in 64 KiB: not a mail server
