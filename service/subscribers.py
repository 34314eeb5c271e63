"""Subscribers for ops: search, read, add, edit, set status, resend, erase."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service import events, suppression, tokens
from service.config import Settings
from service.errors import Conflict, FieldError, InvalidInput, NotFound, unknown_newsletters
from service.mail import outbox
from service.models import (
    Confirmation,
    Event,
    Newsletter,
    OutboxMessage,
    Status,
    Subscriber,
    Subscription,
    utcnow,
)
from service.newsletters import SLUG
from service.signup import Consent, mail_payload, subscribe
from service.signup_input import parse_profile, parse_signup

ALREADY_A_SUBSCRIBER = "This address is already a subscriber; set its subscriptions instead."
# Ops cannot make a suppressed address active: only its owner can, through double opt-in.
SUPPRESSED = FieldError(
    "email",
    "suppressed",
    "This address was erased, bounced or complained: it comes back only through double opt-in "
    "(add it as pending).",
)


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
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int = 50,
    after: int | str | None = None,
) -> list[SubscriberRow]:
    """Subscribers after the cursor, filtered; two queries, whatever the page size.

    A prefix search walks the address index in address order (the cursor is the last
    address), reading only one page of it; other searches go in id order. The created
    range includes created_after and excludes created_before."""
    query = select(Subscriber).limit(limit)
    if created_after is not None:
        query = query.where(Subscriber.created_at >= created_after)
    if created_before is not None:
        query = query.where(Subscriber.created_at < created_before)
    if email_prefix:
        query = query.where(
            Subscriber.email_key.like(_escape_like(email_prefix.lower()) + "%", escape="\\")
        )
        if session.get_bind().dialect.name == "postgresql":
            # Byte order, the order of the varchar_pattern_ops index that serves the LIKE: the
            # collation order of the unique index would filter its way through the table.
            query = query.order_by(text("subscribers.email_key USING ~<~"))
            if isinstance(after, str):
                query = query.where(Subscriber.email_key.op("~>~")(after))
        else:  # SQLite compares bytes (BINARY), the order of its index
            query = query.order_by(Subscriber.email_key)
            if isinstance(after, str):
                query = query.where(Subscriber.email_key > after)
    else:
        query = query.order_by(Subscriber.id)
        if isinstance(after, int):
            query = query.where(Subscriber.id > after)
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


@dataclass
class SubscriberDetail:
    subscriber: Subscriber
    subscriptions: list[tuple[Subscription, Newsletter]]
    events: list[Event]


async def get_subscriber(session: AsyncSession, public_id: str) -> Subscriber:
    subscriber = None
    if len(public_id) == 32:
        subscriber = await session.scalar(
            select(Subscriber).where(Subscriber.public_id == public_id)
        )
    if subscriber is None:
        raise NotFound("No such subscriber.")
    return subscriber


async def subscriber_detail(
    session: AsyncSession, public_id: str, event_limit: int = 100
) -> SubscriberDetail:
    """One person: subscriptions with their consent records, and the latest events."""
    subscriber = await get_subscriber(session, public_id)
    pairs = await session.execute(
        select(Subscription, Newsletter)
        .join(Newsletter, Newsletter.id == Subscription.newsletter_id)
        .where(Subscription.subscriber_id == subscriber.id)
        .order_by(Newsletter.slug)
    )
    found_events = await session.scalars(
        select(Event)
        .where(Event.subscriber_id == subscriber.id)
        .order_by(Event.id.desc())
        .limit(event_limit)
    )
    return SubscriberDetail(
        subscriber=subscriber,
        subscriptions=[(s, n) for s, n in pairs.all()],
        events=list(found_events),
    )


async def add_subscriber(
    session: AsyncSession,
    settings: Settings,
    *,
    email: str,
    newsletters: list[str],
    status: str,
    actor: str,
    consent_note: str | None,
    name: str | None = None,
    language: str | None = None,
    attributes: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Subscriber:
    """Ops adds someone: as `active` with a consent note saying where consent came from,
    or as `pending`, which sends the confirmation mail like a sign-up."""
    now = now or utcnow()
    raw = {
        "email": email,
        "newsletters": newsletters,
        "name": name,
        "language": language,
        "attributes": attributes,
    }
    data = parse_signup(raw, settings)
    note = (consent_note or "").strip()
    if status == Status.active.value and not note:
        raise InvalidInput([FieldError("consent_note", "required", "Say where consent came from.")])
    if status not in (Status.active.value, Status.pending.value):
        raise InvalidInput([FieldError("status", "invalid", "status is active or pending.")])
    key = data.address.key
    if key in await suppression.blocked(session, [key]):
        raise InvalidInput([FieldError("email", "blocked", "This address is blocked.")])
    existing = await session.scalar(select(Subscriber.id).where(Subscriber.email_key == key))
    if existing is not None:
        raise Conflict(ALREADY_A_SUBSCRIBER)
    consent = Consent(
        source="admin",
        page=note or None,
        actor=actor,
        # Pending means the reader confirms, on single opt-in lists too: no note says where
        # their consent came from.
        confirm=status == Status.pending.value,
    )
    if status == Status.pending.value:
        await subscribe(session, settings, data, consent, now)
        added = await session.get_one(Subscriber, await _id_of(session, key))
        if added.created_at != now:
            # Another add of the same address committed between the look above and the
            # sign-up's insert (PostgreSQL): this one's confirmation and events go back.
            raise Conflict(ALREADY_A_SUBSCRIBER)
        return added
    if key in await suppression.suppressed(session, [key]):
        raise InvalidInput([SUPPRESSED])
    found = await _newsletters(session, data.newsletters)
    subscriber = Subscriber(
        public_id=tokens.new_public_id(),
        email=data.address.email,
        email_key=key,
        name=data.name,
        language=data.language,
        attributes=data.attributes,
        created_at=now,
        updated_at=now,
    )
    session.add(subscriber)
    await session.flush()
    for newsletter in found:
        await set_subscription_status(
            session, subscriber, newsletter.slug, Status.active.value, actor, note, now
        )
    return subscriber


async def _id_of(session: AsyncSession, key: str) -> int:
    return (
        await session.execute(select(Subscriber.id).where(Subscriber.email_key == key))
    ).scalar_one()


async def _newsletters(session: AsyncSession, slugs: list[str]) -> list[Newsletter]:
    rows = {
        n.slug: n
        for n in await session.scalars(
            select(Newsletter).where(
                # A slug no newsletter can have (a NUL byte breaks PostgreSQL) is just unknown.
                Newsletter.slug.in_([s for s in slugs if SLUG.match(s)]),
                Newsletter.archived_at.is_(None),
            )
        )
    }
    unknown = [s for s in slugs if s not in rows]
    if unknown:
        raise InvalidInput([unknown_newsletters(unknown)])
    return [rows[s] for s in slugs]


async def update_subscriber(
    session: AsyncSession,
    settings: Settings,
    public_id: str,
    changes: dict[str, Any],
    actor: str,
) -> Subscriber:
    """Change name, language or attributes (ops only; never from the public form)."""
    subscriber = await get_subscriber(session, public_id)
    fields = {k: v for k, v in changes.items() if k in ("name", "language", "attributes")}
    name, language, attributes = parse_profile(fields, settings)
    checked = {"name": name, "language": language, "attributes": attributes}
    for key in fields:
        setattr(subscriber, key, checked[key])
    subscriber.updated_at = utcnow()
    await events.record(
        session,
        [
            events.event_row(
                "subscriber.updated",
                subscriber.id,
                None,
                actor,
                None,
                subscriber.updated_at,
                fields=sorted(fields),
            )
        ],
    )
    await session.flush()
    return subscriber


async def set_subscription_status(
    session: AsyncSession,
    subscriber: Subscriber,
    slug: str,
    status: str,
    actor: str,
    consent_note: str | None = None,
    now: datetime | None = None,
) -> Subscription:
    """Ops sets one subscription to active or unsubscribed; the change is an event."""
    now = now or utcnow()
    if status not in (Status.active.value, Status.unsubscribed.value):
        raise InvalidInput([FieldError("status", "invalid", "status is active or unsubscribed.")])
    try:
        [newsletter] = await _newsletters(session, [slug])
    except InvalidInput as exc:  # the slug is in the path: no such resource, as on GET
        raise NotFound(f"No newsletter {slug[:64]!r}.") from exc
    subscription = await session.scalar(
        select(Subscription).where(
            Subscription.subscriber_id == subscriber.id,
            Subscription.newsletter_id == newsletter.id,
        )
    )
    activating = status == Status.active.value and (
        subscription is None or subscription.status != status
    )
    if activating and subscriber.email_key in await suppression.suppressed(
        session, [subscriber.email_key]
    ):
        raise InvalidInput([SUPPRESSED])
    if subscription is None:
        if status == Status.unsubscribed.value:
            raise NotFound("Not subscribed to this newsletter.")
        subscription = Subscription(
            subscriber_id=subscriber.id,
            newsletter_id=newsletter.id,
            status=status,
            created_at=now,
            updated_at=now,
            consent_source="admin",
            consent_page=consent_note or None,
            consent_at=now,
        )
        session.add(subscription)
    elif subscription.status == status:
        return subscription
    subscription.status = status
    subscription.updated_at = now
    if status == Status.active.value:
        subscription.confirmed_at = now
        subscription.consent_source = "admin"
        subscription.consent_page = consent_note or subscription.consent_page
        subscription.consent_at = now
        event_type = "subscription.confirmed"
    else:
        subscription.unsubscribed_at = now
        event_type = "subscription.unsubscribed"
    await session.flush()
    await events.record(
        session,
        [
            events.event_row(
                event_type,
                subscriber.id,
                newsletter.id,
                actor,
                None,
                now,
                **({"note": consent_note} if consent_note else {}),
            )
        ],
    )
    return subscription


async def resend_confirmation(
    session: AsyncSession,
    settings: Settings,
    public_id: str,
    actor: str,
    now: datetime | None = None,
) -> list[Newsletter]:
    """A fresh confirmation mail for everything pending; ops decide, so the cap is not applied."""
    now = now or utcnow()
    subscriber = await get_subscriber(session, public_id)
    pending = list(
        await session.scalars(
            select(Newsletter)
            .join(Subscription, Subscription.newsletter_id == Newsletter.id)
            .where(
                Subscription.subscriber_id == subscriber.id,
                Subscription.status == Status.pending.value,
                Newsletter.archived_at.is_(None),
            )
            .order_by(Newsletter.id)
        )
    )
    if not pending:
        raise Conflict("Nothing is pending confirmation for this subscriber.")
    token, token_hash = tokens.new_confirmation_token()
    ttls = [n.confirmation_ttl_seconds for n in pending if n.confirmation_ttl_seconds]
    ttl = timedelta(seconds=min(ttls)) if ttls else settings.confirmation_ttl
    session.add(
        Confirmation(
            token_hash=token_hash,
            subscriber_id=subscriber.id,
            newsletter_ids=[n.id for n in pending],
            created_at=now,
            expires_at=now + ttl,
        )
    )
    await outbox.enqueue(
        session,
        "confirmation",
        subscriber.email,
        subscriber.id,
        mail_payload(subscriber.public_id, pending) | {"token": token},
        now,
    )
    await events.record(
        session,
        [events.event_row("subscriber.confirmation_resent", subscriber.id, None, actor, None, now)],
    )
    return pending


async def erase_subscriber(
    session: AsyncSession, public_id: str, actor: str, now: datetime | None = None
) -> None:
    """Erase one person: their rows and personal data go from every table; a hashed
    suppression entry stays so an import cannot bring them back."""
    now = now or utcnow()
    subscriber = await get_subscriber(session, public_id)
    await session.execute(delete(Event).where(Event.subscriber_id == subscriber.id))
    theirs = (OutboxMessage.subscriber_id == subscriber.id) | (
        OutboxMessage.recipient == subscriber.email
    )
    # Attempt errors can quote the address ("550 <x@y> unknown"): they go with the mail.
    await session.execute(outbox.attempts_of(select(OutboxMessage.id).where(theirs)))
    await session.execute(delete(OutboxMessage).where(theirs))
    await session.execute(delete(Confirmation).where(Confirmation.subscriber_id == subscriber.id))
    await session.execute(delete(Subscription).where(Subscription.subscriber_id == subscriber.id))
    gone = await session.execute(delete(Subscriber).where(Subscriber.id == subscriber.id))
    if gone.rowcount == 0:  # type: ignore[attr-defined]
        # A concurrent erasure of the same person committed first: one erasure, one event
        # (and one webhook call); this one is rolled back and told what a later one is.
        raise NotFound("No such subscriber.")
    await suppression.suppress(session, subscriber.email_key, "erased", now)
    await events.record(
        session,
        [
            events.event_row(
                "subscriber.erased", None, None, actor, None, now, subscriber=subscriber.public_id
            )
        ],
    )
