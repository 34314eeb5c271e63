"""Purging sign-ups that were never confirmed: no personal data kept for people who never
said yes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import FieldError, InvalidInput
from service.mail import outbox
from service.models import (
    Confirmation,
    Event,
    OutboxMessage,
    Status,
    Subscriber,
    Subscription,
    utcnow,
)

AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_AGE = timedelta(days=100 * 366)  # older than the service; past it, "now - age" overflows
# Any fixed number: one purge at a time across processes (PostgreSQL advisory lock).
PURGE_LOCK = 0x6E6C5055


@dataclass
class PurgeResult:
    subscriptions: int
    subscribers: int


def parse_age(value: str) -> timedelta:
    """'30d', '12h', '90m' → a timedelta."""
    found = AGE.match(value)
    age = None
    if found and len(found.group(1)) <= 9:  # a billion days overflows a date
        age = timedelta(**{UNITS[found.group(2)]: int(found.group(1))})
    if age is None or age > MAX_AGE:
        raise InvalidInput(
            [FieldError("older_than", "invalid", "Use a number and s/m/h/d/w, like 30d or 12h.")]
        )
    return age


async def purge_pending(
    session: AsyncSession, older_than: timedelta, now: datetime | None = None
) -> PurgeResult | None:
    """Delete pending subscriptions older than the cutoff, and every subscriber left with
    nothing but those (with their confirmations, events and mail). None: another process
    is purging right now."""
    now = now or utcnow()
    if session.get_bind().dialect.name == "postgresql":
        locked = await session.scalar(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": PURGE_LOCK}
        )
        if not locked:
            return None
    cutoff = now - older_than
    stale = (Subscription.status == Status.pending.value) & (Subscription.pending_at < cutoff)
    others = exists().where(Subscription.subscriber_id == Subscriber.id, ~stale)
    doomed = select(Subscriber.id).where(
        exists().where(Subscription.subscriber_id == Subscriber.id), ~others
    )
    doomed_ids = list(await session.scalars(doomed))
    removed = await session.execute(delete(Subscription).where(stale))
    if doomed_ids:
        await session.execute(
            outbox.attempts_of(
                select(OutboxMessage.id).where(OutboxMessage.subscriber_id.in_(doomed_ids))
            )
        )
        for model in (Event, OutboxMessage):
            await session.execute(delete(model).where(model.subscriber_id.in_(doomed_ids)))
        await session.execute(
            delete(Confirmation).where(Confirmation.subscriber_id.in_(doomed_ids))
        )
        await session.execute(delete(Subscriber).where(Subscriber.id.in_(doomed_ids)))
    return PurgeResult(
        subscriptions=int(removed.rowcount or 0),  # type: ignore[attr-defined]
        subscribers=len(doomed_ids),
    )
