"""Looking people up for ops."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import Newsletter, Subscriber, Subscription


@dataclass
class SubscriberRow:
    subscriber: Subscriber
    subscriptions: list[tuple[str, str]] = field(default_factory=list)  # (slug, status)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def search_subscribers(
    session: AsyncSession,
    *,
    email_prefix: str | None = None,
    newsletter: str | None = None,
    status: str | None = None,
    limit: int = 50,
    after_id: int | None = None,
) -> list[SubscriberRow]:
    """Subscribers in id order after the cursor, filtered; two queries, whatever the page size."""
    query = select(Subscriber).order_by(Subscriber.id).limit(limit)
    if after_id is not None:
        query = query.where(Subscriber.id > after_id)
    if email_prefix:
        query = query.where(
            Subscriber.email_key.like(_escape_like(email_prefix.lower()) + "%", escape="\\")
        )
    if newsletter or status:
        sub = select(Subscription.subscriber_id).join(
            Newsletter, Newsletter.id == Subscription.newsletter_id
        )
        if newsletter:
            sub = sub.where(Newsletter.slug == newsletter)
        if status:
            sub = sub.where(Subscription.status == status)
        query = query.where(Subscriber.id.in_(sub))
    subscribers = list(await session.scalars(query))
    rows = {s.id: SubscriberRow(s) for s in subscribers}
    if rows:
        pairs = await session.execute(
            select(Subscription.subscriber_id, Newsletter.slug, Subscription.status)
            .join(Newsletter, Newsletter.id == Subscription.newsletter_id)
            .where(Subscription.subscriber_id.in_(rows))
            .order_by(Subscription.subscriber_id, Newsletter.slug)
        )
        for subscriber_id, slug, sub_status in pairs.all():
            rows[subscriber_id].subscriptions.append((slug, sub_status))
    return list(rows.values())
