"""The event log: every state change, the audit trail, and the source of webhook calls."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from service import bulk
from service.driver import Query, Runner, SessionRunner
from service.models import (
    Event,
    Newsletter,
    OutboxMessage,
    OutboxStatus,
    Subscriber,
    Webhook,
    table,
    utcnow,
)

EVENT_TYPES = (
    "subscription.pending",
    "subscription.confirmed",
    "subscription.unsubscribed",
    "subscription.bounced",
    "subscriber.erased",
)


ACTIVE_WEBHOOKS = Query(select(Webhook.id, Webhook.event_types).where(Webhook.active))
# On PostgreSQL a call to each webhook that wants an event is queued in the statement that
# writes the events: a join with the webhooks, where reading them first cost a round trip.
WEBHOOK_CALLS = bulk.FanOut(
    returning=("id", "type", "created_at"),
    sql=(
        "INSERT INTO outbox (kind, template, payload, status, attempts, next_attempt_at, "  # noqa: S608
        "created_at) SELECT 'webhook', 'webhook', "
        "json_build_object('webhook_id', h.id, 'event_id', e.id), "
        f"'{OutboxStatus.queued.value}', 0, e.created_at, e.created_at "
        "FROM w0 AS e JOIN webhooks AS h ON h.active AND h.event_types::jsonb ? e.type "
        "ORDER BY e.id, h.id"
    ),
)


def event_row(
    type_: str,
    subscriber_id: int | None,
    newsletter_id: int | None,
    actor: str,
    ip: str | None,
    now: datetime,
    **data: Any,
) -> dict[str, Any]:
    return {
        "type": type_,
        "subscriber_id": subscriber_id,
        "newsletter_id": newsletter_id,
        "actor": actor,
        "ip": ip,
        "data": data,
        "created_at": now,
    }


async def record(
    session: AsyncSession,
    rows: list[dict[str, Any]],
    along: Sequence[tuple[Table, Sequence[dict[str, Any]]]] = (),
) -> None:
    """Append events and, in the same transaction, queue a call to every webhook that wants
    one of them (the transactional outbox covers webhooks as it covers mail).

    `along`: other rows of the caller's, written with the events (bulk.insert_many's rules):
    a hot path saves a round trip per table.
    """
    await record_on(SessionRunner(await session.connection()), rows, along)


async def record_on(
    runner: Runner,
    rows: list[dict[str, Any]],
    along: Sequence[tuple[Table, Sequence[dict[str, Any]]]] = (),
) -> None:
    """record() on a service.driver Runner."""
    if not rows:
        await bulk.insert_many(runner, along)
        return
    if runner.dialect.name == "postgresql":
        await bulk.insert_many(runner, [(table(Event), rows), *along], then=WEBHOOK_CALLS)
        return
    wanted = [(hook_id, set(types)) for hook_id, types in await runner.rows(ACTIVE_WEBHOOKS, {})]
    if not any(row["type"] in types for row in rows for _, types in wanted):
        await bulk.insert_many(runner, [(table(Event), rows), *along])
        return
    await bulk.insert_many(runner, along)
    written = await bulk.insert_rows(runner, table(Event), rows, returning=("id", "type"))
    now = utcnow()
    calls = [
        {
            "kind": "webhook",
            "template": "webhook",
            "recipient": None,
            "subscriber_id": None,
            "payload": {"webhook_id": hook_id, "event_id": event_id},
            "status": OutboxStatus.queued.value,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for event_id, event_type in sorted(written)
        for hook_id, types in wanted
        if event_type in types
    ]
    await bulk.insert_rows(runner, table(OutboxMessage), calls)


async def record_with_new_subscribers(
    runner: Runner,
    subscribers: Sequence[dict[str, Any]],
    placeholders: Sequence[int],
    rows: list[dict[str, Any]],
    along: Sequence[tuple[Table, Sequence[dict[str, Any]]]] = (),
    only: bulk.Only | None = None,
) -> dict[int, int]:
    """record_on() for the events (and `along` rows) of subscribers written in the same
    statement, those whose address is new only (PostgreSQL: bulk.insert_family, each row's
    subscriber_id a placeholder; `only` as there). Returns the new subscribers' ids by
    placeholder."""
    return await bulk.insert_family(
        runner,
        (table(Subscriber), subscribers, placeholders),
        "email_key",
        [(table(Event), rows), *along],
        ref="subscriber_id",
        then=WEBHOOK_CALLS,
        only=only,
    )


async def feed(
    session: AsyncSession, after_id: int | None, event_type: str | None, limit: int
) -> list[tuple[Event, str | None, str | None]]:
    """Events in id order after the cursor, with the subscriber's public id and the slug."""
    query = (
        select(Event, Subscriber.public_id, Newsletter.slug)
        .outerjoin(Subscriber, Subscriber.id == Event.subscriber_id)
        .outerjoin(Newsletter, Newsletter.id == Event.newsletter_id)
        .order_by(Event.id)
        .limit(limit)
    )
    if after_id is not None:
        query = query.where(Event.id > after_id)
    if event_type:
        query = query.where(Event.type == event_type)
    return [(e, p, s) for e, p, s in (await session.execute(query)).all()]
