"""Every hot and admin query has an index that serves it (EXPLAIN on PostgreSQL).

With sequential scans switched off the planner still picks a sequential scan when no index
can serve the query, so a plan without "Seq Scan" proves the index is there and usable.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from service.db import Database
from tests.conftest import TestDatabase

QUERIES = {
    "sign-up: subscriber by address": "SELECT id FROM subscribers WHERE email_key = 'a@b.c'",
    "admin search: address prefix": (
        "SELECT id FROM subscribers WHERE email_key LIKE 'rea%' AND email_key ~>~ 'reader' "
        "ORDER BY email_key USING ~<~ LIMIT 50"
    ),
    "sign-up: known subscriptions": (
        "SELECT id, status FROM subscriptions WHERE subscriber_id IN (1, 2, 3)"
    ),
    "stats and CSV export: by newsletter and status": (
        "SELECT subscriber_id FROM subscriptions WHERE newsletter_id = 1 AND status = 'active'"
    ),
    "confirm: token": "SELECT id FROM confirmations WHERE token_hash = 'x'",
    "mail cap: recent mail of one address": (
        "SELECT count(*) FROM outbox WHERE subscriber_id = 1 AND created_at > now()"
    ),
    "worker: due messages": (
        "SELECT id FROM outbox WHERE status = 'queued' AND next_attempt_at <= now() "
        "ORDER BY id LIMIT 100"
    ),
    "event feed by type": "SELECT id FROM events WHERE type = 'x' AND id > 5 ORDER BY id LIMIT 100",
    "subscriber detail: events": "SELECT id FROM events WHERE subscriber_id = 1",
    "manage link: subscriber by public id": "SELECT id FROM subscribers WHERE public_id = 'x'",
    "API key": "SELECT id FROM api_keys WHERE key_hash = 'x'",
    "suppression": "SELECT id FROM suppressions WHERE email_hash = 'x'",
    "webhook log": (
        "SELECT id FROM webhook_deliveries WHERE webhook_id = 1 ORDER BY id DESC LIMIT 100"
    ),
}


@pytest.mark.parametrize("name", list(QUERIES))
async def test_query_is_served_by_an_index(
    name: str, db: Database, test_database: TestDatabase
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("EXPLAIN plans are checked on PostgreSQL, the production database")
    async with db.transaction() as session:
        await session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(
            row[0] for row in (await session.execute(text("EXPLAIN " + QUERIES[name]))).all()
        )
    assert "Seq Scan" not in plan, plan


async def test_one_unique_index_serves_addresses_and_prefix_search(
    db: Database, test_database: TestDatabase
) -> None:
    """Every new subscriber writes one email_key index entry, not two: the unique index has
    pattern ops, and ON CONFLICT (email_key) still finds it as its arbiter."""
    if test_database.backend != "postgresql":
        pytest.skip("operator classes are PostgreSQL's")
    async with db.transaction() as session:
        indexes = (
            await session.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE tablename = 'subscribers' AND indexdef LIKE '%(email_key%'"
                )
            )
        ).all()
        plan = "\n".join(
            row[0]
            for row in (
                await session.execute(
                    text(
                        "EXPLAIN INSERT INTO subscribers (public_id, email, email_key, "
                        "attributes, created_at, updated_at) VALUES ('p', 'a', 'a', '{}', "
                        "now(), now()) ON CONFLICT (email_key) DO NOTHING"
                    )
                )
            ).all()
        )
    assert len(indexes) == 1, indexes
    name, definition = indexes[0]
    assert "UNIQUE" in definition and "varchar_pattern_ops" in definition, definition
    assert f"Conflict Arbiter Indexes: {name}" in plan, plan
