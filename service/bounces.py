"""Bounces and complaints: what providers and returned mail report, and what it does.

A hard bounce or a complaint ends every live subscription of the address (`bounced`, the
event says which); both suppress the address and hold back the mail still queued for it. Soft
bounces are counted per subscriber and count as a hard one at `soft_bounce_threshold`.

Reports arrive two ways: provider webhooks (`POST /v1/hooks/bounces`, read by
`parse_notification`) and returned mail at a VERP address (`newsletter inbound`, read by
`read_returned_mail`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from email.parser import HeaderParser
from email.utils import parseaddr
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service import events, suppression
from service.addresses import normalise
from service.config import Settings
from service.errors import FieldError, InvalidInput
from service.json_depth import nests_deeper
from service.models import (
    OutboxMessage,
    OutboxStatus,
    Status,
    Subscriber,
    Subscription,
    utcnow,
)

log = logging.getLogger(__name__)

HARD = "hard"
SOFT = "soft"
COMPLAINT = "complaint"

# Postmark's bounce `Type`s that say something about the address; the rest (auto-responders,
# challenge mails, blocked content, ...) are acknowledged and ignored.
POSTMARK_TYPES = {
    "HardBounce": HARD,
    "BadEmailAddress": HARD,
    "SoftBounce": SOFT,
    "Transient": SOFT,
    "DnsError": SOFT,
    "SpamComplaint": COMPLAINT,
}
# What a hard bounce and a complaint do: (suppression reason, new status, its timestamp, event).
_ENDINGS = {
    HARD: ("bounced", Status.bounced.value, "bounced_at", "subscription.bounced"),
    # design: `bounced` (hard bounce / complaint).
    COMPLAINT: ("complained", Status.bounced.value, "bounced_at", "subscription.bounced"),
}
SNS_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
_REASON_LENGTH = 300
# SNS waits 15 s for the answer to its own POST, which this visit is part of.
_SNS_TIMEOUT = 10.0


@dataclass(frozen=True)
class BounceReport:
    """One address that bounced (hard or soft) or complained, and who said so."""

    kind: str  # hard, soft or complaint
    email: str  # the normalised address, lower-cased
    source: str  # webhook, ses, postmark, dsn, arf: the event actor is "bounce:<source>"
    reason: str | None = None


@dataclass
class Intake:
    """What one webhook body holds."""

    reports: list[BounceReport] = field(default_factory=list)
    ignored: int = 0  # notifications that need nothing done (deliveries, auto-replies)
    subscribe_url: str | None = None  # an Amazon SNS subscription waiting to be confirmed


@dataclass
class Counts:
    """What was received, by kind: the same whether or not anyone had the address."""

    received: int = 0
    hard_bounces: int = 0
    soft_bounces: int = 0
    complaints: int = 0
    ignored: int = 0


# ---------------------------------------------------------------- reading webhook bodies


def _invalid(where: str, name: str, message: str, code: str = "invalid") -> InvalidInput:
    return InvalidInput([FieldError(f"{where}{name}", code, message)])


def _text(item: dict[str, Any], name: str, where: str, required: bool = True) -> str | None:
    value = item.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _invalid(where, name, f"{name} must be a non-empty string.", "required")
    return value


def _object(item: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = item.get(name)
    if not isinstance(value, dict):
        raise _invalid(where, name, f"{name} must be an object.")
    return value


def _address(raw: str, where: str) -> str:
    # Providers may pass `"Name" <addr>`; the address is what counts.
    if "<" in raw:
        raw = parseaddr(raw)[1] or raw
    checked = normalise(raw)
    if isinstance(checked, FieldError):
        raise InvalidInput(
            [FieldError(f"{where}email", checked.code, checked.message, checked.detail)]
        )
    return checked.key


def _reason(value: Any) -> str | None:
    return str(value)[:_REASON_LENGTH] if value else None


def _report(kind: str, raw_email: str, source: str, reason: Any, where: str) -> BounceReport:
    return BounceReport(kind, _address(raw_email, where), source, _reason(reason))


def _generic(item: dict[str, Any], where: str, intake: Intake) -> None:
    kind = item.get("type")
    if kind not in ("bounce", "complaint"):
        raise _invalid(where, "type", "type is bounce or complaint.")
    email = _text(item, "email", where)
    assert email is not None
    reason = _text(item, "reason", where, required=False)
    if kind == "complaint":
        intake.reports.append(_report(COMPLAINT, email, "webhook", reason, where))
        return
    bounce_type = item.get("bounce_type", HARD)
    if bounce_type not in (HARD, SOFT):
        raise _invalid(where, "bounce_type", "bounce_type is hard or soft.")
    intake.reports.append(_report(bounce_type, email, "webhook", reason, where))


def _recipients(block: dict[str, Any], name: str, where: str) -> list[dict[str, Any]]:
    found = block.get(name)
    if not isinstance(found, list) or not all(
        isinstance(r, dict) and isinstance(r.get("emailAddress"), str) for r in found
    ):
        raise _invalid(where, name, f"{name} must be a list of objects with emailAddress.")
    return found


def _ses(item: dict[str, Any], where: str, intake: Intake) -> None:
    """An Amazon SES notification (or event-publishing record)."""
    kind = item.get("notificationType") or item.get("eventType")
    if kind == "Bounce":
        bounce = _object(item, "bounce", where)
        # Permanent is an address that will never take mail; Transient and Undetermined may.
        verdict = HARD if bounce.get("bounceType") == "Permanent" else SOFT
        for recipient in _recipients(bounce, "bouncedRecipients", where):
            reason = recipient.get("diagnosticCode") or bounce.get("bounceSubType")
            intake.reports.append(_report(verdict, recipient["emailAddress"], "ses", reason, where))
    elif kind == "Complaint":
        complaint = _object(item, "complaint", where)
        recipients = _recipients(complaint, "complainedRecipients", where)
        if complaint.get("complaintFeedbackType") == "not-spam":
            intake.ignored += len(recipients)
            return
        for recipient in recipients:
            reason = complaint.get("complaintFeedbackType")
            intake.reports.append(
                _report(COMPLAINT, recipient["emailAddress"], "ses", reason, where)
            )
    else:  # Delivery, Send, Open, ...
        intake.ignored += 1


def _sns(item: dict[str, Any], where: str, intake: Intake) -> None:
    """An Amazon SNS envelope: a subscription to confirm, or an SES notification inside."""
    kind = item["Type"]
    if kind == "SubscriptionConfirmation":
        url = _text(item, "SubscribeURL", where)
        intake.subscribe_url = url
        return
    if kind == "UnsubscribeConfirmation":
        intake.ignored += 1
        return
    raw = _text(item, "Message", where)
    assert raw is not None
    try:
        message = None if nests_deeper(raw.encode()) else json.loads(raw)
    except ValueError as exc:
        raise _invalid(where, "Message", "Message must hold the SES notification JSON.") from exc
    if not isinstance(message, dict):
        raise _invalid(where, "Message", "Message must hold the SES notification JSON.")
    _ses(message, where + "Message.", intake)


def _postmark(item: dict[str, Any], where: str, intake: Intake) -> None:
    record = item["RecordType"]
    if record not in ("Bounce", "SpamComplaint"):  # Delivery, Open, Click, SubscriptionChange
        intake.ignored += 1
        return
    kind = POSTMARK_TYPES.get(str(item.get("Type", record)))
    if kind is None:
        intake.ignored += 1
        return
    email = _text(item, "Email", where)
    assert email is not None
    reason = item.get("Description") or item.get("Details") or item.get("Type")
    intake.reports.append(_report(kind, email, "postmark", reason, where))


def parse_notification(data: Any) -> Intake:
    """Read a webhook body: the generic JSON, Amazon SES (raw, or in an SNS envelope) or
    Postmark, one object or a list. A body of no known shape is InvalidInput."""
    items = data if isinstance(data, list) else [data]
    intake = Intake()
    for index, item in enumerate(items):
        where = f"{index}." if isinstance(data, list) else ""
        if not isinstance(item, dict):
            raise _invalid(where, "body", "A report must be a JSON object.")
        if "RecordType" in item:
            _postmark(item, where, intake)
        elif item.get("Type") in SNS_TYPES:
            _sns(item, where, intake)
        elif "notificationType" in item or "eventType" in item:
            _ses(item, where, intake)
        elif "type" in item:
            _generic(item, where, intake)
        else:
            raise _invalid(
                where, "type", "Not a bounce report: expected generic, SES, SNS or Postmark JSON."
            )
    return intake


async def confirm_sns_subscription(url: str) -> bool:
    """Visit an SNS SubscribeURL, but only one of Amazon's own (no fetching of any URL a
    caller names); True when SNS accepted it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" or not (host.startswith("sns.") and host.endswith(".amazonaws.com")):
        log.warning("SNS SubscribeURL refused (not an Amazon SNS address): %s", url)
        return False
    try:
        async with httpx.AsyncClient(timeout=_SNS_TIMEOUT, follow_redirects=False) as client:
            answer = await client.get(url)
    except httpx.HTTPError as exc:
        log.warning("SNS subscription confirmation failed: %s", exc)
        return False
    return answer.status_code == 200


