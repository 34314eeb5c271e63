"""Request and response shapes of the admin API, with the examples OpenAPI shows."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

Public = Literal["pending", "active", "unsubscribed", "bounced"]


def _holds_nul(value: Any) -> bool:
    """Whether a NUL character is anywhere in a decoded JSON value, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class Input(BaseModel):
    """A request body of the admin API: no text in it may hold a NUL character, which no
    name or note needs and PostgreSQL refuses to store (a 500 otherwise)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if _holds_nul(value):
            raise PydanticCustomError("nul_character", "Text may not hold NUL characters.")
        return value


class NewsletterFields(Input):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200, examples=["The Weekly"])
    description: str | None = Field(
        default=None, max_length=2000, examples=["One email every Friday."]
    )
    opt_in: Literal["double", "single"] | None = Field(default=None, examples=["double"])
    from_name: str | None = Field(default=None, max_length=200, examples=["The Weekly team"])
    from_email: str | None = Field(default=None, max_length=320, examples=["weekly@example.com"])
    reply_to: str | None = Field(default=None, max_length=320, examples=["editor@example.com"])
    language: str | None = Field(default=None, max_length=16, examples=["en"])
    confirmation_ttl: timedelta | None = Field(
        default=None,
        # The contract's name; the column's name is still taken from older clients.
        validation_alias=AliasChoices("confirmation_ttl", "confirmation_ttl_seconds"),
        description="How long a confirmation link works: seconds or an ISO 8601 duration"
        " (P7D), 60 seconds to 90 days; null puts the service default back.",
        examples=[604800],
    )
    redirect_after_signup: str | None = Field(
        default=None, max_length=2000, examples=["https://example.com/thanks"]
    )
    redirect_after_confirm: str | None = Field(
        default=None, max_length=2000, examples=["https://example.com/welcome"]
    )
    allowed_origins: list[str] | None = Field(
        default=None, max_length=50, examples=[["https://example.com"]]
    )


class NewsletterCreate(NewsletterFields):
    slug: str = Field(max_length=64, examples=["weekly"])
    name: str = Field(max_length=200, examples=["The Weekly"])


class AdminNewsletter(BaseModel):
    slug: str = Field(examples=["weekly"])
    name: str = Field(examples=["The Weekly"])
    description: str = Field(examples=["One email every Friday."])
    opt_in: str = Field(examples=["double"])
    from_name: str = Field(examples=["The Weekly team"])
    from_email: str | None = Field(examples=["weekly@example.com"])
    reply_to: str | None = Field(default=None, examples=[None])
    language: str = Field(examples=["en"])
    confirmation_ttl: int = Field(
        examples=[604800],
        description="Seconds a confirmation link works (the service default unless set).",
    )
    redirect_after_signup: str | None = None
    redirect_after_confirm: str | None = None
    allowed_origins: list[str] = Field(default_factory=list, examples=[["https://example.com"]])
    created_at: datetime
    archived_at: datetime | None = None
    counts: dict[str, int] = Field(
        examples=[{"pending": 3, "active": 120, "unsubscribed": 4, "bounced": 0}]
    )


class NewsletterPage(BaseModel):
    items: list[AdminNewsletter]
    next_cursor: str | None = Field(default=None, examples=[None])


class DayOut(BaseModel):
    date: date
    signups: int = Field(examples=[12])
    confirmations: int = Field(examples=[9])
    unsubscribes: int = Field(examples=[1])


class StatsOut(BaseModel):
    newsletter: str = Field(examples=["weekly"])
    counts: dict[str, int] = Field(
        examples=[{"pending": 3, "active": 120, "unsubscribed": 4, "bounced": 0}]
    )
    days: list[DayOut]
    confirmation_rate: float | None = Field(examples=[0.82])
    median_time_to_confirm_seconds: float | None = Field(examples=[312.5])


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


class ConsentOut(BaseModel):
    source: str = Field(examples=["form"])
    ip: str | None = Field(examples=["203.0.113.7"])
    user_agent: str | None = Field(examples=["Mozilla/5.0"])
    page: str | None = Field(examples=["https://example.com/newsletter"])
    at: datetime


class SubscriptionOut(BaseModel):
    newsletter: str = Field(examples=["weekly"])
    status: str = Field(examples=["active"])
    created_at: datetime
    pending_at: datetime | None
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None
    bounced_at: datetime | None
    consent: ConsentOut


class EventOut(BaseModel):
    id: int = Field(examples=[42])
    type: str = Field(examples=["subscription.confirmed"])
    subscriber: str | None = Field(default=None, examples=["3f2b0c8e9d4a4b6f8a1e2d3c4b5a6978"])
    newsletter: str | None = Field(default=None, examples=["weekly"])
    actor: str = Field(examples=["form"])
    ip: str | None = Field(default=None, examples=["203.0.113.7"])
    data: dict[str, Any] = Field(default_factory=dict, examples=[{}])
    created_at: datetime


class SubscriberOut(BaseModel):
    id: str = Field(examples=["3f2b0c8e9d4a4b6f8a1e2d3c4b5a6978"])
    email: str = Field(examples=["reader@example.com"])
    name: str | None = Field(examples=["Ada"])
    language: str | None = Field(examples=["en"])
    attributes: dict[str, Any] = Field(examples=[{"plan": "free"}])
    created_at: datetime
    updated_at: datetime
    manage_url: str = Field(examples=["https://news.example.com/manage/3f2b….sig"])
    unsubscribe_url: str = Field(examples=["https://news.example.com/unsubscribe/3f2b….sig"])
    subscriptions: list[SubscriptionOut]
    events: list[EventOut]


class SubscriberCreate(Input):
    email: str = Field(max_length=320, examples=["reader@example.com"])
    newsletters: list[str] = Field(min_length=1, max_length=50, examples=[["weekly"]])
    status: Literal["active", "pending"] = Field(default="pending", examples=["active"])
    consent_note: str | None = Field(
        default=None, max_length=500, examples=["Signed the paper form at the 2026 meetup"]
    )
    name: str | None = Field(default=None, max_length=200, examples=["Ada"])
    language: str | None = Field(default=None, max_length=16, examples=["en"])
    attributes: dict[str, Any] | None = Field(default=None, examples=[{"plan": "free"}])


class SubscriberPatch(Input):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200, examples=["Ada Lovelace"])
    language: str | None = Field(default=None, max_length=16, examples=["uk"])
    attributes: dict[str, Any] | None = Field(default=None, examples=[{"plan": "pro"}])


class SubscriptionPut(Input):
    status: Literal["active", "unsubscribed"] = Field(examples=["unsubscribed"])
    consent_note: str | None = Field(
        default=None, max_length=500, examples=["Asked by phone on 2026-11-20"]
    )


class ResendOut(BaseModel):
    status: Literal["pending"] = "pending"
    newsletters: list[str] = Field(examples=[["weekly"]])


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None = Field(default=None, examples=["NDI"])


# "events" is what most webhook APIs call the list (GitHub, listmonk): taken as well.
EVENT_TYPES_FIELD = AliasChoices("event_types", "events")


class WebhookCreate(Input):
    url: str = Field(max_length=2000, examples=["https://crm.example.com/hooks/newsletter"])
    event_types: list[str] = Field(
        min_length=1,
        max_length=10,
        validation_alias=EVENT_TYPES_FIELD,
        examples=[["subscription.confirmed"]],
    )
    secret: str | None = Field(default=None, min_length=16, max_length=100, examples=[None])


class WebhookPatch(Input):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2000)
    event_types: list[str] | None = Field(
        default=None, min_length=1, max_length=10, validation_alias=EVENT_TYPES_FIELD
    )
    active: bool | None = Field(default=None, examples=[False])


class WebhookOut(BaseModel):
    id: int = Field(examples=[1])
    url: str = Field(examples=["https://crm.example.com/hooks/newsletter"])
    event_types: list[str] = Field(examples=[["subscription.confirmed"]])
    active: bool = Field(examples=[True])
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(examples=["whsec_9bX3…"], description="Shown only in this answer.")


class WebhookPage(BaseModel):
    items: list[WebhookOut]
    next_cursor: str | None = None


class DeliveryOut(BaseModel):
    id: int
    event_id: int | None
    status_code: int | None = Field(examples=[200])
    error: str | None = Field(examples=[None])
    duration_ms: int | None = Field(examples=[35])
    created_at: datetime


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None = None


class BlockCreate(Input):
    kind: Literal["address", "domain"] | None = Field(
        default=None,
        examples=["domain"],
        description="Left out: an address when the value holds an @, else a domain.",
    )
    value: str = Field(max_length=320, examples=["spam.example"])
    note: str = Field(default="", max_length=500, examples=["Throwaway domain"])


class BlockPatch(Input):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(max_length=500, examples=["Throwaway domain, seen in May"])


class BlockOut(BaseModel):
    id: int = Field(examples=[1])
    kind: str = Field(examples=["domain"])
    value: str = Field(examples=["spam.example"])
    note: str = Field(examples=["Throwaway domain"])
    created_at: datetime


class BlockPage(BaseModel):
    items: list[BlockOut]
    next_cursor: str | None = None
