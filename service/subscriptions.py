"""The subscription life cycle, top to bottom: subscribe → confirm → manage → unsubscribe.

Every function takes the session of the caller's one transaction and returns plain data or
raises a domain exception. The sign-up path uses Core statements: it is the hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from service import tokens
from service.addresses import Address
from service.config import Settings
from service.errors import ConfirmationExpired, FieldError, InvalidInput, NotFound, TokenNotFound
from service.mail import outbox
from service.models import (
    Confirmation,
    Event,
    Newsletter,
    OptIn,
    Status,
    Subscriber,
    Subscription,
    utcnow,
)
from service.signup_input import SignupInput

CAPPED_TEMPLATES = ("confirmation", "already_subscribed")


@dataclass(frozen=True)
class Consent:
    """Where a sign-up came from: kept with each subscription it touches."""

    source: str
    ip: str | None = None
    user_agent: str | None = None
    page: str | None = None

    def columns(self, now: datetime) -> dict[str, Any]:
        return {
            "consent_source": self.source,
            "consent_ip": self.ip,
            "consent_user_agent": (self.user_agent or "")[:500] or None,
            "consent_page": (self.page or "")[:2000] or None,
            "consent_at": now,
        }


@dataclass
class SignupResult:
    all_single_opt_in: bool
    newsletters: list[Newsletter]
    mail_queued: str | None = None  # which template, if any

    @property
    def status(self) -> str:
        return Status.active.value if self.all_single_opt_in else Status.pending.value

    @property
    def redirect_url(self) -> str | None:
        return self.newsletters[0].redirect_after_signup if self.newsletters else None


@dataclass
class ConfirmResult:
    newsletters: list[Newsletter]
    already_confirmed: bool = False

    @property
    def redirect_url(self) -> str | None:
        return self.newsletters[0].redirect_after_confirm if self.newsletters else None


@dataclass
class PendingConfirmation:
    """What the confirm page shows before the reader presses the button."""

    newsletters: list[Newsletter]
    confirmed: bool


@dataclass
class Preference:
    newsletter: Newsletter
    status: str | None


@dataclass
class Preferences:
    subscriber: Subscriber
    items: list[Preference] = field(default_factory=list)


def _dialect_insert(session: AsyncSession) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


async def public_newsletters(session: AsyncSession) -> list[Newsletter]:
    """The newsletters a reader may see and sign up to: not archived."""
    rows = await session.scalars(
        select(Newsletter).where(Newsletter.archived_at.is_(None)).order_by(Newsletter.id)
    )
    return list(rows)


async def newsletters_by_slug(session: AsyncSession, slugs: Sequence[str]) -> list[Newsletter]:
    """Look up sign-up targets; unknown or archived slugs are a field error."""
    rows = await session.scalars(
        select(Newsletter).where(Newsletter.slug.in_(slugs), Newsletter.archived_at.is_(None))
    )
    found = {n.slug: n for n in rows}
    unknown = [s for s in slugs if s not in found]
    if unknown:
        raise InvalidInput(
            [
                FieldError(
                    "newsletters",
                    "unknown_newsletter",
                    "Unknown newsletter: " + ", ".join(u[:64] for u in unknown[:5]),
                )
            ]
        )
    return [found[s] for s in slugs]


def _ttl(settings: Settings, newsletters: Sequence[Newsletter]) -> timedelta:
    ttls = [
        timedelta(seconds=n.confirmation_ttl_seconds)
        for n in newsletters
        if n.confirmation_ttl_seconds
    ]
    return min(ttls) if ttls else settings.confirmation_ttl


async def _under_mail_cap(
    session: AsyncSession, settings: Settings, subscriber_id: int, now: datetime
) -> bool:
    count, latest = await outbox.recent_mail(
        session, subscriber_id, CAPPED_TEMPLATES, now - timedelta(days=1)
    )
    if count >= settings.confirmation_mail_daily_cap:
        return False
    return latest is None or now - latest >= settings.confirmation_mail_interval


def _mail_payload(subscriber_public_id: str, newsletters: Sequence[Newsletter]) -> dict[str, Any]:
    return {"subscriber": subscriber_public_id, "newsletters": [n.id for n in newsletters]}


async def _upsert_subscriber(
    session: AsyncSession, data: SignupInput, now: datetime
) -> tuple[int, str, bool]:
    """Return (id, public id, created?). Name and attributes are only set on creation:
    an unauthenticated form must not rewrite what an existing reader gave."""
    stmt = (
        _dialect_insert(session)(Subscriber)
        .values(
            public_id=tokens.new_public_id(),
            email=data.address.email,
            email_key=data.address.key,
            name=data.name,
            language=data.language,
            attributes=data.attributes,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["email_key"])
        .returning(Subscriber.id, Subscriber.public_id)
    )
    row = (await session.execute(stmt)).first()
    if row is not None:
        return row[0], row[1], True
    existing = (
        await session.execute(
            select(Subscriber.id, Subscriber.public_id).where(
                Subscriber.email_key == data.address.key
            )
        )
    ).one()
    return existing[0], existing[1], False


async def subscribe(
    session: AsyncSession,
    settings: Settings,
    data: SignupInput,
    consent: Consent,
    now: datetime | None = None,
) -> SignupResult:
    """Sign someone up to one or more newsletters.

    Double opt-in newsletters become pending and one confirmation mail covers them; single
    opt-in ones become active at once; someone already active on everything gets an
    "already subscribed" mail. Mail per address is capped. The answer never says which.
    """
    now = now or utcnow()
    newsletters = await newsletters_by_slug(session, data.newsletters)
    result = SignupResult(
        all_single_opt_in=all(n.opt_in == OptIn.single.value for n in newsletters),
        newsletters=newsletters,
    )
    if data.honeypot:
        return result

    subscriber_id, public_id, created = await _upsert_subscriber(session, data, now)
    existing: dict[int, tuple[int, str]] = {}
    if not created:
        rows = await session.execute(
            select(Subscription.newsletter_id, Subscription.id, Subscription.status).where(
                Subscription.subscriber_id == subscriber_id,
                Subscription.newsletter_id.in_([n.id for n in newsletters]),
            )
        )
        existing = {nid: (sid, status) for nid, sid, status in rows.all()}

    new_rows: list[dict[str, Any]] = []
    to_pending: list[int] = []
    to_active: list[int] = []
    pending: list[Newsletter] = []
    activated: list[Newsletter] = []
    for newsletter in newsletters:
        current = existing.get(newsletter.id)
        if current is not None and current[1] == Status.active.value:
            continue  # an active subscription stays active
        target = Status.active if newsletter.opt_in == OptIn.single.value else Status.pending
        (activated if target is Status.active else pending).append(newsletter)
        if current is None:
            new_rows.append(
                {
                    "subscriber_id": subscriber_id,
                    "newsletter_id": newsletter.id,
                    "status": target.value,
                    "created_at": now,
                    "updated_at": now,
                    "pending_at": now if target is Status.pending else None,
                    "confirmed_at": now if target is Status.active else None,
                    **consent.columns(now),
                }
            )
        else:
            (to_active if target is Status.active else to_pending).append(current[0])

    if new_rows:
        await session.execute(insert(Subscription), new_rows)
    for ids, status in ((to_pending, Status.pending), (to_active, Status.active)):
        if ids:
            stamp = "pending_at" if status is Status.pending else "confirmed_at"
            await session.execute(
                update(Subscription)
                .where(Subscription.id.in_(ids))
                .values(status=status.value, updated_at=now, **{stamp: now}, **consent.columns(now))
                .execution_options(synchronize_session=False)
            )

    events = [
        _event("subscription.pending", subscriber_id, n.id, consent, now) for n in pending
    ] + [
        _event("subscription.confirmed", subscriber_id, n.id, consent, now, opt_in="single")
        for n in activated
    ]
    if events:
        await session.execute(insert(Event), events)

    if activated:
        await outbox.enqueue(
            session,
            "welcome",
            data.address.email,
            subscriber_id,
            _mail_payload(public_id, activated),
            now,
        )
    # Someone with nothing new to confirm hears "already subscribed" instead; both kinds of
    # mail share the per-address cap, so the form cannot be used to bomb an inbox.
    wants_mail = bool(pending) or not activated
    if wants_mail and (created or await _under_mail_cap(session, settings, subscriber_id, now)):
        if pending:
            token, token_hash = tokens.new_confirmation_token()
            await session.execute(
                insert(Confirmation).values(
                    token_hash=token_hash,
                    subscriber_id=subscriber_id,
                    newsletter_ids=[n.id for n in pending],
                    created_at=now,
                    expires_at=now + _ttl(settings, pending),
                )
            )
            payload = _mail_payload(public_id, pending) | {"token": token}
            result.mail_queued = "confirmation"
        else:
            payload = _mail_payload(public_id, newsletters)
            result.mail_queued = "already_subscribed"
        await outbox.enqueue(
            session, result.mail_queued, data.address.email, subscriber_id, payload, now
        )
    return result


def _event(
    type_: str,
    subscriber_id: int | None,
    newsletter_id: int | None,
    consent: Consent,
    now: datetime,
    **data: Any,
) -> dict[str, Any]:
    return {
        "type": type_,
        "subscriber_id": subscriber_id,
        "newsletter_id": newsletter_id,
        "actor": consent.source,
        "ip": consent.ip,
        "data": data,
        "created_at": now,
    }


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
    return PendingConfirmation(
        newsletters=await _newsletters_by_id(session, found.newsletter_ids),
        confirmed=found.confirmed_at is not None,
    )


async def confirm(
    session: AsyncSession, token: str, consent: Consent, now: datetime | None = None
) -> ConfirmResult:
    """Activate the subscriptions a confirmation covers; confirming twice is a no-op."""
    now = now or utcnow()
    found = await _confirmation(session, token)
    newsletters = await _newsletters_by_id(session, found.newsletter_ids)
    if found.confirmed_at is not None:
        return ConfirmResult(newsletters=newsletters, already_confirmed=True)
    if found.expires_at <= now:
        raise ConfirmationExpired()
    # Only this transaction may flip confirmed_at; a concurrent double click sees 0 rows.
    claimed = await session.execute(
        update(Confirmation)
        .where(Confirmation.id == found.id, Confirmation.confirmed_at.is_(None))
        .values(confirmed_at=now)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount == 0:  # type: ignore[attr-defined]
        return ConfirmResult(newsletters=newsletters, already_confirmed=True)
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
        await session.execute(
            insert(Event),
            [
                _event("subscription.confirmed", found.subscriber_id, n.id, consent, now)
                for n in activated
            ],
        )
        subscriber = await session.get_one(Subscriber, found.subscriber_id)
        await outbox.enqueue(
            session,
            "welcome",
            subscriber.email,
            subscriber.id,
            _mail_payload(subscriber.public_id, activated),
            now,
        )
    return ConfirmResult(newsletters=newsletters)


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
    if ids:
        await session.execute(
            insert(Event),
            [_event("subscription.unsubscribed", subscriber.id, i, consent, now) for i in ids],
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
    proof enough and becomes active at once; an unticked one is unsubscribed."""
    now = now or utcnow()
    current = await preferences(session, subscriber)
    for item in current.items:
        wanted = item.newsletter.slug in wanted_slugs
        if wanted and item.status in (None, Status.unsubscribed.value, Status.pending.value):
            await _activate(session, subscriber.id, item, consent, now)
        elif not wanted and item.status in (Status.pending.value, Status.active.value):
            await unsubscribe(session, subscriber, item.newsletter.slug, consent, now)
    return await preferences(session, subscriber)


async def _activate(
    session: AsyncSession, subscriber_id: int, item: Preference, consent: Consent, now: datetime
) -> None:
    values = {"status": Status.active.value, "confirmed_at": now, "updated_at": now}
    if item.status is None:
        await session.execute(
            insert(Subscription).values(
                subscriber_id=subscriber_id,
                newsletter_id=item.newsletter.id,
                created_at=now,
                **values,
                **consent.columns(now),
            )
        )
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
    await session.execute(
        insert(Event).values(
            **_event("subscription.confirmed", subscriber_id, item.newsletter.id, consent, now)
        )
    )
