"""Inbound mail: the List-Unsubscribe mailto and VERP bounces, through a real SMTP listener."""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiosmtplib
import httpx
import pytest
from fastapi import FastAPI

from service import inbound, tokens
from service.app import create_app
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from tests.conftest import SMTPServer, deliver, free_port, make_newsletter
from tests.test_admin import make_key
from tests.test_bounces import events_of, person, sign_up, statuses


@pytest.fixture
async def listener(app: FastAPI, settings: Settings) -> AsyncIterator[int]:
    """`newsletter inbound` on a free loopback port, on the app's database."""
    port = free_port()
    server = await inbound.start(app.state.db, settings, "127.0.0.1", port)
    yield port
    server.close()
    await server.wait_closed()


@pytest.fixture
async def lmtp_listener(app: FastAPI, settings: Settings) -> AsyncIterator[int]:
    port = free_port()
    server = await inbound.start(app.state.db, settings, "127.0.0.1", port, lmtp=True)
    yield port
    server.close()
    await server.wait_closed()


async def welcome_mail(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker, email: str
) -> tuple[str, int]:
    """Sign `email` up to a single opt-in newsletter and return (the mailto address of the
    welcome mail's List-Unsubscribe, the outbox id its Message-ID names)."""
    await make_newsletter(db, "weekly", opt_in="single")
    await sign_up(client, email, "weekly")
    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    mailto = next(
        part.strip(" <>")
        for part in mail.message["List-Unsubscribe"].split(",")
        if part.strip(" <>").startswith("mailto:")
    )
    found = re.match(r"<(\d+)\.", mail.message["Message-ID"])
    assert found
    return urlsplit(mailto).path, int(found.group(1))


async def send(port: int, sender: str, recipient: str, message: bytes) -> None:
    """Send as an MTA would; an empty sender is the null return path (MAIL FROM:<>) of a DSN."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        await client.sendmail(sender, [recipient], message)


def plain_mail(sender: str, recipient: str, subject: str = "unsubscribe") -> bytes:
    return (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        "Message-ID: <reply-1@reader.example.com>\r\n\r\nPlease take me off.\r\n"
    ).encode()


def dsn(to: str, final_recipient: str, status: str = "5.1.1", action: str = "failed") -> bytes:
    """A delivery status notification (RFC 3464) as Postfix writes one."""
    return f"""From: MAILER-DAEMON@mx.example.com (Mail Delivery System)
To: {to}
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="DSN-BOUNDARY"

--DSN-BOUNDARY
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.com.
I'm sorry to have to inform you that your message could not be delivered.

--DSN-BOUNDARY
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.com
Arrival-Date: Wed, 25 Nov 2026 12:00:00 +0000

Final-Recipient: rfc822; {final_recipient}
Original-Recipient: rfc822;{final_recipient}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; {status[0]}50 {status} <{final_recipient}>: Recipient address
    rejected: User unknown in virtual mailbox table

--DSN-BOUNDARY
Content-Type: text/rfc822-headers

From: Weekly <news@example.org>
To: {final_recipient}
Subject: Welcome

--DSN-BOUNDARY--
""".replace("\n", "\r\n").encode()


def arf(to: str) -> bytes:
    """An abuse feedback report (RFC 5965): the reader pressed "this is spam"."""
    return f"""From: feedback@isp.example.net
To: {to}
Subject: Abuse report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="ARF"

--ARF
Content-Type: text/plain

This is an email abuse report.

--ARF
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ISP-FBL/1.0
Version: 1

--ARF
Content-Type: text/rfc822-headers

From: Weekly <news@example.org>
Subject: Welcome

