"""Admin API, subscribers: search, read, add, edit, set status, resend, export, erase."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response

from service import subscribers as subscriber_service
from service.api.admin_common import (
    ADMIN_RESPONSES,
    CONFLICT,
    INVALID,
    NOT_FOUND,
    actor,
    decode_any_cursor,
    encode_key_cursor,
    next_cursor,
    refuse_nul,
)
from service.api.admin_schemas import (
    ConsentOut,
    EventOut,
    ResendOut,
    SubscriberCreate,
    SubscriberItem,
    SubscriberOut,
    SubscriberPage,
    SubscriberPatch,
    SubscriptionOut,
    SubscriptionPut,
    SubscriptionState,
)
from service.api.deps import AdminKey, DbDep, ReadKey, SettingsDep
from service.mail.render import Links
from service.models import Status
from service.subscribers import SubscriberDetail

router = APIRouter(
    prefix="/v1/admin/subscribers", tags=["admin: subscribers"], responses=ADMIN_RESPONSES
)
SubscriberId = Annotated[str, "the subscriber's public id"]


def detail_out(detail: SubscriberDetail, links: Links) -> SubscriberOut:
    subscriber = detail.subscriber
    slugs = {n.id: n.slug for _, n in detail.subscriptions}
    return SubscriberOut(
        id=subscriber.public_id,
        email=subscriber.email,
        name=subscriber.name,
        language=subscriber.language,
        attributes=subscriber.attributes or {},
        created_at=subscriber.created_at,
        updated_at=subscriber.updated_at,
        manage_url=links.manage(subscriber.public_id),
        unsubscribe_url=links.unsubscribe(subscriber.public_id),
        subscriptions=[
            SubscriptionOut(
                newsletter=n.slug,
                status=s.status,
                created_at=s.created_at,
                pending_at=s.pending_at,
                confirmed_at=s.confirmed_at,
                unsubscribed_at=s.unsubscribed_at,
                bounced_at=s.bounced_at,
                consent=ConsentOut(
                    source=s.consent_source,
                    ip=s.consent_ip,
                    user_agent=s.consent_user_agent,
                    page=s.consent_page,
                    at=s.consent_at,
                ),
            )
            for s, n in detail.subscriptions
        ],
        events=[
            EventOut(
                id=e.id,
                type=e.type,
                subscriber=subscriber.public_id,
                newsletter=slugs.get(e.newsletter_id or 0),
                actor=e.actor,
                ip=e.ip,
                data=e.data or {},
                created_at=e.created_at,
            )
            for e in detail.events
        ],
    )


def _utc(moment: datetime | None) -> datetime | None:
    """A time without a zone is taken as UTC, the zone of every stored time."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@router.get("", response_model=SubscriberPage, summary="Search subscribers")
