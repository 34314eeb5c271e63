"""No N+1 on the hot paths: count the SQL statements sign-up, confirm and unsubscribe send."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import event

from service.db import Database
from service.mail.worker import DeliveryWorker
from service.signup import Consent, subscribe_many
from service.signup_input import parse_signup
from tests.conftest import SMTPServer, deliver, make_newsletter

IGNORED = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|PRAGMA|select pg_)", re.I)


@contextmanager
def counting(db: Database) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if not IGNORED.match(sql):
            statements.append(sql)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)


async def test_signup_statements_do_not_grow_with_the_batch(app: FastAPI, db: Database) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily", opt_in="single")
    settings = app.state.settings

    def batch(n: int, prefix: str) -> list[Any]:
        return [
            (
                parse_signup(
                    {"email": f"{prefix}{i}@example.com", "newsletters": ["weekly", "daily"]},
                    settings,
                ),
                Consent("api"),
            )
            for i in range(n)
        ]

    with counting(db) as one:
        async with db.transaction() as session:
            await subscribe_many(session, settings, batch(1, "one"))
    with counting(db) as fifty:
        async with db.transaction() as session:
            await subscribe_many(session, settings, batch(50, "many"))
    # PostgreSQL writes a batch's subscribers, subscriptions, events, webhook calls,
    # confirmations and mail in one statement.
    assert len(one) <= (3 if db.engine.dialect.name == "postgresql" else 8), one
    assert len(fifty) == len(one), fifty
    # Known addresses cost a few more (the subscribers, their subscriptions, the mail cap, the
    # resubscribe; on PostgreSQL the first statement then writes nothing), still flat.
    with counting(db) as again:
        async with db.transaction() as session:
            await subscribe_many(session, settings, batch(50, "many"))
    assert len(again) <= len(one) + 5, again


async def test_confirm_and_unsubscribe_statement_counts(
    client: httpx.AsyncClient,
    app: FastAPI,
    db: Database,
    worker: DeliveryWorker,
    smtp: SMTPServer,
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await client.post(
        "/v1/subscriptions", json={"email": "c@example.com", "newsletters": ["weekly", "daily"]}
    )
    await deliver(worker)
    token = re.search(r"/confirm/(\S+)", smtp.sink.received[0].text())
    assert token
    with counting(app.state.db) as confirm:
        answer = await client.post(f"/v1/confirmations/{token.group(1)}")
    assert answer.status_code == 200
    assert len(confirm) <= 10, confirm

    await deliver(worker)
    unsubscribe = smtp.sink.received[1].message["List-Unsubscribe"].split(",")[0].strip(" <>")
    with counting(app.state.db) as unsub:
        answer = await client.post(
            unsubscribe.removeprefix("http://testserver"),
            content="List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 200
    assert len(unsub) <= 8, unsub
