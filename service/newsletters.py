"""Newsletters (the lists): create, read, update, archive, and their numbers."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Date, case, cast, distinct, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service import events, i18n
from service.addresses import Address, normalise
from service.errors import LANGUAGE_TAG, Conflict, FieldError, InvalidInput, NotFound
from service.models import Event, Newsletter, OptIn, Status, Subscription, utcnow
from service.origins import origin_of

SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
EDITABLE = (
    "name",
    "description",
    "opt_in",
    "from_name",
    "from_email",
    "reply_to",
    "language",
    "confirmation_ttl_seconds",
    "redirect_after_signup",
    "redirect_after_confirm",
    "allowed_origins",
)


# Fields that always hold a value: null in an update puts their default back.
CLEARED_TO: dict[str, Any] = {
    "description": "",
    "from_name": "",
    "language": "en",
    "allowed_origins": [],
}


@dataclass
class NewsletterCounts:
    newsletter: Newsletter
    counts: dict[str, int]


@dataclass
class DayStats:
    day: date
    signups: int = 0
    confirmations: int = 0
    unsubscribes: int = 0


@dataclass
class NewsletterStats:
    counts: dict[str, int]
    days: list[DayStats] = field(default_factory=list)
    confirmation_rate: float | None = None
    median_time_to_confirm_seconds: float | None = None


STATS_EVENTS = ("subscription.pending", "subscription.confirmed", "subscription.unsubscribed")


def _invalid(field_name: str, message: str) -> InvalidInput:
    return InvalidInput([FieldError(field_name, "invalid", message)])


def _check(changes: dict[str, Any]) -> dict[str, Any]:
    """Validate the editable fields of a newsletter; return them cleaned."""
    clean = {k: v for k, v in changes.items() if k in EDITABLE}
    for key, default in CLEARED_TO.items():
        if key in clean and clean[key] is None:  # an explicit null clears what is never null
            clean[key] = copy.copy(default)
    if "name" in clean and not (isinstance(clean["name"], str) and clean["name"].strip()):
        raise _invalid("name", "A newsletter needs a name.")
    if "opt_in" in clean and clean["opt_in"] not in (OptIn.double.value, OptIn.single.value):
        raise _invalid("opt_in", "opt_in is double or single.")
    language = clean.get("language")
    if language is not None and not (isinstance(language, str) and i18n.is_tag(language)):
        raise _invalid("language", LANGUAGE_TAG)
    ttl = clean.get("confirmation_ttl_seconds")
    if ttl is not None and not (60 <= int(ttl) <= 90 * 86400):
        raise _invalid("confirmation_ttl", "Between 60 seconds and 90 days.")
    for key in ("from_email", "reply_to"):
        # They become mail headers (and the envelope sender): a bad one would kill every
        # message of the list at send time, so it is refused here.
        address = clean.get(key)
        if address:
            checked = normalise(address) if isinstance(address, str) else None
            if not isinstance(checked, Address):
                raise _invalid(key, "A valid email address.")
            clean[key] = checked.email
    for key in ("redirect_after_signup", "redirect_after_confirm"):
        url = clean.get(key)
        if url and origin_of(url) is None:  # it would never be redirected to
            raise _invalid(key, "An absolute http(s) URL.")
    origins = clean.get("allowed_origins")
    if origins is not None:
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise _invalid("allowed_origins", f"Not an origin: {origin[:100]!r}")
        clean["allowed_origins"] = [o.rstrip("/") for o in origins]
    return clean


def validate_slug(slug: str) -> None:
    if not SLUG.match(slug):
        raise InvalidInput(
            [FieldError("slug", "invalid_slug", "Use lower-case letters, digits and dashes.")]
        )


async def _audit(
    session: AsyncSession, type_: str, newsletter: Newsletter, actor: str, **data: Any
) -> None:
    await events.record(
        session, [events.event_row(type_, None, newsletter.id, actor, None, utcnow(), **data)]
    )


async def create_newsletter(
    session: AsyncSession,
    slug: str,
    name: str,
    now: datetime | None = None,
    actor: str = "cli",
    **fields: Any,
) -> Newsletter:
    """Create a list; the slug is its public, URL-safe name."""
    validate_slug(slug)
    clean = _check({"name": name, **fields})
    if await session.scalar(select(Newsletter.id).where(Newsletter.slug == slug)) is not None:
        raise Conflict(f"A newsletter with slug {slug!r} exists.")
    clean.setdefault("from_name", "")
    newsletter = Newsletter(
        slug=slug,
        description=clean.pop("description", "") or "",
        opt_in=clean.pop("opt_in", OptIn.double.value),
        language=clean.pop("language", "en") or "en",
        allowed_origins=clean.pop("allowed_origins", []),
        created_at=now or utcnow(),
        **clean,
    )
    if not newsletter.from_name:
        newsletter.from_name = newsletter.name
    session.add(newsletter)
    await session.flush()
    await _audit(session, "newsletter.created", newsletter, actor)
    return newsletter


async def get_newsletter(session: AsyncSession, slug: str) -> Newsletter:
    # A slug no newsletter can have (a NUL byte breaks PostgreSQL) never reaches a query.
    newsletter = (
        await session.scalar(select(Newsletter).where(Newsletter.slug == slug))
        if SLUG.match(slug)
        else None
    )
    if newsletter is None:
        raise NotFound(f"No newsletter {slug[:64]!r}.")
    return newsletter


async def update_newsletter(
    session: AsyncSession, slug: str, changes: dict[str, Any], actor: str = "cli"
) -> Newsletter:
    newsletter = await get_newsletter(session, slug)
    clean = _check(changes)
    for key, value in clean.items():
        setattr(newsletter, key, value)
    await session.flush()
    await _audit(session, "newsletter.updated", newsletter, actor, fields=sorted(clean))
    return newsletter


async def archive_newsletter(
    session: AsyncSession, slug: str, actor: str = "cli", now: datetime | None = None
) -> Newsletter:
    """Archive: hidden from readers and sign-ups; data and subscriptions are kept."""
    newsletter = await get_newsletter(session, slug)
    if newsletter.archived_at is None:
        newsletter.archived_at = now or utcnow()
        await session.flush()
        await _audit(session, "newsletter.archived", newsletter, actor)
    return newsletter


async def status_counts(
    session: AsyncSession, newsletter_ids: list[int] | None = None
) -> dict[int, dict[str, int]]:
    query = select(Subscription.newsletter_id, Subscription.status, func.count()).group_by(
        Subscription.newsletter_id, Subscription.status
    )
    if newsletter_ids is not None:
        query = query.where(Subscription.newsletter_id.in_(newsletter_ids))
    counts: dict[int, dict[str, int]] = {}
    for newsletter_id, status, n in (await session.execute(query)).all():
        counts.setdefault(newsletter_id, {s.value: 0 for s in Status})[status] = int(n)
    return counts


async def list_with_counts(
    session: AsyncSession, after_id: int | None = None, limit: int = 100
) -> list[NewsletterCounts]:
    """Newsletters in id order after the cursor, archived ones too, with counts by status."""
    query = select(Newsletter).order_by(Newsletter.id).limit(limit)
    if after_id is not None:
        query = query.where(Newsletter.id > after_id)
    newsletters = list(await session.scalars(query))
    counts = await status_counts(session, [n.id for n in newsletters])
    empty = {s.value: 0 for s in Status}
    return [NewsletterCounts(n, counts.get(n.id, empty)) for n in newsletters]


async def newsletter_stats(
    session: AsyncSession, slug: str, days: int = 30, now: datetime | None = None
) -> NewsletterStats:
    """Counts by status, per-day activity, confirmation rate and median time to confirm,
    all computed by the database."""
    now = now or utcnow()
    newsletter = await get_newsletter(session, slug)
    counts = (await status_counts(session, [newsletter.id])).get(
        newsletter.id, {s.value: 0 for s in Status}
    )
    since = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    day = cast(Event.created_at, Date) if _is_pg(session) else func.date(Event.created_at)
    # People a day, not events: one who signs up twice in a day is one sign-up. A single
    # opt-in sign-up (a `subscription.confirmed` event with opt_in single) is a sign-up, not
    # a confirmation: nobody confirmed anything.
    kind = case(
        (Event.type == "subscription.pending", "signups"),
        (
            (Event.type == "subscription.confirmed")
            & (Event.data["opt_in"].as_string() == OptIn.single.value),
            "signups",
        ),
        (Event.type == "subscription.confirmed", "confirmations"),
        (Event.type == "subscription.unsubscribed", "unsubscribes"),
    )
    rows = await session.execute(
        select(day, kind, func.count(distinct(Event.subscriber_id)))
        .where(
            Event.newsletter_id == newsletter.id,
            Event.created_at >= since,
            Event.type.in_(STATS_EVENTS),
        )
        .group_by(day, kind)
    )
    by_day: dict[date, DayStats] = {}
    for raw_day, counted, n in rows.all():
        key = raw_day if isinstance(raw_day, date) else date.fromisoformat(str(raw_day))
        stats = by_day.setdefault(key, DayStats(key))
        setattr(stats, counted, getattr(stats, counted) + int(n))
    asked, confirmed = (
        await session.execute(
            select(
                func.count(Subscription.pending_at),
                func.count(Subscription.confirmed_at).filter(Subscription.pending_at.is_not(None)),
            ).where(Subscription.newsletter_id == newsletter.id)
        )
    ).one()
    return NewsletterStats(
        counts=counts,
        days=[by_day[d] for d in sorted(by_day)],
        confirmation_rate=round(confirmed / asked, 4) if asked else None,
        median_time_to_confirm_seconds=await _median_confirm_seconds(session, newsletter.id),
    )


def _is_pg(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# Named SQL, kept visible: the median needs dialect-specific statements.
PG_MEDIAN = text(
    """
    SELECT percentile_cont(0.5) WITHIN GROUP
           (ORDER BY EXTRACT(EPOCH FROM confirmed_at - pending_at))
      FROM subscriptions
     WHERE newsletter_id = :nid AND pending_at IS NOT NULL
       AND confirmed_at IS NOT NULL AND confirmed_at >= pending_at
    """
)
SQLITE_COUNT = text(
    """
    SELECT count(*)
      FROM subscriptions
     WHERE newsletter_id = :nid AND pending_at IS NOT NULL
       AND confirmed_at IS NOT NULL AND confirmed_at >= pending_at
    """
)
# SQLite has no percentile: take the middle one or two values in order.
SQLITE_MIDDLE = text(
    """
    SELECT (julianday(confirmed_at) - julianday(pending_at)) * 86400.0 AS s
      FROM subscriptions
     WHERE newsletter_id = :nid AND pending_at IS NOT NULL
       AND confirmed_at IS NOT NULL AND confirmed_at >= pending_at
     ORDER BY s LIMIT :n OFFSET :off
    """
)


async def _median_confirm_seconds(session: AsyncSession, newsletter_id: int) -> float | None:
    if _is_pg(session):
        value = await session.scalar(PG_MEDIAN, {"nid": newsletter_id})
        return round(float(value), 1) if value is not None else None
    total = await session.scalar(SQLITE_COUNT, {"nid": newsletter_id})
    if not total:
        return None
    rows = await session.scalars(
        SQLITE_MIDDLE, {"nid": newsletter_id, "n": 2 - total % 2, "off": (total - 1) // 2}
    )
    middle = [float(v) for v in rows]
    return round(sum(middle) / len(middle), 1)
