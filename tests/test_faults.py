"""Faults with real processes: PostgreSQL connections killed during a sign-up burst, and a
bounded load test against a mail server that refuses every other message.

The SMTP faults of the worker alone (server down then back, 4xx then 250, 5xx, a worker
process killed with SIGKILL mid-batch) are in tests/test_outbox.py; docs/reliability.md maps
every fault to its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from service import db as db_module
from service.app import create_app
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Confirmation, OutboxMessage, Subscriber, Subscription
from tests.conftest import TestDatabase, child_env, deliver, free_port, make_newsletter
from tests.test_outbox import own_smtp, recipients

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
PROBLEM_JSON = "application/problem+json"
LOAD_SECONDS = float(os.environ.get("RELIABILITY_LOAD_SECONDS", "20"))
LOAD_RATE = float(os.environ.get("RELIABILITY_LOAD_RATE", "40"))  # sign-ups a second
LOAD_CLIENTS = 4


# ---------------------------------------------------------------- a served process


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `newsletter serve` process on the test's database."""
    return child_env(
        settings,
        NEWSLETTER_SIGNUP_RATE_LIMIT="",  # the clients of these tests share one address
        NEWSLETTER_REJECT_DISPOSABLE="false",
        **extra,
    )


@contextlib.asynccontextmanager
async def served(env: dict[str, str], log: Path, *, worker: bool = False) -> AsyncIterator[str]:
    """Run `newsletter serve` (uvicorn) in its own process; yield its base URL."""
    port = free_port()
    command = [NEWSLETTER, "serve", "--host", "127.0.0.1", "--port", str(port)]
    if not worker:
        command.append("--no-worker")
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(300):
                assert process.poll() is None, log.read_text()
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{base}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the server never answered\n{log.read_text()}")
        yield base
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 10)


# ---------------------------------------------------------------- what the database holds


@dataclass
class Ledger:
    """Per address: rows of each kind that one sign-up writes together."""

    subscribers: Counter[str] = field(default_factory=Counter)
    subscriptions: Counter[str] = field(default_factory=Counter)
    confirmations: Counter[str] = field(default_factory=Counter)
    mails: Counter[str] = field(default_factory=Counter)

    def rows_of(self, email: str) -> tuple[int, int, int, int]:
        return (
            self.subscribers[email],
            self.subscriptions[email],
            self.confirmations[email],
            self.mails[email],
        )


async def ledger(db: Database) -> Ledger:
    found = Ledger()
    async with db.transaction() as session:
        for email, n in await session.execute(
            select(Subscriber.email, func.count()).group_by(Subscriber.email)
        ):
            found.subscribers[email] = n
        for email, n in await session.execute(
            select(Subscriber.email, func.count())
            .join(Subscription, Subscription.subscriber_id == Subscriber.id)
            .group_by(Subscriber.email)
        ):
            found.subscriptions[email] = n
        for email, n in await session.execute(
            select(Subscriber.email, func.count())
            .join(Confirmation, Confirmation.subscriber_id == Subscriber.id)
            .group_by(Subscriber.email)
        ):
            found.confirmations[email] = n
        for email, n in await session.execute(
            select(OutboxMessage.recipient, func.count())
            .where(OutboxMessage.template == "confirmation")
            .group_by(OutboxMessage.recipient)
        ):
            found.mails[email] = n
    return found


def assert_clean_answers(answers: dict[str, httpx.Response]) -> Counter[int]:
    """Every answer is 202, or a 503 problem that says when to retry: never a 500."""
    codes = Counter(a.status_code for a in answers.values())
    assert set(codes) <= {202, 503}, {e: a.text for e, a in answers.items() if a.status_code != 202}
    for answer in answers.values():
        if answer.status_code == 503:
            assert answer.headers["content-type"] == PROBLEM_JSON
            assert answer.json()["status"] == 503
            assert int(answer.headers["retry-after"]) > 0
    return codes


# ---------------------------------------------------------------- PostgreSQL connections killed


async def _kill_backends(url: str, burst: asyncio.Task[object], times: int, interval: float) -> int:
    """Terminate every other connection to the database `times` times while the burst runs."""
    killed = 0
    conn = await asyncpg.connect(url)
    try:
        for _ in range(times):
            await asyncio.sleep(interval)
            if burst.done():
                break
            rows = await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            killed += sum(1 for row in rows if row[0])
    finally:
        await conn.close()
    return killed


