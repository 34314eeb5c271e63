"""Several processes against one PostgreSQL: workers never send a row twice, and API
processes share rate limits through Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select

from service.config import Settings
from service.db import Database
from service.models import OutboxMessage
from service.signup import Consent, subscribe_many
from service.signup_input import parse_signup
from tests.conftest import TestDatabase, child_env, free_port, make_newsletter

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
MESSAGES = 20_000


class RecipientCounter:
    """Counts recipients and nothing else: 20,000 messages must not cost the test a parse."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.seen.update(envelope.rcpt_tos)
        return "250 OK"


@contextmanager
def processes(commands: list[list[str]], env: dict[str, str], log: Path) -> Iterator[None]:
    with log.open("ab") as out:
        started = [
            subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            for command in commands
        ]
    try:
        yield
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def test_three_worker_processes_deliver_twenty_thousand_each_exactly_once(
    db: Database, settings: Settings, test_database: TestDatabase, tmp_path: Path
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("several workers share PostgreSQL (FOR UPDATE SKIP LOCKED)")
    await make_newsletter(db, "weekly")
    emails = [f"many{i}@example.com" for i in range(MESSAGES)]
    for start in range(0, MESSAGES, 1000):
        batch = [
            (parse_signup({"email": e, "newsletters": ["weekly"]}, settings), Consent("api"))
            for e in emails[start : start + 1000]
        ]
        async with db.transaction() as session:
            await subscribe_many(session, settings, batch)

    sink = RecipientCounter()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    env = child_env(
        settings,
        NEWSLETTER_MAIL_URL=f"smtp://127.0.0.1:{port}",
        NEWSLETTER_WORKER_POLL_INTERVAL="0.2",
    )
    try:
        with processes([[NEWSLETTER, "worker"]] * 3, env, tmp_path / "workers.log"):
            deadline = time.monotonic() + 420
            while time.monotonic() < deadline:
                async with db.transaction() as session:
                    left = await session.scalar(
                        select(func.count())
                        .select_from(OutboxMessage)
                        .where(OutboxMessage.status != "sent")
                    )
                if not left:
                    break
                await asyncio.sleep(0.5)
            else:
                pytest.fail(f"{left} messages left\n{(tmp_path / 'workers.log').read_text()}")
    finally:
        controller.stop()

    assert sum(sink.seen.values()) == MESSAGES
    assert sink.seen == Counter(dict.fromkeys(emails, 1))
    async with db.transaction() as session:
        owners = await session.scalar(select(func.count(func.distinct(OutboxMessage.lease_owner))))
    assert owners == 3  # every worker took part


async def test_two_api_processes_share_one_rate_limit_through_redis(
    db: Database, settings: Settings, test_database: TestDatabase, tmp_path: Path
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("several API processes are the PostgreSQL deployment")
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            assert conn.recv(16).startswith(b"+PONG")
    except (OSError, AssertionError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at 127.0.0.1:6379 unreachable: {exc}")
        pytest.skip(f"Redis at 127.0.0.1:6379 unreachable: {exc}")
    await make_newsletter(db, "weekly")
    ports = [free_port(), free_port()]
    env = child_env(
        settings,
        NEWSLETTER_REDIS_URL="redis://127.0.0.1:6379/0",
        NEWSLETTER_RATE_LIMIT_KEY_PREFIX=f"test-{uuid.uuid4().hex}",
        NEWSLETTER_SIGNUP_RATE_LIMIT="4/minute",
        NEWSLETTER_RUN_WORKER="false",
    )
    commands = [
        [NEWSLETTER, "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(p)] for p in ports
    ]
    with processes(commands, env, tmp_path / "api.log"):
        async with httpx.AsyncClient(timeout=10) as http:
            for port in ports:
                await _wait_up(http, port, tmp_path / "api.log")
            answers: list[Any] = []
            for i in range(6):  # alternate between the two processes
                answers.append(
                    await http.post(
                        f"http://127.0.0.1:{ports[i % 2]}/v1/subscriptions",
                        json={"email": f"limit{i}@example.com", "newsletters": ["weekly"]},
                    )
                )
    codes = [a.status_code for a in answers]
    assert codes == [202, 202, 202, 202, 429, 429], codes
    assert int(answers[4].headers["retry-after"]) > 0


async def _wait_up(http: httpx.AsyncClient, port: int, log: Path) -> None:
    for _ in range(300):
        try:
            if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    pytest.fail(f"the API on port {port} never answered\n{log.read_text()}")