async def search_subscribers(
    db: DbDep,
    _key: ReadKey,
    email: Annotated[str | None, Query(max_length=320, description="Address prefix")] = None,
    newsletter: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[Status | None, Query()] = None,
    created_after: Annotated[
        datetime | None,
        Query(description="Created at or after this time (ISO 8601; a date is its midnight UTC)"),
    ] = None,
    created_before: Annotated[
        datetime | None, Query(description="Created before this time (ISO 8601)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=600)] = None,
) -> SubscriberPage:
    refuse_nul("email", email, "An address prefix has no NUL.")
    refuse_nul("newsletter", newsletter, "A newsletter slug has no NUL.")
    async with db.transaction() as session:
        rows = await subscriber_service.search_subscribers(
            session,
            email_prefix=email,
            newsletter=newsletter,
            status=status.value if status else None,
            created_after=_utc(created_after),
            created_before=_utc(created_before),
            limit=limit,
            after=decode_any_cursor(cursor),
        )
    return SubscriberPage(
        items=[
            SubscriberItem(
                id=row.subscriber.public_id,
                email=row.subscriber.email,
                name=row.subscriber.name,
                created_at=row.subscriber.created_at,
                subscriptions=[
                    SubscriptionState(newsletter=s, status=st) for s, st in row.subscriptions
                ],
            )
            for row in rows
        ],
        next_cursor=(
            (encode_key_cursor(rows[-1].subscriber.email_key) if len(rows) == limit else None)
            if email
            else next_cursor([row.subscriber.id for row in rows], limit)
        ),
    )


@router.post(
    "",
    status_code=201,
    response_model=SubscriberOut,
    responses={**INVALID, **CONFLICT},
    summary="Add a subscriber (active with a consent note, or pending with a confirmation mail)",
)
async def add_subscriber(
    body: SubscriberCreate, db: DbDep, settings: SettingsDep, key: AdminKey
) -> SubscriberOut:
    async with db.transaction() as session:
        added = await subscriber_service.add_subscriber(
            session,
            settings,
            email=body.email,
            newsletters=body.newsletters,
            status=body.status,
            actor=actor(key),
            consent_note=body.consent_note,
            name=body.name,
            language=body.language,
            attributes=body.attributes,
        )
        detail = await subscriber_service.subscriber_detail(session, added.public_id)
    return detail_out(detail, Links(settings))


@router.get(
    "/{subscriber_id}",
    response_model=SubscriberOut,
    responses=NOT_FOUND,
    summary="One subscriber with subscriptions, consent records and events",
)
async def get_subscriber(
    subscriber_id: SubscriberId, db: DbDep, settings: SettingsDep, _key: ReadKey
) -> SubscriberOut:
    async with db.transaction() as session:
        detail = await subscriber_service.subscriber_detail(session, subscriber_id)
    return detail_out(detail, Links(settings))


@router.patch(
    "/{subscriber_id}",
    response_model=SubscriberOut,
    responses={**NOT_FOUND, **INVALID},
    summary="Update name, language, attributes",
)
async def update_subscriber(
    subscriber_id: SubscriberId,
    body: SubscriberPatch,
    db: DbDep,
    settings: SettingsDep,
    key: AdminKey,
) -> SubscriberOut:
    async with db.transaction() as session:
        await subscriber_service.update_subscriber(
            session, settings, subscriber_id, body.model_dump(exclude_unset=True), actor(key)
        )
        detail = await subscriber_service.subscriber_detail(session, subscriber_id)
    return detail_out(detail, Links(settings))


@router.put(
    "/{subscriber_id}/subscriptions/{slug}",
    response_model=SubscriberOut,
    responses={**NOT_FOUND, **INVALID},
    summary="Set one subscription's status",
)
async def set_subscription(
    subscriber_id: SubscriberId,
    slug: str,
    body: SubscriptionPut,
    db: DbDep,
    settings: SettingsDep,
    key: AdminKey,
) -> SubscriberOut:
    async with db.transaction() as session:
        subscriber = await subscriber_service.get_subscriber(session, subscriber_id)
        await subscriber_service.set_subscription_status(
            session, subscriber, slug, body.status, actor(key), body.consent_note
        )
        detail = await subscriber_service.subscriber_detail(session, subscriber_id)
    return detail_out(detail, Links(settings))


@router.post(
    "/{subscriber_id}/resend-confirmation",
    status_code=202,
    response_model=ResendOut,
    responses={**NOT_FOUND, **CONFLICT},
    summary="Send a fresh confirmation mail",
)
async def resend_confirmation(
    subscriber_id: SubscriberId, db: DbDep, settings: SettingsDep, key: AdminKey
) -> ResendOut:
    async with db.transaction() as session:
        pending = await subscriber_service.resend_confirmation(
            session, settings, subscriber_id, actor(key)
        )
    return ResendOut(newsletters=[n.slug for n in pending])


@router.get(
    "/{subscriber_id}/export",
    response_model=SubscriberOut,
    responses=NOT_FOUND,
    summary="Everything kept about one person, as JSON",
)
async def export_subscriber(
    subscriber_id: SubscriberId, db: DbDep, settings: SettingsDep, _key: ReadKey
) -> Response:
    async with db.transaction() as session:
        detail = await subscriber_service.subscriber_detail(
            session, subscriber_id, event_limit=100_000
        )
    body = detail_out(detail, Links(settings)).model_dump_json(indent=2)
    return Response(
        body,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="subscriber-{subscriber_id}.json"'},
    )


@router.delete(
    "/{subscriber_id}",
    status_code=204,
    responses=NOT_FOUND,
    summary="Erase one person (a hashed suppression entry is kept)",
)
async def erase_subscriber(subscriber_id: SubscriberId, db: DbDep, key: AdminKey) -> Response:
    async with db.transaction() as session:
        await subscriber_service.erase_subscriber(session, subscriber_id, actor(key))
    return Response(status_code=204)