# ---------------------------------------------------------------- reading returned mail


def _status_blocks(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    # message/global-delivery-status (RFC 6533) arrives as text: the blocks are header groups.
    text = payload if isinstance(payload, str) else ""
    return [HeaderParser().parsestr(chunk) for chunk in text.replace("\r\n", "\n").split("\n\n")]


def read_returned_mail(message: Message) -> tuple[str, str | None] | None:
    """Classify what came back to a VERP address: (hard|soft|complaint, reason), or None for
    anything that is not a failure report (an auto-reply, a delay warning, a delivery)."""
    if message.get_content_type() != "multipart/report":
        return None
    report_type = str(message.get_param("report-type", "")).lower()
    parts = message.get_payload()
    if not isinstance(parts, list):
        return None
    if report_type == "feedback-report":  # ARF (RFC 5965): someone pressed "this is spam"
        return COMPLAINT, "feedback-report"
    if report_type != "delivery-status":
        return None
    for part in parts:
        if not isinstance(part, Message) or part.get_content_type() not in (
            "message/delivery-status",
            "message/global-delivery-status",
        ):
            continue
        for block in _status_blocks(part):
            action = str(block.get("Action", "")).strip().lower()
            status = str(block.get("Status", "")).strip()
            if action != "failed":
                continue
            reason = _reason(" ".join(str(block.get("Diagnostic-Code", status)).split()))
            if status.startswith("5"):
                return HARD, reason
            if status.startswith("4"):
                return SOFT, reason
    return None


async def returned_mail_report(
    session: AsyncSession, outbox_id: int, verdict: tuple[str, str | None]
) -> BounceReport | None:
    """The report a VERP bounce makes: about the recipient of the outbox message it names
    (never an address the bounce itself claims, so nobody can bounce someone else)."""
    recipient = await session.scalar(
        select(OutboxMessage.recipient).where(OutboxMessage.id == outbox_id)
    )
    if not recipient:
        return None
    kind, reason = verdict
    checked = normalise(recipient)
    key = recipient.lower() if isinstance(checked, FieldError) else checked.key
    return BounceReport(kind, key, "arf" if kind == COMPLAINT else "dsn", reason)


# ---------------------------------------------------------------- what a report does


async def apply_reports(
    session: AsyncSession,
    settings: Settings,
    reports: list[BounceReport],
    now: datetime | None = None,
) -> Counts:
    """Apply reports in the caller's transaction. An unknown address is still suppressed on
    a hard bounce or complaint (only its hash is kept), so a later import cannot add it."""
    now = now or utcnow()
    counts = Counts(received=len(reports))
    for report in reports:
        if report.kind == HARD:
            counts.hard_bounces += 1
        elif report.kind == SOFT:
            counts.soft_bounces += 1
        else:
            counts.complaints += 1
        await _apply(session, settings, report, now)
    return counts


async def _apply(
    session: AsyncSession, settings: Settings, report: BounceReport, now: datetime
) -> None:
    actor = f"bounce:{report.source}"
    subscriber_id = await session.scalar(
        select(Subscriber.id).where(Subscriber.email_key == report.email)
    )
    kind = report.kind
    details: dict[str, Any] = {"reason": report.reason} if report.reason else {}
    if kind == SOFT:
        if subscriber_id is None:
            return
        count = await session.scalar(
            update(Subscriber)
            .where(Subscriber.id == subscriber_id)
            .values(soft_bounces=Subscriber.soft_bounces + 1)
            .returning(Subscriber.soft_bounces)
            .execution_options(synchronize_session=False)
        )
        if (count or 0) < settings.soft_bounce_threshold:
            await events.record(
                session,
                [
                    events.event_row(
                        "subscriber.soft_bounced",
                        subscriber_id,
                        None,
                        actor,
                        None,
                        now,
                        count=count,
                        **details,
                    )
                ],
            )
            return
        kind = HARD
        details["soft_bounces"] = count

    suppressed_as, status, stamp, event_type = _ENDINGS[kind]
    await suppression.suppress(session, report.email, suppressed_as, now)
    await _hold_queued_mail(session, report.email, subscriber_id)
    if subscriber_id is None:
        return
    if kind == HARD:
        data = {"bounce_type": report.kind, **details}
        await session.execute(
            update(Subscriber)
            .where(Subscriber.id == subscriber_id)
            .values(soft_bounces=0)
            .execution_options(synchronize_session=False)
        )
    else:
        data = {"reason": "complaint"}
    ended = await session.execute(
        update(Subscription)
        .where(
            Subscription.subscriber_id == subscriber_id,
            Subscription.status.in_([Status.pending.value, Status.active.value]),
        )
        .values(status=status, updated_at=now, **{stamp: now})
        .returning(Subscription.newsletter_id)
        .execution_options(synchronize_session=False)
    )
    await events.record(
        session,
        [
            events.event_row(event_type, subscriber_id, newsletter_id, actor, None, now, **data)
            for newsletter_id in sorted(ended.scalars().all())
        ],
    )


async def _hold_queued_mail(
    session: AsyncSession, email_key: str, subscriber_id: int | None
) -> None:
    """Mail still queued for a suppressed address is never sent: it is marked dead."""
    addressed = func.lower(OutboxMessage.recipient) == email_key
    if subscriber_id is not None:
        addressed = or_(addressed, OutboxMessage.subscriber_id == subscriber_id)
    await session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.kind == "email",
            OutboxMessage.status == OutboxStatus.queued.value,
            addressed,
        )
        .values(status=OutboxStatus.dead.value, last_error="suppressed")
        .execution_options(synchronize_session=False)
    )
