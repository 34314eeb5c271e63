"""An import's chunks written on several PostgreSQL connections at once: the same outcome,
row for row, as one connection writing them in file order."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from service import csv_import, suppression, tokens
from service.config import Settings
from service.db import Database
from service.models import BlockedEntry, Event, ImportJob, Subscriber, Subscription, utcnow
from tests.conftest import active_import_job, make_newsletter, truncate_all


async def _import(db: Database, settings: Settings, path: Path, chunk_rows: int) -> ImportJob:
    job_id = await active_import_job(db, path, actor="key:ops")
    return await csv_import.run_import(db, settings, job_id, chunk_rows=chunk_rows)


async def _counters(db: Database, job_id: int) -> tuple[int, int, int, int]:
    async with db.transaction() as session:
        job = await session.get_one(ImportJob, job_id)
        return job.rows_total, job.rows_imported, job.rows_skipped, job.rows_rejected


def _subscriber_row(email_key: str) -> Any:
    return Subscriber.__table__.insert().values(
        public_id=tokens.new_public_ids(1)[0],
        email=email_key,
        email_key=email_key,
        attributes={},
        created_at=utcnow(),
        updated_at=utcnow(),
    )


def test_report_lists_the_first_rows_by_line_whatever_order_chunks_commit() -> None:
    """Chunks committed out of file order give the same counts and the same listed rows:
    the first MAX_REPORTED rejected and skipped rows by line number."""
    cap = csv_import.MAX_REPORTED
    chunks = []
    for start in range(0, 3 * cap, cap):  # three chunks, each with `cap` rows of each kind
        lines = range(start * 2 + 1, start * 2 + 2 * cap + 1)
        rejected = [(n, "invalid email: x") for n in lines if n % 2]
        skipped = [(n, "duplicate") for n in lines if not n % 2]
        chunks.append((2 * cap, 1, rejected, skipped))

    def commit(order: list[int]) -> csv_import.ImportProgress:
        progress = csv_import.ImportProgress()
        for index in order:
            progress, _ = progress.after(*chunks[index])
        return progress

    in_order = commit([0, 1, 2])
    assert commit([2, 0, 1]) == in_order
    assert commit([1, 2, 0]) == in_order
    assert (in_order.total, in_order.imported) == (6 * cap, 3)
    assert (in_order.rejected, in_order.skipped) == (3 * cap, 3 * cap)
    assert in_order.report == [
        {"line": n, "reason": "invalid email: x" if n % 2 else "duplicate",
         "outcome": "rejected" if n % 2 else "skipped"}
        for n in range(1, 2 * cap + 1)
    ]  # fmt: skip
    # A later chunk whose rows are all past the listed ones changes no listed row.
    assert not in_order.after(2, 0, [(10**9, "x")], [])[1]


async def test_several_connections_import_what_one_connection_imports(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """Addresses repeated within and across chunk boundaries (in another case, with another
    name), invalid, blocked and suppressed rows: four connections leave the same subscribers,
    subscriptions, events, counters and report as one. The first row of an address wins."""
    rng = random.Random(7)
    addresses = [f"person{i}@example.com" for i in range(60)]
    addresses += ["troll@example.com", "x@blocked.example", "gone@example.com"]
    lines = ["email,name"]
    for i in range(240):
        if i % 23 == 5:
            lines.append(f"not-an-address-{i},Broken")
        else:
            address = rng.choice(addresses)
            lines.append(f"{address.upper() if i % 2 else address},Name {i}")
    path = tmp_path / "repeats.csv"
    path.write_text("\n".join(lines) + "\n")

    async def run(connections: int) -> tuple[Any, ...]:
        await truncate_all(db)
        await make_newsletter(db, "weekly")
        async with db.transaction() as session:
            session.add(BlockedEntry(kind="domain", value="blocked.example", note="trap"))
            session.add(BlockedEntry(kind="address", value="troll@example.com", note="troll"))
            await suppression.suppress(session, "gone@example.com", "erased")
        configured = settings.model_copy(update={"import_connections": connections})
        job = await _import(db, configured, path, chunk_rows=7)
        async with db.transaction() as session:
            people = (
                await session.execute(
                    select(Subscriber.email_key, Subscriber.name, Subscription.status)
                    .join(Subscription, Subscription.subscriber_id == Subscriber.id)
                    .order_by(Subscriber.email_key)
                )
            ).all()
            events = (
                await session.execute(
                    select(Subscriber.email_key, func.count())
                    .join(Event, Event.subscriber_id == Subscriber.id)
                    .where(Event.type == "subscription.confirmed")
                    .group_by(Subscriber.email_key)
                    .order_by(Subscriber.email_key)
                )
            ).all()
        report = csv_import.ImportReport(job, "weekly")
        counters = (job.status, job.rows_total, job.rows_imported, job.rows_skipped)
        return counters, job.rows_rejected, report.rejected, report.skipped, people, events

    one = await run(1)
    four = await run(4)
    assert four == one
    (status, total, imported, skipped), rejected, _, listed_skipped, people, events = one
    assert (status, total) == ("done", 240)
    assert imported == len(people) == len(events) and imported + skipped + rejected == total
    assert all(count == 1 for _, count in events)
    reasons = {entry["reason"] for entry in listed_skipped}
    assert reasons == {"duplicate", "blocked", "suppressed"}
    # Each address kept the name of its first row in the file.
    first_names: dict[str, str] = {}
    for line in lines[1:]:
        email, name = line.split(",")
        if "@" in email:
            first_names.setdefault(email.lower(), name)
    assert {key: name for key, name, _ in people} == {key: first_names[key] for key, _, _ in people}


async def test_a_chunk_waiting_on_a_row_does_not_hold_back_the_next_ones(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """With two connections, while one chunk waits on a row another transaction holds, the
    next chunks are written and committed, and the job's counters say exactly that."""
    if db.is_sqlite:
        pytest.skip("SQLite has one writer: its import uses one connection")
    await make_newsletter(db, "weekly")
    path = tmp_path / "list.csv"
    path.write_text(
        "email\na@example.com\nheld@example.com\nc@example.com\nd@example.com\n"
        "e@example.com\nf@example.com\n"
    )
    configured = settings.model_copy(update={"import_connections": 2})
    other = Database(settings)
    try:
        async with other.transaction() as holding:
            await holding.execute(_subscriber_row("held@example.com"))
            job_id = await active_import_job(db, path, actor="key:ops")
            importing = asyncio.ensure_future(
                csv_import.run_import(db, configured, job_id, chunk_rows=2)
            )
            for _ in range(200):  # the second and third chunks commit: 4 rows
                if await _counters(db, job_id) == (4, 4, 0, 0):
                    break
                await asyncio.sleep(0.05)
            assert await _counters(db, job_id) == (4, 4, 0, 0)
            assert not importing.done()
            await holding.rollback()
        job = await importing
    finally:
        await other.dispose()
    assert (job.status, job.rows_total, job.rows_imported, job.rows_skipped) == ("done", 6, 6, 0)
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Subscription)) == 6


