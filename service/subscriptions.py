"""The subscription life cycle, top to bottom: subscribe → confirm → manage → unsubscribe.

Every function takes the session of the caller's one transaction and returns plain data or
raises a domain exception. Sign-up itself, the hot path, lives in service/signup.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service import events, suppression, tokens
from service.addresses import Address
from service.config import Settings
from service.db import insert_for
from service.errors import (
    ConfirmationExpired,
    InvalidInput,
    NotFound,
    TokenNotFound,
    UnsubscribedSince,
    unknown_newsletters,
)
from service.mail import outbox
from service.models import (
    Confirmation,
    Newsletter,
    Status,
    Subscriber,
    Subscription,
    utcnow,
)
from service.newsletters import SLUG
from service.observability import CONFIRMATIONS, UNSUBSCRIBES
from service.signup import Consent, SignupResult, consent_event, mail_payload, subscribe
from service.signup_input import SignupInput


@dataclass
class ConfirmResult:
    newsletters: list[Newsletter]  # those the reader now receives
    already_confirmed: bool = False
    # Covered by the link, but unsubscribed (or bounced) since: not activated again.
    unsubscribed_since: list[Newsletter] = field(default_factory=list)

    @property
    def redirect_url(self) -> str | None:
        return self.newsletters[0].redirect_after_confirm if self.newsletters else None


@dataclass
class PendingConfirmation:
    """What the confirm page shows before the reader presses the button."""

    newsletters: list[Newsletter]
    confirmed: bool
    unsubscribed_since: list[Newsletter] = field(default_factory=list)


@dataclass
class Preference:
    newsletter: Newsletter
    status: str | None


@dataclass
class Preferences:
    subscriber: Subscriber
    items: list[Preference] = field(default_factory=list)


async def public_newsletters(session: AsyncSession) -> list[Newsletter]:
    """The newsletters a reader may see and sign up to: not archived."""
    rows = await session.scalars(
        select(Newsletter).where(Newsletter.archived_at.is_(None)).order_by(Newsletter.id)
    )
    return list(rows)


async def newsletters_by_slug(session: AsyncSession, slugs: Sequence[str]) -> list[Newsletter]:
    """Public (not archived) newsletters by slug; an unknown one is a field error."""
    # A slug no newsletter can have (a NUL byte breaks PostgreSQL) never reaches a query.
    wellformed = [s for s in slugs if SLUG.match(s)]
    rows = await session.scalars(
        select(Newsletter).where(Newsletter.slug.in_(wellformed), Newsletter.archived_at.is_(None))
    )
    found = {n.slug: n for n in rows}
    unknown = [s for s in slugs if s not in found]
    if unknown:
        raise InvalidInput([unknown_newsletters(unknown)])
    return [found[s] for s in slugs]


async def unknown_slugs(session: AsyncSession, slugs: Sequence[str]) -> list[str]:
    """Those of `slugs` (each already a well-formed slug) no public newsletter has."""
    found = set(
        await session.scalars(
            select(Newsletter.slug).where(
                Newsletter.slug.in_(slugs), Newsletter.archived_at.is_(None)
            )
        )
    )
    return [s for s in slugs if s not in found]


async def _confirmation(session: AsyncSession, token: str) -> Confirmation:
    if len(token) > 128:
        raise TokenNotFound()
    found = await session.scalar(
        select(Confirmation).where(Confirmation.token_hash == tokens.hash_token(token))
    )
    if found is None:
        raise TokenNotFound()
    return found


async def _newsletters_by_id(session: AsyncSession, ids: Sequence[int]) -> list[Newsletter]:
    rows = await session.scalars(select(Newsletter).where(Newsletter.id.in_(ids)))
    by_id = {n.id: n for n in rows}
    return [by_id[i] for i in ids if i in by_id]


async def inspect_confirmation(
    session: AsyncSession, token: str, now: datetime | None = None
) -> PendingConfirmation:
    """What the GET of a confirm link shows; it changes nothing (scanners prefetch links)."""
    now = now or utcnow()
    found = await _confirmation(session, token)
    if found.confirmed_at is None and found.expires_at <= now:
        raise ConfirmationExpired()
    live, ended = await _still_wanted(
        session, found, await _newsletters_by_id(session, found.newsletter_ids)
    )
    return PendingConfirmation(
        newsletters=live, confirmed=found.confirmed_at is not None, unsubscribed_since=ended
    )


async def _still_wanted(
    session: AsyncSession, found: Confirmation, newsletters: list[Newsletter]
) -> tuple[list[Newsletter], list[Newsletter]]:
    """Split what a confirmation covers into what still stands and what the reader has
    unsubscribed from (or what bounced) since; raise UnsubscribedSince when nothing stands.

    The later choice wins: a confirm link clicked after an unsubscribe activates nothing, and
    must not say "confirmed" either.
    """
    statuses = dict(
        (
            await session.execute(
                select(Subscription.newsletter_id, Subscription.status).where(
                    Subscription.subscriber_id == found.subscriber_id,
                    Subscription.newsletter_id.in_(found.newsletter_ids),
                )
            )
        ).all()
    )
    gone = (Status.unsubscribed.value, Status.bounced.value)
    ended = [n for n in newsletters if statuses.get(n.id) in gone]
    live = [n for n in newsletters if statuses.get(n.id) not in gone]
    if ended and not live:
        # The rollback that follows would expire them; the page still shows them.
        for newsletter in ended:
            session.expunge(newsletter)
        raise UnsubscribedSince(ended)
    return live, ended


async def confirm(
    session: AsyncSession, token: str, consent: Consent, now: datetime | None = None
) -> ConfirmResult:
    """Activate the subscriptions a confirmation covers; confirming twice is a no-op.

    Those unsubscribed (or bounced) since the link was sent stay so; when that is all of
    them, UnsubscribedSince is raised and nothing changes.
    """
    now = now or utcnow()
    found = await _confirmation(session, token)
    newsletters = await _newsletters_by_id(session, found.newsletter_ids)
    if found.confirmed_at is not None:
        live, ended = await _still_wanted(session, found, newsletters)
        return ConfirmResult(live, already_confirmed=True, unsubscribed_since=ended)
    if found.expires_at <= now:
        raise ConfirmationExpired()
    live, ended = await _still_wanted(session, found, newsletters)
    # Only this transaction may flip confirmed_at; a concurrent double click sees 0 rows.
    claimed = await session.execute(
        update(Confirmation)
        .where(Confirmation.id == found.id, Confirmation.confirmed_at.is_(None))
        .values(confirmed_at=now)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount == 0:  # type: ignore[attr-defined]
        return ConfirmResult(live, already_confirmed=True, unsubscribed_since=ended)
    rows = await session.execute(
        update(Subscription)
        .where(
            Subscription.subscriber_id == found.subscriber_id,
            Subscription.newsletter_id.in_(found.newsletter_ids),
            Subscription.status == Status.pending.value,
        )
        .values(status=Status.active.value, confirmed_at=now, updated_at=now)
        .returning(Subscription.newsletter_id)
        .execution_options(synchronize_session=False)
    )
    activated_ids = set(rows.scalars().all())
    activated = [n for n in newsletters if n.id in activated_ids]
    if activated:
        CONFIRMATIONS.inc()
        await events.record(
            session,
            [
                consent_event("subscription.confirmed", found.subscriber_id, n.id, consent, now)
                for n in activated
            ],
        )
        subscriber = await session.get_one(Subscriber, found.subscriber_id)
        # Confirming by double opt-in is fresh consent: an earlier erasure no longer binds.
        await suppression.lift(session, subscriber.email_key)
        await outbox.enqueue(
            session,
            "welcome",
            subscriber.email,
            subscriber.id,
            mail_payload(subscriber.public_id, activated),
            now,
        )
    return ConfirmResult(live, unsubscribed_since=ended)


async def resend_confirmation(
    session: AsyncSession,
    settings: Settings,
    token: str,
    consent: Consent,
    now: datetime | None = None,
) -> SignupResult:
    """Sign up again for what an expired confirmation covered (the expired page's form)."""
    now = now or utcnow()
    found = await _confirmation(session, token)
    subscriber = await session.get_one(Subscriber, found.subscriber_id)
    newsletters = await _newsletters_by_id(session, found.newsletter_ids)
    live = [n for n in newsletters if n.archived_at is None]
    if not live:
        raise NotFound("These newsletters are no longer published.")
    data = SignupInput(
        address=Address(subscriber.email, subscriber.email.lower()),
        newsletters=[n.slug for n in live],
    )
    return await subscribe(session, settings, data, consent, now)


async def subscriber_by_token(session: AsyncSession, keys: Sequence[str], token: str) -> Subscriber:
    """The reader a manage/unsubscribe link belongs to."""
    public_id = tokens.verify_manage_token(keys, token)
    if public_id is None:
        raise TokenNotFound()
    subscriber = await session.scalar(select(Subscriber).where(Subscriber.public_id == public_id))
    if subscriber is None:
        raise TokenNotFound()
    return subscriber


async def preferences(session: AsyncSession, subscriber: Subscriber) -> Preferences:
    """Every public newsletter with this reader's status on it (None = never subscribed)."""
    statuses = dict(
        (
            await session.execute(
                select(Subscription.newsletter_id, Subscription.status).where(
                    Subscription.subscriber_id == subscriber.id
                )
            )
        ).all()
    )
    return Preferences(
        subscriber=subscriber,
        items=[Preference(n, statuses.get(n.id)) for n in await public_newsletters(session)],
    )


async def link_newsletter(
    session: AsyncSession, subscriber: Subscriber, slug: str
) -> Newsletter | None:
    """The newsletter an unsubscribe link's `?newsletter=` names: a public one, or an archived
    one this reader was on (mail sent before it was archived still carries the link)."""
    if not SLUG.match(slug):  # never send a NUL byte or the like to a query
        return None
    newsletter = await session.scalar(select(Newsletter).where(Newsletter.slug == slug))
    if newsletter is None or newsletter.archived_at is None:
        return newsletter
    had = await session.scalar(
        select(Subscription.id).where(
            Subscription.subscriber_id == subscriber.id,
            Subscription.newsletter_id == newsletter.id,
        )
    )
    return newsletter if had is not None else None


async def unsubscribe(
    session: AsyncSession,
    subscriber: Subscriber,
    newsletter_slug: str | None,
    consent: Consent,
    now: datetime | None = None,
) -> list[Newsletter]:
    """Unsubscribe from one newsletter, or from all without a slug. Repeating is harmless."""
    now = now or utcnow()
    query = (
        select(Newsletter.id)
        .join(Subscription, Subscription.newsletter_id == Newsletter.id)
        .where(Subscription.subscriber_id == subscriber.id)
    )
    if newsletter_slug is not None:
        if not SLUG.match(newsletter_slug):  # never send a NUL byte or the like to a query
            raise NotFound("Unknown newsletter.")
        newsletter = await session.scalar(
            select(Newsletter).where(Newsletter.slug == newsletter_slug)
        )
        if newsletter is None:
            raise NotFound("Unknown newsletter.")
        query = query.where(Newsletter.id == newsletter.id)
    rows = await session.execute(
        update(Subscription)
        .where(
            Subscription.subscriber_id == subscriber.id,
            Subscription.newsletter_id.in_(query.scalar_subquery()),
            Subscription.status.in_([Status.pending.value, Status.active.value]),
        )
        .values(status=Status.unsubscribed.value, unsubscribed_at=now, updated_at=now)
        .returning(Subscription.newsletter_id)
        .execution_options(synchronize_session=False)
    )
    ids = list(rows.scalars().all())
    UNSUBSCRIBES.inc(len(ids))
    await events.record(
        session,
        [consent_event("subscription.unsubscribed", subscriber.id, i, consent, now) for i in ids],
    )
    return await _newsletters_by_id(session, ids)


async def save_preferences(
    session: AsyncSession,
    subscriber: Subscriber,
    wanted_slugs: set[str],
    consent: Consent,
    now: datetime | None = None,
) -> Preferences:
    """Apply the preference centre's form: the link came by mail, so a newly ticked box is
    proof enough and becomes active at once; an unticked active one is unsubscribed.

    A pending subscription is shown unticked, so an unticked one is left pending: pressing
    Save must neither confirm nor cancel a sign-up the reader did not touch. A bounced one
    stays bounced whatever the box says: the address is suppressed, and only a new sign-up
    confirmed by mail brings it back.
    """
    now = now or utcnow()
    current = await preferences(session, subscriber)
    for item in current.items:
        wanted = item.newsletter.slug in wanted_slugs
        if wanted and item.status in (None, Status.unsubscribed.value, Status.pending.value):
            await _activate(session, subscriber.id, item, consent, now)
        elif not wanted and item.status == Status.active.value:
            await unsubscribe(session, subscriber, item.newsletter.slug, consent, now)
    return await preferences(session, subscriber)


async def unsubscribe_from_all(
    session: AsyncSession, subscriber: Subscriber, consent: Consent, now: datetime | None = None
) -> Preferences:
    """The preference centre's "Unsubscribe from all": pending sign-ups end too."""
    await unsubscribe(session, subscriber, None, consent, now)
    return await preferences(session, subscriber)


async def _activate(
    session: AsyncSession, subscriber_id: int, item: Preference, consent: Consent, now: datetime
) -> None:
    values = {"status": Status.active.value, "confirmed_at": now, "updated_at": now}
    if item.status is None:
        added = await session.scalar(
            insert_for(session)(Subscription)
            .values(
                subscriber_id=subscriber_id,
                newsletter_id=item.newsletter.id,
                created_at=now,
                **values,
                **consent.columns(now),
            )
            .on_conflict_do_nothing(index_elements=["subscriber_id", "newsletter_id"])
            .returning(Subscription.id)
        )
        if added is None:
            return  # a concurrent save (a double-clicked Save) added it, and recorded it
    else:
        await session.execute(
            update(Subscription)
            .where(
                Subscription.subscriber_id == subscriber_id,
                Subscription.newsletter_id == item.newsletter.id,
            )
            .values(**values, **consent.columns(now))
            .execution_options(synchronize_session=False)
        )
    await events.record(
        session,
        [consent_event("subscription.confirmed", subscriber_id, item.newsletter.id, consent, now)],
    )
