"""The driver-level multi-row insert writes exactly what SQLAlchemy's insert writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import insert, select

from service import bulk
from service.db import Database
from service.models import Event, OutboxMessage, Subscriber, table


def _subscriber(i: int, when: datetime) -> dict[str, Any]:
    return {
        "public_id": f"p{i:031d}",
        "email": f"Ünïcode{i}@Example.com",
        "email_key": f"ünïcode{i}@example.com",
        "name": None if i % 2 else "Zoë 'quoted' \"name\" ; DROP TABLE x",
        "language": "uk",
        "attributes": {"plan": "pro", "n": i, "nested": {"list": [1, None, "ж"]}},
        "created_at": when,
        "updated_at": when + timedelta(microseconds=i),
    }


async def test_rows_read_back_as_if_written_by_sqlalchemy(db: Database) -> None:
    when = datetime(2026, 11, 25, 12, 0, 0, 7, tzinfo=timezone(timedelta(hours=2)))
    by_driver = [_subscriber(i, when) for i in range(3)]
    by_orm = [
        _subscriber(i, when) | {"email_key": f"orm{i}", "public_id": f"o{i}"} for i in range(3)
    ]
    columns = [c for c in table(Subscriber).c if c.name not in ("id", "email_key", "public_id")]
    async with db.transaction() as session:
        conn = await session.connection()
        created = await bulk.insert_rows(
            conn,
            table(Subscriber),
            by_driver,
            on_conflict_do_nothing="email_key",
            returning=("public_id", "email_key"),
        )
        await conn.execute(insert(table(Subscriber)), by_orm)
    assert sorted(created) == sorted((r["public_id"], r["email_key"]) for r in by_driver)
    async with db.transaction() as session:
        rows = (await session.execute(select(*columns).order_by(table(Subscriber).c.id))).all()
    assert rows[:3] == rows[3:]
    assert rows[0].created_at == when.astimezone(UTC)
    assert rows[0].attributes == by_driver[0]["attributes"]
    assert rows[0].soft_bounces == 0  # the server default fills what is not given


async def test_conflicts_are_skipped_and_not_returned(db: Database) -> None:
    when = datetime.now(UTC)
    async with db.transaction() as session:
        conn = await session.connection()
        await bulk.insert_rows(conn, table(Subscriber), [_subscriber(1, when)])
        again = await bulk.insert_rows(
            conn,
            table(Subscriber),
            [_subscriber(1, when) | {"public_id": "x"}, _subscriber(2, when)],
            on_conflict_do_nothing="email_key",
            returning=("email_key",),
        )
    assert again == [("ünïcode2@example.com",)]


async def test_many_rows_without_returning_and_nothing_for_no_rows(db: Database) -> None:
    when = datetime.now(UTC)
    rows = [
        {
            "type": "subscription.pending",
            "subscriber_id": None,
            "newsletter_id": None,
            "actor": "api",
            "ip": None,
            "data": {"i": i},
            "created_at": when,
        }
        for i in range(70)
    ]
    async with db.transaction() as session:
        conn = await session.connection()
        assert await bulk.insert_rows(conn, table(Event), rows) == []
        assert await bulk.insert_rows(conn, table(Event), []) == []
        stored = (await conn.execute(select(table(Event).c.data))).scalars().all()
    assert sorted(d["i"] for d in stored) == list(range(70))


async def test_a_column_with_a_python_default_must_be_given(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(ValueError, match=r"outbox\.status needs a value"):
            await bulk.insert_rows(
                await session.connection(), table(OutboxMessage), [{"kind": "email"}]
            )


async def test_more_rows_than_one_sqlite_statement_takes_are_all_written(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "SQLITE_MAX_PARAMETERS", 20)  # two rows of 8 columns a statement
    when = datetime.now(UTC)
    rows = [_subscriber(i, when) for i in range(5)]
    async with db.transaction() as session:
        created = await bulk.insert_rows(
            await session.connection(),
            table(Subscriber),
            rows,
            on_conflict_do_nothing="email_key",
            returning=("email_key",),
        )
    assert sorted(created) == sorted((r["email_key"],) for r in rows)