async def test_a_chunk_chosen_as_a_deadlock_victim_is_written_again(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """Another transaction and the import's chunk wait on each other's rows; PostgreSQL
    aborts the chunk (it waited first). The chunk is written again: every row imported once,
    and the job done."""
    if db.is_sqlite:
        pytest.skip("PostgreSQL's deadlock detection")
    await make_newsletter(db, "weekly")
    path = tmp_path / "list.csv"
    path.write_text("email\nfirst@example.com\nsecond@example.com\n")
    other = Database(settings)
    try:
        async with other.transaction() as rival:
            # The rival waits long before looking for a deadlock: the import looks first.
            await rival.execute(text("SET LOCAL deadlock_timeout = '60s'"))
            await rival.execute(_subscriber_row("second@example.com"))
            importing = asyncio.ensure_future(_import(db, settings, path, chunk_rows=10))
            for _ in range(200):  # the chunk inserted first@ and waits on second@
                waiting = await rival.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND wait_event_type = 'Lock'"
                    )
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting
            # Waits on the chunk's first@ until PostgreSQL aborts the chunk (~1 s).
            await rival.execute(_subscriber_row("first@example.com"))
            await rival.rollback()
        job = await importing
    finally:
        await other.dispose()
    assert (job.status, job.rows_imported, job.rows_skipped) == ("done", 2, 0)
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Subscription)) == 2
        confirmed = select(func.count()).where(Event.type == "subscription.confirmed")
        assert await session.scalar(confirmed) == 2