--ARF--
""".replace("\n", "\r\n").encode()


async def test_the_list_unsubscribe_mailto_of_a_real_mail_unsubscribes(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    listener: int,
) -> None:
    admin = await make_key(db)
    address, _ = await welcome_mail(client, db, smtp, worker, "Reader@example.com")
    assert address.startswith("news+u-") and address.endswith("@example.org")
    assert len(address.partition("@")[0]) <= 64  # RFC 5321's limit for a local part
    assert statuses(await person(client, admin, "reader@example.com")) == {"weekly": "active"}

    # What a mail client's unsubscribe button sends, through a system that folds case.
    shouted = address.partition("@")[0].upper() + "@example.org"
    await send(listener, "Reader@example.com", shouted, plain_mail("Reader@example.com", shouted))

    detail = await person(client, admin, "reader@example.com")
    assert statuses(detail) == {"weekly": "unsubscribed"}
    [event] = events_of(detail, "subscription.unsubscribed")
    assert event["actor"] == "mailto"
    assert event["ip"] == "127.0.0.1"

    # A second request is harmless.
    await send(listener, "Reader@example.com", address, plain_mail("Reader@example.com", address))
    assert (
        len(
            events_of(
                await person(client, admin, "reader@example.com"), "subscription.unsubscribed"
            )
        )
        == 1
    )


async def test_a_dsn_to_the_verp_address_marks_the_recipient_bounced(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    settings: Settings,
    listener: int,
) -> None:
    admin = await make_key(db)
    await make_newsletter(db, "monthly", opt_in="single")
    await sign_up(client, "bystander@example.com", "monthly")
    assert await deliver(worker) == 1
    smtp.sink.received.clear()
    _, outbox_id = await welcome_mail(client, db, smtp, worker, "gone@example.com")
    verp = tokens.verp_address(settings.secret_keys, settings.mail_from, outbox_id)
    assert re.fullmatch(rf"news\+bounce-{outbox_id}-[0-9a-f]{{16}}@example\.org", verp)

    # The bounce names someone else as Final-Recipient: only the message's own recipient
    # counts, so a bounce cannot be used to remove anybody else.
    await send(listener, "", verp, dsn(verp, "bystander@example.com"))

    detail = await person(client, admin, "gone@example.com")
    assert statuses(detail) == {"weekly": "bounced"}
    [event] = events_of(detail, "subscription.bounced")
    assert event["actor"] == "bounce:dsn"
    assert event["data"]["bounce_type"] == "hard"
    assert "5.1.1" in event["data"]["reason"]
    assert statuses(await person(client, admin, "bystander@example.com")) == {"monthly": "active"}


async def test_a_temporary_failure_over_lmtp_is_a_soft_bounce(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    settings: Settings,
    lmtp_listener: int,
) -> None:
    admin = await make_key(db)
    _, outbox_id = await welcome_mail(client, db, smtp, worker, "full@example.com")
    verp = tokens.verp_address(settings.secret_keys, settings.mail_from, outbox_id)

    def lmtp_send() -> dict[str, tuple[int, bytes]]:
        with smtplib.LMTP("127.0.0.1", lmtp_listener) as client_:
            return client_.sendmail("", [verp], dsn(verp, "full@example.com", status="4.2.2"))

    assert await asyncio.to_thread(lmtp_send) == {}
    detail = await person(client, admin, "full@example.com")
    assert statuses(detail) == {"weekly": "active"}
    [soft] = events_of(detail, "subscriber.soft_bounced")
    assert soft["actor"] == "bounce:dsn"
    assert soft["data"]["count"] == 1


async def test_what_is_no_failure_report_changes_nothing(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    settings: Settings,
    listener: int,
) -> None:
    admin = await make_key(db)
    _, outbox_id = await welcome_mail(client, db, smtp, worker, "away@example.com")
    verp = tokens.verp_address(settings.secret_keys, settings.mail_from, outbox_id)
    # A delay warning, and an out-of-office reply sent to the return path.
    await send(listener, "", verp, dsn(verp, "away@example.com", "4.4.1", action="delayed"))
    await send(listener, "away@example.com", verp, plain_mail("away@example.com", verp, "Away"))
    detail = await person(client, admin, "away@example.com")
    assert statuses(detail) == {"weekly": "active"}
    assert events_of(detail, "subscriber.soft_bounced") == []


async def test_an_abuse_report_to_the_verp_address_is_a_complaint(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    settings: Settings,
    listener: int,
) -> None:
    admin = await make_key(db)
    _, outbox_id = await welcome_mail(client, db, smtp, worker, "upset@example.com")
    verp = tokens.verp_address(settings.secret_keys, settings.mail_from, outbox_id)
    await send(listener, "feedback@isp.example.net", verp, arf(verp))
    detail = await person(client, admin, "upset@example.com")
    assert statuses(detail) == {"weekly": "bounced"}
    [event] = events_of(detail, "subscription.bounced")
    assert event["data"] == {"reason": "complaint"}
    assert event["actor"] == "bounce:arf"


async def test_bad_signatures_and_other_addresses_are_refused_at_rcpt(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    settings: Settings,
    listener: int,
) -> None:
    admin = await make_key(db)
    address, outbox_id = await welcome_mail(client, db, smtp, worker, "keep@example.com")
    local, _, domain = address.partition("@")
    verp = tokens.verp_address(settings.secret_keys, settings.mail_from, outbox_id)
    other_key = tokens.verp_address(["another-secret"], settings.mail_from, outbox_id)
    refused = [
        local[:-2] + ("AA" if not local.endswith("AA") else "BB") + "@" + domain,
        local.replace("+u-", "+u-a") + "@" + domain,
        "news+u-@example.org",
        "news+u-" + "a" * 26 + "-" + "0" * 16 + "@example.org",
        "news+unsubscribe-@example.org",
        verp.replace(f"-{outbox_id}-", f"-{outbox_id + 1}-"),
        other_key,
        "news+bounce-x-y@example.org",
        "news@example.org",
        "postmaster@example.org",
    ]
    for recipient in refused:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
            await send(listener, "x@example.com", recipient, plain_mail("x@example.com", "y"))
        [error] = caught.value.recipients
        assert error.code == 550, recipient
    assert statuses(await person(client, admin, "keep@example.com")) == {"weekly": "active"}

    # The longer form of earlier mail still works; its signature is the manage token's.
    public_id = tokens.verify_manage_token(
        settings.secret_keys, tokens.manage_token(settings.secret_keys, "f" * 32)
    )
    assert public_id == "f" * 32
    long_form = f"news+unsubscribe-{tokens.manage_token(settings.secret_keys, public_id)}@x.org"
    short_form = f"news+{tokens.unsubscribe_tag(settings.secret_keys, public_id)}@x.org"
    assert inbound.recipient_for(settings, long_form) == inbound.recipient_for(settings, short_form)
    assert inbound.recipient_for(settings, long_form) is not None

    # Text no signature can be (compare_digest takes ASCII only) is refused, not an error.
    assert (
        inbound.recipient_for(settings, "news+u-" + "a" * 26 + "-é" + "0" * 15 + "@x.org") is None
    )
    assert inbound.recipient_for(settings, "news+unsubscribe-" + "a" * 32 + ".é@x.org") is None
    assert inbound.recipient_for(settings, "news+bounce-1-é@x.org") is None
    assert inbound.recipient_for(settings, "news+bounce-\u0661-abc@x.org") is None

    # Key rotation: a VERP address signed by an older key still verifies.
    rotated = settings.model_copy(update={"secret_keys": ["new-key", *settings.secret_keys]})
    assert inbound.recipient_for(rotated, verp) == inbound.Recipient("bounce", outbox_id=outbox_id)


async def test_with_verp_the_return_path_of_a_real_mail_takes_its_bounce(
    settings: Settings, db: Database, smtp: SMTPServer
) -> None:
    verp_settings = settings.model_copy(update={"verp": True})
    app = create_app(verp_settings)
    server = await inbound.start(app.state.db, verp_settings, "127.0.0.1", port := free_port())
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            admin = await make_key(db)
            await make_newsletter(db, "weekly", opt_in="single")
            await sign_up(http, "returned@example.com", "weekly")
            assert await deliver(DeliveryWorker(app.state.db, verp_settings)) == 1
            [mail] = smtp.sink.received
            assert mail.mail_from.startswith("news+bounce-")
            await send(port, "", mail.mail_from, dsn(mail.mail_from, "returned@example.com"))
            detail = await person(http, admin, "returned@example.com")
            assert statuses(detail) == {"weekly": "bounced"}
    finally:
        server.close()
        await app.state.signups.stop()
        await app.state.db.dispose()
