"""Admin API, newsletters: every route needs a key; writes need an admin-scope key."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query

from service import newsletters as newsletter_service
from service.api.admin_common import (
    ADMIN_RESPONSES,
    CONFLICT,
    INT_MAX,
    INVALID,
    NOT_FOUND,
    actor,
    decode_cursor,
    encode_cursor,
    next_cursor,
)
from service.api.admin_schemas import (
    AdminNewsletter,
    DayOut,
    NewsletterCreate,
    NewsletterFields,
    NewsletterPage,
    StatsOut,
)
from service.api.deps import AdminKey, DbDep, ReadKey, SettingsDep
from service.config import Settings
from service.models import Newsletter, Status

__all__ = ["decode_cursor", "encode_cursor", "router"]

router = APIRouter(prefix="/v1/admin", tags=["admin: newsletters"], responses=ADMIN_RESPONSES)
Slug = Annotated[str, "newsletter slug"]


def newsletter_out(
    newsletter: Newsletter, counts: dict[str, int], settings: Settings
) -> AdminNewsletter:
    ttl = newsletter.confirmation_ttl_seconds or int(settings.confirmation_ttl.total_seconds())
    return AdminNewsletter(
        slug=newsletter.slug,
        name=newsletter.name,
        description=newsletter.description,
        opt_in=newsletter.opt_in,
        from_name=newsletter.from_name,
        from_email=newsletter.from_email,
        reply_to=newsletter.reply_to,
        language=newsletter.language,
        confirmation_ttl=ttl,
        redirect_after_signup=newsletter.redirect_after_signup,
        redirect_after_confirm=newsletter.redirect_after_confirm,
        allowed_origins=list(newsletter.allowed_origins or []),
        created_at=newsletter.created_at,
        archived_at=newsletter.archived_at,
        counts={s.value: counts.get(s.value, 0) for s in Status},
    )


def _fields(body: NewsletterFields, **dump: Any) -> dict[str, Any]:
    """The body as the domain's fields: `confirmation_ttl` is kept in whole seconds."""
    fields = body.model_dump(**dump)
    if "confirmation_ttl" in fields:
        ttl: timedelta | None = fields.pop("confirmation_ttl")
        fields["confirmation_ttl_seconds"] = None if ttl is None else int(ttl.total_seconds())
    return fields


@router.post(
    "/newsletters",
    status_code=201,
    response_model=AdminNewsletter,
    responses={**INVALID, **CONFLICT},
    summary="Create a newsletter",
)
async def create_newsletter(
    body: NewsletterCreate, db: DbDep, key: AdminKey, settings: SettingsDep
) -> AdminNewsletter:
    fields = _fields(body, exclude_none=True, exclude={"slug", "name"})
    async with db.transaction() as session:
        created = await newsletter_service.create_newsletter(
            session, body.slug, body.name, actor=actor(key), **fields
        )
    return newsletter_out(created, {}, settings)


@router.get("/newsletters", response_model=NewsletterPage, summary="All newsletters")
async def list_newsletters(
    db: DbDep,
    _key: ReadKey,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> NewsletterPage:
    async with db.transaction() as session:
        found = await newsletter_service.list_with_counts(
            session, decode_cursor(cursor, INT_MAX), limit
        )
    return NewsletterPage(
        items=[newsletter_out(n.newsletter, n.counts, settings) for n in found],
        next_cursor=next_cursor([n.newsletter.id for n in found], limit),
    )


@router.get(
    "/newsletters/{slug}",
    response_model=AdminNewsletter,
    responses=NOT_FOUND,
    summary="One newsletter",
)
async def get_newsletter(
    slug: Slug, db: DbDep, _key: ReadKey, settings: SettingsDep
) -> AdminNewsletter:
    async with db.transaction() as session:
        newsletter = await newsletter_service.get_newsletter(session, slug)
        counts = await newsletter_service.status_counts(session, [newsletter.id])
    return newsletter_out(newsletter, counts.get(newsletter.id, {}), settings)


@router.patch(
    "/newsletters/{slug}",
    response_model=AdminNewsletter,
    responses={**NOT_FOUND, **INVALID},
    summary="Update a newsletter",
)
async def update_newsletter(
    slug: Slug, body: NewsletterFields, db: DbDep, key: AdminKey, settings: SettingsDep
) -> AdminNewsletter:
    async with db.transaction() as session:
        newsletter = await newsletter_service.update_newsletter(
            session, slug, _fields(body, exclude_unset=True), actor(key)
        )
        counts = await newsletter_service.status_counts(session, [newsletter.id])
    return newsletter_out(newsletter, counts.get(newsletter.id, {}), settings)


@router.delete(
    "/newsletters/{slug}",
    response_model=AdminNewsletter,
    responses=NOT_FOUND,
    summary="Archive a newsletter (hidden from readers; data kept)",
)
async def archive_newsletter(
    slug: Slug, db: DbDep, key: AdminKey, settings: SettingsDep
) -> AdminNewsletter:
    async with db.transaction() as session:
        newsletter = await newsletter_service.archive_newsletter(session, slug, actor(key))
        counts = await newsletter_service.status_counts(session, [newsletter.id])
    return newsletter_out(newsletter, counts.get(newsletter.id, {}), settings)


@router.get(
    "/newsletters/{slug}/stats",
    response_model=StatsOut,
    responses=NOT_FOUND,
    summary="Numbers for one newsletter",
)
async def newsletter_stats(
    slug: Slug, db: DbDep, _key: ReadKey, days: Annotated[int, Query(ge=1, le=366)] = 30
) -> StatsOut:
    async with db.transaction() as session:
        stats = await newsletter_service.newsletter_stats(session, slug, days)
    return StatsOut(
        newsletter=slug,
        counts=stats.counts,
        days=[
            DayOut(
                date=d.day,
                signups=d.signups,
                confirmations=d.confirmations,
                unsubscribes=d.unsubscribes,
            )
            for d in stats.days
        ],
        confirmation_rate=stats.confirmation_rate,
        median_time_to_confirm_seconds=stats.median_time_to_confirm_seconds,
    )