async def _held_import(
    db: Database, settings: Settings, tmp_path: Path
) -> tuple[int, Database, Any, asyncio.Future[ImportJob]]:
    """An import on two connections whose first chunk waits on a row another transaction
    holds, once its two other chunks have committed: (job id, the other database, its
    holding session context, the running import)."""
    await make_newsletter(db, "weekly")
    path = tmp_path / "list.csv"
    path.write_text(
        "email\na@example.com\nheld@example.com\nc@example.com\nd@example.com\n"
        "e@example.com\nf@example.com\n"
    )
    other = Database(settings)
    holding = other.transaction()
    session = await holding.__aenter__()
    await session.execute(_subscriber_row("held@example.com"))
    job_id = await active_import_job(db, path, actor="key:ops")
    configured = settings.model_copy(update={"import_connections": 2})
    importing = asyncio.ensure_future(csv_import.run_import(db, configured, job_id, chunk_rows=2))
    for _ in range(200):
        if await _counters(db, job_id) == (4, 4, 0, 0):
            break
        await asyncio.sleep(0.05)
    assert await _counters(db, job_id) == (4, 4, 0, 0)
    return job_id, other, (holding, session), importing


async def _committed(db: Database) -> tuple[int, int]:
    async with db.transaction() as session:
        subscriptions = await session.scalar(select(func.count()).select_from(Subscription))
        confirmed = await session.scalar(
            select(func.count()).where(Event.type == "subscription.confirmed")
        )
        return int(subscriptions or 0), int(confirmed or 0)


async def test_a_cancelled_import_keeps_whole_chunks_and_counters_that_say_so(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """Cancelled with a chunk in flight: that chunk rolls back, the committed ones stay, the
    counters say exactly that, and the job is left to its lease (reported as interrupted)."""
    if db.is_sqlite:
        pytest.skip("SQLite has one writer: its import uses one connection")
    job_id, other, (holding, session), importing = await _held_import(db, settings, tmp_path)
    try:
        importing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await importing
        await session.rollback()
        await holding.__aexit__(None, None, None)
    finally:
        await other.dispose()
    assert await _counters(db, job_id) == (4, 4, 0, 0)
    assert await _committed(db) == (4, 4)
    async with db.transaction() as session:
        later = utcnow() + csv_import.LEASE + timedelta(seconds=1)
        assert await csv_import.fail_interrupted(session, later) == 1
    async with db.transaction() as session:
        job = await session.get_one(ImportJob, job_id)
        assert (job.status, job.rows_imported) == ("failed", 4)


async def test_a_chunk_that_fails_fails_the_job_after_the_others_end(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """The connection of a chunk in flight dies: the job fails with an internal error, and
    its counters are what the chunks that committed wrote."""
    if db.is_sqlite:
        pytest.skip("SQLite has one writer: its import uses one connection")
    job_id, other, (holding, session), importing = await _held_import(db, settings, tmp_path)
    try:
        ended = await session.scalar(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
        assert ended
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for it
            await importing
        await session.rollback()
        await holding.__aexit__(None, None, None)
    finally:
        await other.dispose()
    async with db.transaction() as session:
        job = await session.get_one(ImportJob, job_id)
        assert (job.status, job.error) == ("failed", "The import stopped on an internal error.")
        assert (job.rows_total, job.rows_imported) == (4, 4)
    assert await _committed(db) == (4, 4)
