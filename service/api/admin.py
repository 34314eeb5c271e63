"""The admin API (ops): every route needs a key; writes need an admin-scope key."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from service import newsletters as newsletter_service
from service import subscribers as subscriber_service
from service.api.deps import DbDep, ReadKey
from service.api.schemas import problem_response
from service.errors import FieldError, InvalidInput
from service.models import Status

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem_response(
        "No valid API key",
        {"type": "about:blank#unauthorized", "title": "A valid API key is required", "status": 401},
    ),
    403: problem_response(
        "Read-only key",
        {"type": "about:blank#forbidden", "title": "This API key may not do that", "status": 403},
    ),
}

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=AUTH_RESPONSES)


class AdminNewsletter(BaseModel):
    slug: str = Field(examples=["weekly"])
    name: str = Field(examples=["The Weekly"])
    description: str = Field(examples=["One email every Friday."])
    opt_in: str = Field(examples=["double"])
    from_name: str = Field(examples=["The Weekly team"])
    from_email: str | None = Field(examples=["weekly@example.com"])
    language: str = Field(examples=["en"])
    created_at: datetime
    archived_at: datetime | None = None
    counts: dict[str, int] = Field(examples=[{"pending": 3, "active": 120, "unsubscribed": 4}])


class NewsletterPage(BaseModel):
    items: list[AdminNewsletter]
    next_cursor: str | None = None


class SubscriptionState(BaseModel):
    newsletter: str = Field(examples=["weekly"])
    status: str = Field(examples=["active"])


class SubscriberItem(BaseModel):
    id: str = Field(examples=["3f2b0c8e9d4a4b6f8a1e2d3c4b5a6978"])
    email: str = Field(examples=["reader@example.com"])
    name: str | None = Field(examples=["Ada"])
    created_at: datetime
    subscriptions: list[SubscriptionState]


class SubscriberPage(BaseModel):
    items: list[SubscriberItem]
    next_cursor: str | None = Field(default=None, examples=["MTI"])


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw.isdigit() and len(raw) < 20:
            return int(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidInput([FieldError("cursor", "invalid_cursor", "This cursor is not valid.")])


@router.get("/newsletters", response_model=NewsletterPage, summary="All newsletters")
async def list_newsletters(db: DbDep, _key: ReadKey) -> NewsletterPage:
    async with db.transaction() as session:
        found = await newsletter_service.list_with_counts(session)
    return NewsletterPage(
        items=[
            AdminNewsletter(
                slug=n.newsletter.slug,
                name=n.newsletter.name,
                description=n.newsletter.description,
                opt_in=n.newsletter.opt_in,
                from_name=n.newsletter.from_name,
                from_email=n.newsletter.from_email,
                language=n.newsletter.language,
                created_at=n.newsletter.created_at,
                archived_at=n.newsletter.archived_at,
                counts={s.value: n.counts.get(s.value, 0) for s in Status},
            )
            for n in found
        ]
    )


@router.get("/subscribers", response_model=SubscriberPage, summary="Search subscribers")
async def search_subscribers(
    db: DbDep,
    _key: ReadKey,
    email: Annotated[str | None, Query(max_length=320, description="Address prefix")] = None,
    newsletter: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[Status | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> SubscriberPage:
    after_id = decode_cursor(cursor)
    async with db.transaction() as session:
        rows = await subscriber_service.search_subscribers(
            session,
            email_prefix=email,
            newsletter=newsletter,
            status=status.value if status else None,
            limit=limit,
            after_id=after_id,
        )
    items = [
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
    ]
    next_cursor = encode_cursor(rows[-1].subscriber.id) if len(rows) == limit else None
    return SubscriberPage(items=items, next_cursor=next_cursor)
