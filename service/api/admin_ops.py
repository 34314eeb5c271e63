"""Admin API: the event feed, webhooks and their delivery log, the blocklist."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service import events, suppression, webhooks
from service.api.admin_common import (
    ADMIN_RESPONSES,
    CONFLICT,
    INT_MAX,
    INVALID,
    NOT_FOUND,
    RowId,
    actor,
    decode_cursor,
    encode_cursor,
    next_cursor,
    refuse_nul,
)
from service.api.admin_schemas import (
    BlockCreate,
    BlockOut,
    BlockPage,
    BlockPatch,
    DeliveryOut,
    DeliveryPage,
    EventOut,
    EventPage,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookPage,
    WebhookPatch,
)
from service.api.deps import AdminKey, DbDep, ReadKey
from service.models import BlockedEntry, Webhook

router = APIRouter(prefix="/v1/admin", responses=ADMIN_RESPONSES)
Limit = Annotated[int, Query(ge=1, le=500)]
Cursor = Annotated[str | None, Query(max_length=64)]


@router.get(
    "/events",
    response_model=EventPage,
    tags=["admin: events"],
    summary="The event feed (audit trail), oldest first",
)
async def event_feed(
    db: DbDep,
    _key: ReadKey,
    cursor: Cursor = None,
    type: Annotated[str | None, Query(max_length=64, examples=["subscription.confirmed"])] = None,
    limit: Limit = 100,
) -> EventPage:
    refuse_nul("type", type, "An event type has no NUL.")
    async with db.transaction() as session:
        rows = await events.feed(session, decode_cursor(cursor), type, limit)
    return EventPage(
        items=[
            EventOut(
                id=e.id,
                type=e.type,
                subscriber=public_id,
                newsletter=slug,
                actor=e.actor,
                ip=e.ip,
                data=e.data or {},
                created_at=e.created_at,
            )
            for e, public_id, slug in rows
        ],
        next_cursor=next_cursor([e.id for e, _, _ in rows], limit),
    )


def webhook_out(hook: Webhook) -> WebhookOut:
    return WebhookOut(
        id=hook.id,
        url=hook.url,
        event_types=list(hook.event_types),
        active=hook.active,
        created_at=hook.created_at,
    )


@router.post(
    "/webhooks",
    status_code=201,
    response_model=WebhookCreated,
    responses=INVALID,
    tags=["admin: webhooks"],
    summary="Register a webhook",
)
async def create_webhook(body: WebhookCreate, db: DbDep, key: AdminKey) -> WebhookCreated:
    async with db.transaction() as session:
        hook = await webhooks.create_webhook(
            session, body.url, body.event_types, body.secret, actor(key)
        )
    return WebhookCreated(**webhook_out(hook).model_dump(), secret=hook.secret)


@router.get(
    "/webhooks", response_model=WebhookPage, tags=["admin: webhooks"], summary="All webhooks"
)
async def list_webhooks(
    db: DbDep, _key: ReadKey, cursor: Cursor = None, limit: Limit = 100
) -> WebhookPage:
    async with db.transaction() as session:
        hooks = await webhooks.list_webhooks(session, decode_cursor(cursor, INT_MAX), limit)
    return WebhookPage(
        items=[webhook_out(h) for h in hooks],
        next_cursor=next_cursor([h.id for h in hooks], limit),
    )


@router.get(
    "/webhooks/{webhook_id}",
    response_model=WebhookOut,
    responses=NOT_FOUND,
    tags=["admin: webhooks"],
    summary="One webhook",
)
async def get_webhook(webhook_id: RowId, db: DbDep, _key: ReadKey) -> WebhookOut:
    async with db.transaction() as session:
        return webhook_out(await webhooks.get_webhook(session, webhook_id))


@router.patch(
    "/webhooks/{webhook_id}",
    response_model=WebhookOut,
    responses={**NOT_FOUND, **INVALID},
    tags=["admin: webhooks"],
    summary="Change a webhook's URL, event types or switch it off",
)
async def update_webhook(
    webhook_id: RowId, body: WebhookPatch, db: DbDep, key: AdminKey
) -> WebhookOut:
    async with db.transaction() as session:
        hook = await webhooks.update_webhook(
            session, webhook_id, body.model_dump(exclude_unset=True), actor(key)
        )
        return webhook_out(hook)


@router.delete(
    "/webhooks/{webhook_id}",
    status_code=204,
    responses=NOT_FOUND,
    tags=["admin: webhooks"],
    summary="Delete a webhook",
)
async def delete_webhook(webhook_id: RowId, db: DbDep, key: AdminKey) -> Response:
    async with db.transaction() as session:
        await webhooks.delete_webhook(session, webhook_id, actor(key))
    return Response(status_code=204)


@router.get(
    "/webhooks/{webhook_id}/deliveries",
    response_model=DeliveryPage,
    responses=NOT_FOUND,
    tags=["admin: webhooks"],
    summary="The delivery log of one webhook, newest first",
)
async def webhook_deliveries(
    webhook_id: RowId, db: DbDep, _key: ReadKey, cursor: Cursor = None, limit: Limit = 100
) -> DeliveryPage:
    async with db.transaction() as session:
        rows = await webhooks.deliveries(session, webhook_id, decode_cursor(cursor), limit)
    return DeliveryPage(
        items=[
            DeliveryOut(
                id=d.id,
                event_id=d.event_id,
                status_code=d.status_code,
                error=d.error,
                duration_ms=d.duration_ms,
                created_at=d.created_at,
            )
            for d in rows
        ],
        next_cursor=encode_cursor(rows[-1].id) if len(rows) == limit else None,
    )


def block_out(entry: BlockedEntry) -> BlockOut:
    return BlockOut(
        id=entry.id,
        kind=entry.kind,
        value=entry.value,
        note=entry.note,
        created_at=entry.created_at,
    )


@router.post(
    "/blocklist",
    status_code=201,
    response_model=BlockOut,
    responses={**INVALID, **CONFLICT},
    tags=["admin: blocklist"],
    summary="Block an address or a domain",
)
async def add_block(body: BlockCreate, db: DbDep, key: AdminKey) -> BlockOut:
    async with db.transaction() as session:
        return block_out(
            await suppression.add_block(session, body.kind, body.value, body.note, actor(key))
        )


@router.get(
    "/blocklist", response_model=BlockPage, tags=["admin: blocklist"], summary="The blocklist"
)
async def list_blocks(
    db: DbDep, _key: ReadKey, cursor: Cursor = None, limit: Limit = 100
) -> BlockPage:
    async with db.transaction() as session:
        rows = await suppression.list_blocks(session, decode_cursor(cursor, INT_MAX), limit)
    return BlockPage(
        items=[block_out(e) for e in rows], next_cursor=next_cursor([e.id for e in rows], limit)
    )


@router.get(
    "/blocklist/{entry_id}",
    response_model=BlockOut,
    responses=NOT_FOUND,
    tags=["admin: blocklist"],
    summary="One blocklist entry",
)
async def get_block(entry_id: RowId, db: DbDep, _key: ReadKey) -> BlockOut:
    async with db.transaction() as session:
        return block_out(await suppression.get_block(session, entry_id))


@router.patch(
    "/blocklist/{entry_id}",
    response_model=BlockOut,
    responses={**NOT_FOUND, **INVALID},
    tags=["admin: blocklist"],
    summary="Change an entry's note",
)
async def update_block(entry_id: RowId, body: BlockPatch, db: DbDep, key: AdminKey) -> BlockOut:
    async with db.transaction() as session:
        return block_out(
            await suppression.update_block_note(session, entry_id, body.note, actor(key))
        )


@router.delete(
    "/blocklist/{entry_id}",
    status_code=204,
    responses=NOT_FOUND,
    tags=["admin: blocklist"],
    summary="Unblock",
)
async def delete_block(entry_id: RowId, db: DbDep, key: AdminKey) -> Response:
    async with db.transaction() as session:
        await suppression.delete_block(session, entry_id, actor(key))
    return Response(status_code=204)
