"""The driver-level multi-row insert writes exactly what SQLAlchemy's insert writes, through
SQLAlchemy's connection and on the driver itself (the sign-up batch's way)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
import sqlalchemy
from sqlalchemy import insert, select

from service import bulk
from service.db import Database
from service.driver import Runner, SessionRunner
from service.models import Event, OutboxMessage, Subscriber, table

T = TypeVar("T")


@pytest.fixture(params=["session", "driver"])
def way(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def write(db: Database, way: str, work: Callable[[Runner], Coroutine[Any, Any, T]]) -> T:
    """`work` in one transaction: SQLAlchemy's session, or the driver's own connection (on
    SQLite, in aiosqlite's thread)."""
    if way == "driver":
        return await db.run_on_driver(work)
    async with db.transaction() as session:
        return await work(SessionRunner(await session.connection()))


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


async def test_rows_read_back_as_if_written_by_sqlalchemy(db: Database, way: str) -> None:
    when = datetime(2026, 11, 25, 12, 0, 0, 7, tzinfo=timezone(timedelta(hours=2)))
    by_driver = [_subscriber(i, when) for i in range(3)]
    by_orm = [
        _subscriber(i, when) | {"email_key": f"orm{i}", "public_id": f"o{i}"} for i in range(3)
    ]
    columns = [c for c in table(Subscriber).c if c.name not in ("id", "email_key", "public_id")]

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        return await bulk.insert_rows(
            runner,
            table(Subscriber),
            by_driver,
            on_conflict_do_nothing="email_key",
            returning=("public_id", "email_key"),
        )

    created = await write(db, way, work)
    async with db.transaction() as session:
        await session.execute(insert(table(Subscriber)), by_orm)
    assert sorted(created) == sorted((r["public_id"], r["email_key"]) for r in by_driver)
    async with db.transaction() as session:
        rows = (await session.execute(select(*columns).order_by(table(Subscriber).c.id))).all()
    assert rows[:3] == rows[3:]
    assert rows[0].created_at == when.astimezone(UTC)
    assert rows[0].attributes == by_driver[0]["attributes"]
    assert rows[0].soft_bounces == 0  # the server default fills what is not given


async def test_conflicts_are_skipped_and_not_returned(db: Database, way: str) -> None:
    when = datetime.now(UTC)

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        await bulk.insert_rows(runner, table(Subscriber), [_subscriber(1, when)])
        return await bulk.insert_rows(
            runner,
            table(Subscriber),
            [_subscriber(1, when) | {"public_id": "x"}, _subscriber(2, when)],
            on_conflict_do_nothing="email_key",
            returning=("email_key",),
        )

    again = await write(db, way, work)
    assert again == [("ünïcode2@example.com",)]


async def test_many_rows_without_returning_and_nothing_for_no_rows(db: Database, way: str) -> None:
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

    async def work(runner: Runner) -> list[list[tuple[Any, ...]]]:
        return [
            await bulk.insert_rows(runner, table(Event), rows),
            await bulk.insert_rows(runner, table(Event), []),
        ]

    assert await write(db, way, work) == [[], []]
    async with db.transaction() as session:
        stored = (await session.execute(select(table(Event).c.data))).scalars().all()
    assert sorted(d["i"] for d in stored) == list(range(70))


async def test_a_column_with_a_python_default_must_be_given(db: Database) -> None:
    async with db.transaction() as session:
        with pytest.raises(ValueError, match=r"outbox\.status needs a value"):
            await bulk.insert_rows(
                SessionRunner(await session.connection()), table(OutboxMessage), [{"kind": "email"}]
            )


async def test_more_rows_than_one_sqlite_statement_takes_are_all_written(
    db: Database, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "SQLITE_MAX_PARAMETERS", 20)  # two rows of 8 columns a statement
    when = datetime.now(UTC)
    rows = [_subscriber(i, when) for i in range(5)]

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        return await bulk.insert_rows(
            runner,
            table(Subscriber),
            rows,
            on_conflict_do_nothing="email_key",
            returning=("email_key",),
        )

    created = await write(db, way, work)
    assert sorted(created) == sorted((r["email_key"],) for r in rows)


async def test_rows_of_several_tables_are_written_in_one_statement_on_postgresql(
    db: Database,
) -> None:
    when = datetime(2026, 11, 25, 17, 0, 0, 42, tzinfo=UTC)
    events = [
        {
            "type": "subscription.pending",
            "subscriber_id": i,
            "newsletter_id": None,
            "actor": "api",
            "ip": "192.0.2.1",
            "data": {"i": i},
            "created_at": when,
        }
        for i in range(3)
    ]
    async with db.transaction() as session:
        conn = await session.connection()
        runner = SessionRunner(conn)
        [(subscriber_id,)] = await bulk.insert_rows(
            runner, table(Subscriber), [_subscriber(1, when)], returning=("id",)
        )
        mails = [
            {
                "kind": "email",
                "template": "confirmation",
                "recipient": f"r{i}@example.com",
                "subscriber_id": subscriber_id,
                "payload": {"token": f"t{i}", "newsletters": [1, 2]},
                "status": "queued",
                "attempts": 0,
                "next_attempt_at": when,
                "created_at": when,
            }
            for i in range(2)
        ]
        statements: list[str] = []

        def count(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
            statements.append(sql)

        sqlalchemy.event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        try:
            parts = [(table(Event), events), (table(Subscriber), []), (table(OutboxMessage), mails)]
            await bulk.insert_many(runner, parts)
            await bulk.insert_many(runner, [])
        finally:
            sqlalchemy.event.remove(db.engine.sync_engine, "before_cursor_execute", count)
        stored_events = (await conn.execute(select(table(Event)))).all()
        stored_mail = (await conn.execute(select(table(OutboxMessage)))).all()
    if db.engine.dialect.name == "postgresql":  # SQLite's go to the driver, unseen by events
        assert len(statements) == 1, statements
    assert sorted((e.subscriber_id, e.ip, e.data["i"]) for e in stored_events) == [
        (i, "192.0.2.1", i) for i in range(3)
    ]
    assert {e.created_at for e in stored_events} == {when}
    assert sorted((m.recipient, m.payload["token"]) for m in stored_mail) == [
        ("r0@example.com", "t0"),
        ("r1@example.com", "t1"),
    ]
    assert {(m.subscriber_id, m.status, m.next_attempt_at) for m in stored_mail} == {
        (subscriber_id, "queued", when)
    }


async def test_rows_are_part_of_the_callers_transaction_and_errors_are_sqlalchemys(
    db: Database, way: str
) -> None:
    when = datetime.now(UTC)

    async def fails(runner: Runner) -> None:
        await bulk.insert_rows(runner, table(Subscriber), [_subscriber(1, when)])
        await bulk.insert_rows(runner, table(Subscriber), [_subscriber(2, when)], returning=("id",))
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError, match="rolled back"):
        await write(db, way, fails)
    async with db.transaction() as session:
        assert (await session.execute(select(table(Subscriber).c.id))).all() == []

    async def first(runner: Runner) -> list[tuple[Any, ...]]:
        return await bulk.insert_rows(runner, table(Subscriber), [_subscriber(1, when)])

    await write(db, way, first)
    # A unique key broken without ON CONFLICT: SQLAlchemy's IntegrityError, whatever the path,
    # and the connection serves the next transaction.
    for returning in ((), ("id",)):

        async def again(runner: Runner, returning: tuple[str, ...] = returning) -> None:
            other = _subscriber(1, when) | {"public_id": "other"}
            await bulk.insert_rows(runner, table(Subscriber), [other], returning=returning)

        with pytest.raises(sqlalchemy.exc.IntegrityError):
            await write(db, way, again)
    async with db.transaction() as session:
        assert len((await session.execute(select(table(Subscriber).c.id))).all()) == 1


async def test_none_in_a_json_column_is_stored_as_sqlalchemy_stores_it(
    db: Database, way: str
) -> None:
    when = datetime.now(UTC)
    mail = {
        "kind": "email",
        "template": "welcome",
        "recipient": "r@example.com",
        "subscriber_id": None,
        "payload": None,
        "status": "queued",
        "attempts": 0,
        "next_attempt_at": when,
        "created_at": when,
    }
    outbox = table(OutboxMessage)

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        return await bulk.insert_rows(runner, outbox, [mail | {"template": "driver"}])

    await write(db, way, work)
    async with db.transaction() as session:
        await session.execute(insert(outbox), [mail | {"template": "sqlalchemy"}])
        null = outbox.c.payload.is_(None)
        found = (await session.execute(select(outbox.c.template, null))).all()
    assert sorted(found) == sorted([("driver", False), ("sqlalchemy", False)])


async def test_a_fan_out_statement_reads_the_first_parts_rows_on_postgresql_only(
    db: Database, way: str
) -> None:
    when = datetime.now(UTC)
    fan_out = bulk.FanOut(
        returning=("id", "created_at"),
        sql="INSERT INTO events (type, actor, data, created_at) "
        "SELECT 'copy', 'fan-out', json_build_object('of', id), created_at FROM w0",
    )
    rows = [
        {"type": "t", "actor": "test", "ip": None, "data": {}, "created_at": when} for _ in range(2)
    ]

    async def work(runner: Runner) -> None:
        await bulk.insert_many(runner, [(table(Event), rows)], then=fan_out)
        await bulk.insert_many(runner, [(table(Event), [])], then=fan_out)  # nothing to read

    if db.engine.dialect.name != "postgresql":
        with pytest.raises(ValueError, match="PostgreSQL"):
            await write(db, way, work)
        return
    await write(db, way, work)
    async with db.transaction() as session:
        stored = (await session.execute(select(table(Event)))).all()
    originals = {e.id for e in stored if e.actor == "test"}
    assert len(originals) == 2
    assert sorted(e.data["of"] for e in stored if e.actor == "fan-out") == sorted(originals)


async def test_json_values_holding_nul_characters_read_back_as_written(
    db: Database, way: str
) -> None:
    """PostgreSQL refuses "\\u0000" where it parses JSON into text; a JSON column keeps it."""
    when = datetime.now(UTC)
    hostile = {"k\x00": "x\x00y", "list": ["\x00"]}

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        row = _subscriber(1, when) | {"attributes": hostile}
        return await bulk.insert_rows(runner, table(Subscriber), [row])

    await write(db, way, work)
    async with db.transaction() as session:
        stored = await session.scalar(select(table(Subscriber).c.attributes))
    assert stored == hostile


async def test_an_integer_past_64_bits_in_a_json_column_reads_back_as_written(
    db: Database, way: str
) -> None:
    """The fast encoder refuses such an integer; the row is written all the same."""
    when = datetime.now(UTC)
    attributes = {"big": 2**70, "negative": -(2**64), "text": "ж"}

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        return await bulk.insert_rows(
            runner, table(Subscriber), [_subscriber(1, when) | {"attributes": attributes}]
        )

    await write(db, way, work)
    async with db.transaction() as session:
        stored = await session.scalar(select(table(Subscriber).c.attributes))
    assert stored == attributes


async def test_a_naive_timestamp_is_refused_and_nothing_is_written(db: Database, way: str) -> None:
    """Without an offset, PostgreSQL would read it in the session's time zone."""
    naive = datetime(2026, 11, 25, 12, 0, 0)

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        rows = [_subscriber(1, datetime.now(UTC)), _subscriber(2, naive)]
        return await bulk.insert_rows(runner, table(Subscriber), rows)

    with pytest.raises(ValueError, match="naive datetime"):
        await write(db, way, work)
    async with db.transaction() as session:
        assert (
            await session.scalar(select(sqlalchemy.func.count()).select_from(table(Subscriber)))
            == 0
        )


async def test_a_value_longer_than_its_column_is_cut_as_an_explicit_cast_cuts_it(
    db: Database, way: str
) -> None:
    """As the typed arrays this replaced did: an actor named by a 100-character key name."""
    if db.engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not enforce VARCHAR lengths")
    row = {"type": "t", "actor": "key:" + "k" * 100, "ip": None, "data": {}}

    async def work(runner: Runner) -> list[tuple[Any, ...]]:
        return await bulk.insert_rows(
            runner, table(Event), [row | {"created_at": datetime.now(UTC)}]
        )

    await write(db, way, work)
    async with db.transaction() as session:
        actor = await session.scalar(select(table(Event).c.actor))
    assert actor == ("key:" + "k" * 100)[:100]


async def test_work_that_waits_for_something_else_is_refused_on_sqlites_thread(
    db: Database,
) -> None:
    """On SQLite the work runs in aiosqlite's thread, where only the runner may be awaited;
    what it wrote is rolled back and the connection serves the next transaction."""
    when = datetime.now(UTC)

    async def waits(runner: Runner) -> None:
        await bulk.insert_rows(runner, table(Subscriber), [_subscriber(1, when)])
        await asyncio.sleep(0)

    if db.is_sqlite:
        with pytest.raises(RuntimeError, match="may await only its runner"):
            await db.run_on_driver(waits)
    else:
        await db.run_on_driver(waits)

    async def count(runner: Runner) -> list[tuple[Any, ...]]:
        return await runner.rows_sql("SELECT count(*) FROM subscribers", ())

    assert await db.run_on_driver(count) == [(0 if db.is_sqlite else 1,)]


async def test_a_family_writes_new_parents_and_only_their_children_on_postgresql_only(
    db: Database, way: str
) -> None:
    when = datetime(2026, 12, 3, 8, 0, 0, 5, tzinfo=UTC)
    fan_out = bulk.FanOut(
        returning=("id", "subscriber_id"),
        sql="INSERT INTO events (type, actor, data, created_at) "
        "SELECT 'copy', 'fan-out', json_build_object('of', subscriber_id), now() FROM w0",
    )

    def event(placeholder: int, i: int) -> dict[str, Any]:
        return {
            "type": "t",
            "subscriber_id": placeholder,
            "newsletter_id": None,
            "actor": "family",
            "ip": None,
            "data": {"i": i},
            "created_at": when,
        }

    def mail(placeholder: int, i: int) -> dict[str, Any]:
        return {
            "kind": "email",
            "template": "confirmation",
            "recipient": f"r{i}@example.com",
            "subscriber_id": placeholder,
            "payload": {"i": i},
            "status": "queued",
            "attempts": 0,
            "next_attempt_at": when,
            "created_at": when,
        }

    async def work(runner: Runner) -> dict[int, int]:
        known = [_subscriber(1, when)]
        await bulk.insert_rows(runner, table(Subscriber), known)
        # 1 is known already (its key exists), 0 and 2 are new; -2 has two events and no mail.
        parents = [_subscriber(i, when) | {"public_id": f"new{i}"} for i in range(3)]
        return await bulk.insert_family(
            runner,
            (table(Subscriber), parents, [-1, -2, -3]),
            "email_key",
            [
                (table(Event), [event(-1, 0), event(-2, 1), event(-2, 11), event(-3, 2)]),
                (table(OutboxMessage), [mail(-1, 0), mail(-3, 2)]),
                (table(Event), []),  # an empty part is left out
            ],
            ref="subscriber_id",
            then=fan_out,
        )

    if db.engine.dialect.name != "postgresql":
        with pytest.raises(ValueError, match="PostgreSQL"):
            await write(db, way, work)
        return
    written = await write(db, way, work)
    async with db.transaction() as session:
        subscribers = {
            s.email_key: (s.id, s.public_id)
            for s in (await session.execute(select(table(Subscriber)))).all()
        }
        stored = (await session.execute(select(table(Event)))).all()
        mails = (await session.execute(select(table(OutboxMessage)))).all()
    new = {key: ids for key, ids in subscribers.items() if ids[1].startswith("new")}
    assert sorted(new) == ["ünïcode0@example.com", "ünïcode2@example.com"]
    assert written == {-1: new["ünïcode0@example.com"][0], -3: new["ünïcode2@example.com"][0]}
    by_subscriber = sorted((e.subscriber_id, e.data["i"]) for e in stored if e.actor == "family")
    assert by_subscriber == sorted([(written[-1], 0), (written[-3], 2)])
    assert sorted((m.subscriber_id, m.recipient) for m in mails) == sorted(
        [(written[-1], "r0@example.com"), (written[-3], "r2@example.com")]
    )
    copies = sorted(e.data["of"] for e in stored if e.actor == "fan-out")
    assert copies == sorted([written[-1], written[-3]])
