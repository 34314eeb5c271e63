"""Webhooks: subscriptions of ops' systems to event types, signed calls, a delivery log."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from service import events
from service.errors import FieldError, InvalidInput, NotFound
from service.events import EVENT_TYPES
from service.models import Event, Newsletter, Subscriber, Webhook, WebhookDelivery, utcnow

SIGNATURE_TOLERANCE_SECONDS = 300


def _callable_url(url: str) -> bool:
    """An absolute http(s) URL the HTTP client can call: one it cannot even build a request
    for (a control character, a bad port) would fail every delivery."""
    if len(url) > 2000 or any(not ch.isprintable() or ch.isspace() for ch in url):
        return False
    try:
        parts = urlsplit(url)
        parsed = httpx.URL(url)
        _ = parts.port  # ValueError when out of range
    except (ValueError, httpx.InvalidURL):
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and bool(parsed.host)


def _check(url: str | None, event_types: list[str] | None) -> None:
    errors = []
    if url is not None and not _callable_url(url):
        errors.append(FieldError("url", "invalid", "An absolute http(s) URL."))
    if event_types is not None:
        unknown = [t for t in event_types if t not in EVENT_TYPES]
        if not event_types or unknown:
            errors.append(
                FieldError("event_types", "invalid", "One or more of: " + ", ".join(EVENT_TYPES))
            )
    if errors:
        raise InvalidInput(errors)


async def _audit(session: AsyncSession, type_: str, hook_id: int, actor: str, **data: Any) -> None:
    await events.record(
        session,
        [events.event_row(type_, None, None, actor, None, utcnow(), webhook=hook_id, **data)],
    )


async def create_webhook(
    session: AsyncSession,
    url: str,
    event_types: list[str],
    secret: str | None = None,
    actor: str = "cli",
) -> Webhook:
    """Register a receiver; the signing secret is generated unless given."""
    _check(url, event_types)
    hook = Webhook(
        url=url,
        event_types=list(dict.fromkeys(event_types)),
        secret=secret or "whsec_" + secrets.token_urlsafe(24),
        active=True,
        created_at=utcnow(),
    )
    session.add(hook)
    await session.flush()
    await _audit(session, "webhook.created", hook.id, actor, url=url)
    return hook


async def get_webhook(session: AsyncSession, webhook_id: int) -> Webhook:
    hook = await session.get(Webhook, webhook_id)
    if hook is None:
        raise NotFound("No such webhook.")
    return hook


async def list_webhooks(
    session: AsyncSession, after_id: int | None = None, limit: int = 100
) -> list[Webhook]:
    query = select(Webhook).order_by(Webhook.id).limit(limit)
    if after_id is not None:
        query = query.where(Webhook.id > after_id)
    return list(await session.scalars(query))


async def update_webhook(
    session: AsyncSession, webhook_id: int, changes: Mapping[str, Any], actor: str = "cli"
) -> Webhook:
    hook = await get_webhook(session, webhook_id)
    _check(changes.get("url"), changes.get("event_types"))
    for key in ("url", "event_types", "active"):
        if changes.get(key) is not None:
            setattr(hook, key, changes[key])
    await session.flush()
    await _audit(session, "webhook.updated", hook.id, actor, fields=sorted(changes))
    return hook


async def delete_webhook(session: AsyncSession, webhook_id: int, actor: str = "cli") -> None:
    await get_webhook(session, webhook_id)
    await session.execute(delete(Webhook).where(Webhook.id == webhook_id))
    await _audit(session, "webhook.deleted", webhook_id, actor)


async def deliveries(
    session: AsyncSession, webhook_id: int, after_id: int | None, limit: int
) -> list[WebhookDelivery]:
    await get_webhook(session, webhook_id)
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    if after_id is not None:
        query = query.where(WebhookDelivery.id < after_id)
    return list(await session.scalars(query))


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 over id, timestamp and body: the receiver checks all three."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float | None = None,
    tolerance: int = SIGNATURE_TOLERANCE_SECONDS,
) -> bool:
    """What a receiver does: a valid signature on a fresh timestamp (old ones are replays)."""
    try:
        message_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        given = headers["webhook-signature"]
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, message_id, timestamp, body), given)


@dataclass
class WebhookCall:
    outbox_id: int
    webhook_id: int
    event_id: int


def event_body(
    event: Event, subscriber: Subscriber | None, newsletter: Newsletter | None
) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "created_at": event.created_at.isoformat(),
        "subscriber": (
            {"id": subscriber.public_id, "email": subscriber.email} if subscriber else None
        ),
        "newsletter": newsletter.slug if newsletter else None,
        "actor": event.actor,
        "data": event.data,
    }


async def load_calls(
    session: AsyncSession, calls: list[WebhookCall]
) -> dict[int, tuple[Webhook, bytes] | None]:
    """Build each call's body from the event as it stands (None: webhook or event gone)."""
    hooks = {
        h.id: h
        for h in await session.scalars(
            select(Webhook).where(Webhook.id.in_({c.webhook_id for c in calls}))
        )
    }
    found = {
        e.id: e
        for e in await session.scalars(
            select(Event).where(Event.id.in_({c.event_id for c in calls}))
        )
    }
    subscribers = {
        s.id: s
        for s in await session.scalars(
            select(Subscriber).where(
                Subscriber.id.in_({e.subscriber_id for e in found.values() if e.subscriber_id})
            )
        )
    }
    newsletters = {
        n.id: n
        for n in await session.scalars(
            select(Newsletter).where(
                Newsletter.id.in_({e.newsletter_id for e in found.values() if e.newsletter_id})
            )
        )
    }
    out: dict[int, tuple[Webhook, bytes] | None] = {}
    for call in calls:
        hook, event = hooks.get(call.webhook_id), found.get(call.event_id)
        if hook is None or event is None or not hook.active:
            out[call.outbox_id] = None
            continue
        body = event_body(
            event,
            subscribers.get(event.subscriber_id or 0),
            newsletters.get(event.newsletter_id or 0),
        )
        out[call.outbox_id] = (hook, json.dumps(body, separators=(",", ":")).encode())
    return out


@dataclass
class CallResult:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


async def call(client: httpx.AsyncClient, hook: Webhook, outbox_id: int, body: bytes) -> CallResult:
    """POST one signed event; never raises."""
    timestamp = int(time.time())
    message_id = f"msg_{outbox_id}"
    headers = {
        "content-type": "application/json",
        "user-agent": "newsletter-service-webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(hook.secret, message_id, timestamp, body),
    }
    started = time.monotonic()
    try:
        response = await client.post(hook.url, content=body, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        # A URL stored before it was checked as strictly as now fails here, as this one
        # call's failure: raised, it would fail the worker's whole batch, mail included.
        return CallResult(
            None, f"{type(exc).__name__}: {exc}"[:500], int((time.monotonic() - started) * 1000)
        )
    elapsed = int((time.monotonic() - started) * 1000)
    error = None if 200 <= response.status_code < 300 else response.text[:500]
    return CallResult(response.status_code, error, elapsed)


def log_row(
    hook_id: int, event_id: int, outbox_id: int, result: CallResult, now: datetime
) -> dict[str, Any]:
    return {
        "webhook_id": hook_id,
        "event_id": event_id,
        "outbox_id": outbox_id,
        "status_code": result.status_code,
        "error": result.error,
        "duration_ms": result.duration_ms,
        "created_at": now,
    }
