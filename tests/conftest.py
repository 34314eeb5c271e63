"""Real parts for every test: SQLite and PostgreSQL databases, an SMTP server, the HTTP app."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi import FastAPI
from sqlalchemy import text

from service import migrate
from service.app import create_app
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Base

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
PG_ADMIN_URL = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
BACKENDS = ["sqlite", "postgresql"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- databases


async def _pg_reachable() -> str | None:
    try:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} unreachable: {exc}"
    await conn.close()
    return None


@dataclass
class TestDatabase:
    __test__ = False  # a fixture value, not a test class

    backend: str
    url: str


@pytest.fixture(scope="session", params=BACKENDS)
async def test_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TestDatabase]:
    """One migrated database per backend per test session, dropped at the end."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "test.db"
        url = f"sqlite:///{path}"
        await asyncio.to_thread(migrate.upgrade, url)
        yield TestDatabase("sqlite", url)
        return
    async with fresh_pg_database("newsletter_test") as url:
        await asyncio.to_thread(migrate.upgrade, url)
        yield TestDatabase("postgresql", url)


@asynccontextmanager
async def fresh_pg_database(prefix: str) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; skipped (failed in CI) when the
    server cannot be reached."""
    problem = await _pg_reachable()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(problem)
        pytest.skip(problem)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `newsletter` process on the test's database and settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATA_DIR=str(settings.data_dir),
        NEWSLETTER_DATABASE_URL=settings.database_url,
        NEWSLETTER_SECRET_KEYS=",".join(settings.secret_keys),
        NEWSLETTER_BASE_URL=settings.base_url,
        NEWSLETTER_MAIL_URL=settings.mail_url,
        NEWSLETTER_MAIL_FROM=settings.mail_from,
        NEWSLETTER_LOG_LEVEL="warning",
    )
    env.update(extra)
    return env


async def truncate_all(db: Database) -> None:
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with db.transaction() as session:
        if db.is_sqlite:
            for table in tables:
                await session.execute(text(f"DELETE FROM {table}"))
        else:
            await session.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))


# ---------------------------------------------------------------- mail


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    def text(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None
        return str(part.get_content())

    def html(self) -> str:
        part = self.message.get_body(preferencelist=("html",))
        assert part is not None
        return str(part.get_content())


@dataclass
class SMTPSink:
    """An aiosmtpd handler that keeps what it receives; `fail_with` makes it refuse.

    It offers PIPELINING, as mail servers in production do (aiosmtpd reads commands one line
    at a time, so it handles them, but does not say so); `pipelining=False` tests the
    command-by-command path."""

    received: list[ReceivedMail] = field(default_factory=list)
    fail_with: str | None = None
    pipelining: bool = True

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.fail_with:
            return self.fail_with
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        message = message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append(
            ReceivedMail(str(envelope.mail_from), list(envelope.rcpt_tos), message)
        )
        return "250 OK"


@dataclass
class SMTPServer:
    sink: SMTPSink
    port: int
    controller: Controller

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.controller.stop()

    def start(self) -> None:
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self.controller.start()


def start_smtp(port: int | None = None) -> SMTPServer:
    sink = SMTPSink()
    port = port or free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    return SMTPServer(sink, port, controller)


@pytest.fixture(scope="session")
def smtp_session() -> Iterator[SMTPServer]:
    server = start_smtp()
    yield server
    server.stop()


@pytest.fixture
def smtp(smtp_session: SMTPServer) -> SMTPServer:
    smtp_session.sink.received.clear()
    smtp_session.sink.fail_with = None
    smtp_session.sink.pipelining = True
    return smtp_session


# ---------------------------------------------------------------- the app


@pytest.fixture
def settings(test_database: TestDatabase, smtp: SMTPServer, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=test_database.url,
        base_url="http://testserver",
        secret_keys=["test-secret-one"],
        mail_url=smtp.url,
        mail_from="news@example.org",
        run_worker=False,
        worker_backoff_base=0.0,
        # One SMTP connection: the fault tests reason about the order of sends;
        # test_outbox covers several lanes on its own.
        worker_smtp_connections=1,
        worker_backoff_max=0.0,
        mail_timeout=5.0,
    )


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings)
    await truncate_all(database)
    yield database
    await database.dispose()


@pytest.fixture
async def app(settings: Settings, db: Database) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    yield application
    await application.state.signups.stop()
    await application.state.db.dispose()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
def worker(app: FastAPI, settings: Settings) -> DeliveryWorker:
    return DeliveryWorker(app.state.db, settings)


async def deliver(worker: DeliveryWorker) -> int:
    """Run the delivery worker until the queue has nothing due; return messages claimed."""
    total = 0
    while claimed := await worker.run_once():
        total += claimed
    return total


async def make_newsletter(db: Database, slug: str = "weekly", **kwargs: Any) -> None:
    from service.newsletters import create_newsletter

    async with db.transaction() as session:
        await create_newsletter(session, slug, kwargs.pop("name", slug.title()), **kwargs)


async def active_import_job(db: Database, path: Path, actor: str = "cli") -> int:
    """A new job importing `path` as active subscribers of `weekly`; its id."""
    from service import csv_import

    async with db.transaction() as session:
        job = await csv_import.create_import(
            session,
            newsletter_slug="weekly",
            status="active",
            consent_note="paper form",
            path=path,
            filename=path.name,
            actor=actor,
        )
    return job.id