async def test_postgresql_backends_killed_during_a_signup_burst_lose_nothing(
    db: Database, settings: Settings, test_database: TestDatabase, tmp_path: Path
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("terminating server backends is a PostgreSQL fault")
    await make_newsletter(db, "weekly")
    emails = [f"burst{i}@example.com" for i in range(500)]
    answers: dict[str, httpx.Response] = {}

    async with served(server_env(settings), tmp_path / "api.log") as base:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

            async def sign_up(email: str) -> None:
                answers[email] = await http.post(
                    "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"]}
                )

            async def burst() -> None:
                await asyncio.gather(*(sign_up(e) for e in emails))

            running = asyncio.create_task(burst())
            killed = await _kill_backends(test_database.url, running, times=20, interval=0.05)
            await running
            # The server is still whole afterwards.
            after = await http.post(
                "/v1/subscriptions", json={"email": "after@example.com", "newsletters": ["weekly"]}
            )
            assert after.status_code == 202, after.text

    assert killed > 0  # the fault really happened
    codes = assert_clean_answers(answers)
    accepted = [e for e, a in answers.items() if a.status_code == 202]
    print(f"\nbackends killed: {killed}; answers: {dict(codes)}")

    found = await ledger(db)
    for email in accepted:
        assert found.rows_of(email) == (1, 1, 1, 1), email
    for email in emails:  # a refused sign-up left all of its rows or none
        assert found.rows_of(email) in ((0, 0, 0, 0), (1, 1, 1, 1)), email

    with own_smtp() as server:
        worker = DeliveryWorker(db, settings.model_copy(update={"mail_url": server.url}))
        await deliver(worker)
        stored = [e for e in [*emails, "after@example.com"] if found.subscribers[e]]
        assert recipients(server.sink) == Counter(dict.fromkeys(stored, 1))
        assert all("/confirm/" in mail.text() for mail in server.sink.received)


async def _kill_pool(db: Database, url: str) -> int:
    async with db.transaction() as session:  # one connection in the pool, then idle there
        mine = await session.scalar(text("SELECT pg_backend_pid()"))
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_terminate_backend($1)", mine))
    finally:
        await conn.close()


async def test_a_pooled_connection_killed_while_idle_is_replaced_unseen(
    settings: Settings, test_database: TestDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("terminating server backends is a PostgreSQL fault")
    monkeypatch.setattr(db_module, "IDLE_PING_AFTER", 0.0)  # every checkout counts as idle
    db = Database(settings)
    try:
        assert await _kill_pool(db, test_database.url) == 1
        async with db.transaction() as session:  # the ping finds it dead: a new one is used
            assert await session.scalar(text("SELECT 1")) == 1
    finally:
        await db.dispose()


async def test_a_busy_connection_killed_fails_once_then_the_pool_recovers(
    settings: Settings, test_database: TestDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("terminating server backends is a PostgreSQL fault")
    monkeypatch.setattr(db_module, "IDLE_PING_AFTER", 3600.0)  # never pinged: seen as busy
    db = Database(settings)
    try:
        await _kill_pool(db, test_database.url)
        with pytest.raises(DBAPIError) as failed:
            async with db.transaction() as session:
                await session.scalar(text("SELECT 1"))
        assert failed.value.connection_invalidated
        async with db.transaction() as session:
            assert await session.scalar(text("SELECT 1")) == 1
    finally:
        await db.dispose()


# ---------------------------------------------------------------- database down


async def test_unreachable_database_is_a_503_problem_not_a_500(settings: Settings) -> None:
    down = settings.model_copy(
        update={
            "database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/gone",
            "signup_rate_limit": "",
        }
    )
    app = create_app(down)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            answers = [
                await http.post(
                    "/v1/subscriptions", json={"email": "a@example.com", "newsletters": ["w"]}
                ),
                await http.get("/v1/newsletters"),
                await http.post("/v1/confirmations/some-token"),
                await http.get("/v1/admin/subscribers", headers={"authorization": "Bearer nl_x"}),
            ]
            ready = await http.get("/readyz")
    finally:
        await app.state.signups.stop()
        await app.state.db.dispose()
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == PROBLEM_JSON
        assert answer.json()["status"] == 503
        assert int(answer.headers["retry-after"]) > 0
    assert ready.status_code == 503


# ---------------------------------------------------------------- bounded load, flaky SMTP


class EveryOtherRefused:
    """An SMTP server that answers 451 to every other message and counts what it accepts."""

    def __init__(self) -> None:
        self.delivered: Counter[str] = Counter()
        self.refused = 0
        self.offered = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.offered += 1
        if self.offered % 2:
            self.refused += 1
            return "451 4.3.0 try again later"
        self.delivered.update(envelope.rcpt_tos)
        return "250 OK"


async def _steady_signups(
    base: str, seconds: float, rate: float, clients: int, prefix: str, latencies: list[float]
) -> dict[str, httpx.Response | Exception]:
    """`clients` clients, each posting on its own schedule, together `rate` sign-ups a second."""
    answers: dict[str, httpx.Response | Exception] = {}
    interval = clients / rate
    start = time.monotonic()

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            i = 0
            while (due := start + n * interval / clients + i * interval) < start + seconds:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                email = f"{prefix}{n}-{i}@example.com"
                sent = time.monotonic()
                try:
                    answers[email] = await http.post(
                        "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"]}
                    )
                except httpx.TransportError as exc:
                    answers[email] = exc
                latencies.append(time.monotonic() - sent)
                i += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return answers


