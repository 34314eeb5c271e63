"""Newsletters (the lists): creation and lookup for ops."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import Conflict, FieldError, InvalidInput, NotFound
from service.models import Newsletter, OptIn, Subscription, utcnow

SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


@dataclass
class NewsletterCounts:
    newsletter: Newsletter
    counts: dict[str, int]


def validate_slug(slug: str) -> None:
    if not SLUG.match(slug):
        raise InvalidInput(
            [FieldError("slug", "invalid_slug", "Use lower-case letters, digits and dashes.")]
        )


async def create_newsletter(
    session: AsyncSession,
    slug: str,
    name: str,
    *,
    opt_in: str = OptIn.double.value,
    description: str = "",
    from_name: str = "",
    from_email: str | None = None,
    language: str = "en",
    now: datetime | None = None,
) -> Newsletter:
    """Create a list; the slug is its public, URL-safe name."""
    validate_slug(slug)
    if opt_in not in (OptIn.double.value, OptIn.single.value):
        raise InvalidInput([FieldError("opt_in", "invalid", "opt_in is double or single.")])
    if await session.scalar(select(Newsletter.id).where(Newsletter.slug == slug)) is not None:
        raise Conflict(f"A newsletter with slug {slug!r} exists.")
    newsletter = Newsletter(
        slug=slug,
        name=name,
        description=description,
        opt_in=opt_in,
        from_name=from_name or name,
        from_email=from_email,
        language=language,
        allowed_origins=[],
        created_at=now or utcnow(),
    )
    session.add(newsletter)
    await session.flush()
    return newsletter


async def get_newsletter(session: AsyncSession, slug: str) -> Newsletter:
    newsletter = await session.scalar(select(Newsletter).where(Newsletter.slug == slug))
    if newsletter is None:
        raise NotFound(f"No newsletter {slug!r}.")
    return newsletter


async def list_with_counts(session: AsyncSession) -> list[NewsletterCounts]:
    """Every newsletter, archived ones too, with subscription counts by status."""
    newsletters = list(await session.scalars(select(Newsletter).order_by(Newsletter.id)))
    rows = await session.execute(
        select(Subscription.newsletter_id, Subscription.status, func.count()).group_by(
            Subscription.newsletter_id, Subscription.status
        )
    )
    counts: dict[int, dict[str, int]] = {}
    for newsletter_id, status, n in rows.all():
        counts.setdefault(newsletter_id, {})[status] = int(n)
    return [NewsletterCounts(n, counts.get(n.id, {})) for n in newsletters]