def _ms(latencies: list[float], quantile: float) -> str:
    ordered = sorted(latencies) or [0.0]
    return f"{ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] * 1000:.0f}"


async def test_steady_load_with_a_flaky_mail_server_loses_no_confirmation(
    db: Database, settings: Settings, test_database: TestDatabase, tmp_path: Path
) -> None:
    await make_newsletter(db, "weekly")
    sink = EveryOtherRefused()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    env = server_env(
        settings.model_copy(update={"mail_url": f"smtp://127.0.0.1:{port}"}),
        NEWSLETTER_WORKER_POLL_INTERVAL="0.2",
        NEWSLETTER_WORKER_BACKOFF_BASE="0.2",
        NEWSLETTER_WORKER_BACKOFF_MAX="1",
        # Half of all sends fail at random: a message must be allowed many tries in a row.
        NEWSLETTER_WORKER_MAX_ATTEMPTS="40",
    )
    log = tmp_path / "api.log"
    started = time.monotonic()
    try:
        async with served(env, log, worker=True) as base:
            latencies: list[float] = []
            answers = await _steady_signups(
                base,
                LOAD_SECONDS,
                LOAD_RATE,
                LOAD_CLIENTS,
                f"load-{test_database.backend}-",
                latencies,
            )
            sent_for = time.monotonic() - started
            accepted = {
                e for e, a in answers.items() if isinstance(a, httpx.Response) and a.is_success
            }

            # The embedded worker drains the outbox (bounded wait).
            deadline = time.monotonic() + max(60.0, LOAD_SECONDS * 2)
            while set(sink.delivered) < accepted and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            drained_after = time.monotonic() - started - sent_for
    finally:
        controller.stop()

    failures = {e: a for e, a in answers.items() if not isinstance(a, httpx.Response)}
    codes = Counter(a.status_code for a in answers.values() if isinstance(a, httpx.Response))
    async with db.transaction() as session:
        statuses = dict(
            (
                await session.execute(
                    select(OutboxMessage.status, func.count()).group_by(OutboxMessage.status)
                )
            ).all()
        )
        attempts = await session.scalar(select(func.sum(OutboxMessage.attempts)))
    print(
        f"\nload on {test_database.backend}: {len(answers)} sign-ups in {LOAD_SECONDS:.0f} s"
        f" ({len(answers) / LOAD_SECONDS:.1f}/s asked {LOAD_RATE:.0f}/s), answers {dict(codes)},"
        f" transport errors {len(failures)}; SMTP offered {sink.offered}, refused {sink.refused},"
        f" delivered {sum(sink.delivered.values())} to {len(sink.delivered)} addresses;"
        f" outbox {statuses}, attempts {attempts}; drained {drained_after:.1f} s after the load;"
        f" sign-up latency ms p50 {_ms(latencies, 0.5)}, p99 {_ms(latencies, 0.99)},"
        f" max {_ms(latencies, 1.0)}"
    )
    assert not failures, failures
    assert set(codes) == {202}, log.read_text()[-5000:]
    assert len(answers) >= LOAD_RATE * LOAD_SECONDS * 0.5  # the load really ran
    assert sink.refused > 0
    assert sink.delivered == Counter(dict.fromkeys(accepted, 1)), log.read_text()[-5000:]
    assert statuses == {"sent": len(accepted)}
