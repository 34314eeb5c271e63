"""POST /v1/hooks/bounces: generic JSON, Amazon SES through SNS, Postmark; what a bounce does."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from service.app import create_app
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from tests.conftest import SMTPServer, deliver, free_port, make_newsletter
from tests.test_admin import make_key

SECRET = "bounce-hook-secret"
AUTH = {"authorization": f"Bearer {SECRET}"}
HOOK = "/v1/hooks/bounces"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings with the bounce intake switched on."""
    return settings.model_copy(update={"bounce_webhook_secret": SECRET})


async def sign_up(client: httpx.AsyncClient, email: str, *slugs: str) -> None:
    answer = await client.post("/v1/subscriptions", json={"email": email, "newsletters": slugs})
    assert answer.status_code in (200, 202), answer.text


async def person(client: httpx.AsyncClient, admin: dict[str, str], email: str) -> dict[str, Any]:
    """The admin view of one subscriber: subscriptions (with timestamps) and events."""
    found = await client.get("/v1/admin/subscribers", params={"email": email}, headers=admin)
    [item] = found.json()["items"]
    detail = await client.get(f"/v1/admin/subscribers/{item['id']}", headers=admin)
    assert detail.status_code == 200
    result: dict[str, Any] = detail.json()
    return result


def statuses(detail: dict[str, Any]) -> dict[str, str]:
    return {s["newsletter"]: s["status"] for s in detail["subscriptions"]}


def events_of(detail: dict[str, Any], type_: str) -> list[dict[str, Any]]:
    return [e for e in detail["events"] if e["type"] == type_]


async def two_lists(db: Database, client: httpx.AsyncClient, email: str) -> None:
    """`email` active on weekly (single opt-in) and pending on daily (double opt-in)."""
    await make_newsletter(db, "weekly", opt_in="single")
    await make_newsletter(db, "daily")
    await sign_up(client, email, "weekly")
    await sign_up(client, email, "daily")


def sns(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": "2b6fbc0c-5f3c-5a63-8b65-7c1e1a0a0a0a",
        "TopicArn": "arn:aws:sns:eu-west-1:123456789012:ses-bounces",
        "Message": json.dumps(message),
        "Timestamp": "2026-11-25T12:00:00.000Z",
        "SignatureVersion": "1",
        "Signature": "EXAMPLE",
        "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/cert.pem",
    }


def ses_bounce(email: str, bounce_type: str = "Permanent") -> dict[str, Any]:
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": email,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                }
            ],
            "timestamp": "2026-11-25T12:00:00.000Z",
            "feedbackId": "0100017-example",
        },
        "mail": {"messageId": "abc", "destination": [email]},
    }


def ses_complaint(email: str) -> dict[str, Any]:
    return {
        "notificationType": "Complaint",
        "complaint": {
            "complainedRecipients": [{"emailAddress": email}],
            "complaintFeedbackType": "abuse",
            "timestamp": "2026-11-25T12:00:00.000Z",
        },
        "mail": {"messageId": "abc", "destination": [email]},
    }


def postmark_bounce(email: str, type_: str = "HardBounce") -> dict[str, Any]:
    return {
        "RecordType": "Bounce",
        "ID": 4323372036854775807,
        "Type": type_,
        "TypeCode": 1,
        "Name": "Hard bounce",
        "MessageStream": "outbound",
        "Description": "The server was unable to deliver your message (ex: unknown user).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": email,
        "From": "news@example.org",
        "BouncedAt": "2026-11-25T12:00:00Z",
        "Inactive": True,
        "CanActivate": True,
    }


# ---------------------------------------------------------------- effects


async def test_generic_hard_bounce_marks_every_live_subscription_bounced(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    await two_lists(db, client, "Gone@example.com")
    answer = await client.post(
        HOOK,
        json={
            "type": "bounce",
            "email": "gone@EXAMPLE.com",
            "bounce_type": "hard",
            "reason": "550 user unknown",
        },
        headers=AUTH,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "received": 1,
        "hard_bounces": 1,
        "soft_bounces": 0,
        "complaints": 0,
        "ignored": 0,
        "sns_subscription": None,
    }
    detail = await person(client, admin, "gone@example.com")
    assert statuses(detail) == {"weekly": "bounced", "daily": "bounced"}
    assert all(s["bounced_at"] for s in detail["subscriptions"])
    bounced = events_of(detail, "subscription.bounced")
    assert sorted(e["newsletter"] for e in bounced) == ["daily", "weekly"]
    assert {e["actor"] for e in bounced} == {"bounce:webhook"}
    assert bounced[0]["data"] == {"bounce_type": "hard", "reason": "550 user unknown"}


async def test_complaint_marks_bounced_and_is_recorded_as_one(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design: `bounced` (hard bounce / complaint); the intake "suppresses and marks
    `bounced`"."""
    admin = await make_key(db)
    await two_lists(db, client, "angry@example.com")
    answer = await client.post(
        HOOK, json=[{"type": "complaint", "email": "angry@example.com"}], headers=AUTH
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["complaints"] == 1
    detail = await person(client, admin, "angry@example.com")
    assert statuses(detail) == {"weekly": "bounced", "daily": "bounced"}
    bounced = events_of(detail, "subscription.bounced")
    assert len(bounced) == 2
    assert all(e["data"] == {"reason": "complaint"} for e in bounced)
    assert all(e["actor"] == "bounce:webhook" for e in bounced)
    assert events_of(detail, "subscription.unsubscribed") == []


async def test_an_unsubscribed_list_stays_unsubscribed_after_a_hard_bounce(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    await two_lists(db, client, "left@example.com")
    detail = await person(client, admin, "left@example.com")
    put = await client.put(
        f"/v1/admin/subscribers/{detail['id']}/subscriptions/weekly",
        json={"status": "unsubscribed"},
        headers=admin,
    )
    assert put.status_code == 200, put.text
    await client.post(HOOK, json={"type": "bounce", "email": "left@example.com"}, headers=AUTH)
    assert statuses(await person(client, admin, "left@example.com")) == {
        "weekly": "unsubscribed",
        "daily": "bounced",
    }


async def test_ses_notifications_through_sns(client: httpx.AsyncClient, db: Database) -> None:
    admin = await make_key(db)
    await make_newsletter(db, "weekly", opt_in="single")
    for email in ("hard@example.com", "spam@example.com", "full@example.com"):
        await sign_up(client, email, "weekly")

    # SNS posts its JSON as text/plain.
    for body in (
        sns(ses_bounce("hard@example.com")),
        sns(ses_complaint("spam@example.com")),
        sns(ses_bounce("full@example.com", "Transient")),
        sns({"notificationType": "Delivery", "mail": {}, "delivery": {}}),
    ):
        answer = await client.post(
            HOOK,
            content=json.dumps(body),
            headers={**AUTH, "content-type": "text/plain; charset=UTF-8"},
        )
        assert answer.status_code == 200, answer.text
    assert statuses(await person(client, admin, "hard@example.com")) == {"weekly": "bounced"}
    spam = await person(client, admin, "spam@example.com")
    assert statuses(spam) == {"weekly": "bounced"}
    assert events_of(spam, "subscription.bounced")[0]["actor"] == "bounce:ses"
    full = await person(client, admin, "full@example.com")
    assert statuses(full) == {"weekly": "active"}  # one soft bounce is not enough
    assert events_of(full, "subscriber.soft_bounced")[0]["data"]["count"] == 1
    # SES event publishing straight to HTTPS (raw message delivery): no SNS envelope.
    raw = await client.post(HOOK, json=ses_bounce("full@example.com"), headers=AUTH)
    assert raw.json()["hard_bounces"] == 1
    assert statuses(await person(client, admin, "full@example.com")) == {"weekly": "bounced"}


async def test_sns_subscription_confirmation_is_acknowledged_not_fetched(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37",
        "TopicArn": "arn:aws:sns:eu-west-1:123456789012:ses-bounces",
        "Message": "You have chosen to subscribe to the topic ...",
        "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&Token=x",
    }
    answer = await client.post(
        HOOK, content=json.dumps(body), headers={**AUTH, "content-type": "text/plain"}
    )
    assert answer.status_code == 200
    assert answer.json()["sns_subscription"] == "logged"
    assert answer.json()["received"] == 0


async def test_sns_autoconfirm_never_fetches_an_address_outside_amazon(
    settings: Settings, db: Database
) -> None:
    # Something listening where the URL points: had it been fetched, the answer would be 200.
    visits: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        visits.append(await reader.read(1024))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    app = create_app(settings.model_copy(update={"bounce_sns_autoconfirm": True}))
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            answer = await http.post(
                HOOK,
                json={
                    "Type": "SubscriptionConfirmation",
                    "TopicArn": "arn:aws:sns:eu-west-1:1:x",
                    "SubscribeURL": f"http://127.0.0.1:{port}/?Action=ConfirmSubscription",
                },
                headers=AUTH,
            )
        assert answer.status_code == 200
        assert answer.json()["sns_subscription"] == "failed"
        assert visits == []
    finally:
        server.close()
        await app.state.signups.stop()
        await app.state.db.dispose()


async def test_postmark_bounce_and_spam_complaint_webhooks(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    await make_newsletter(db, "weekly", opt_in="single")
    for email in ("pm-hard@example.com", "pm-spam@example.com", "pm-auto@example.com"):
        await sign_up(client, email, "weekly")

    hard = await client.post(HOOK, json=postmark_bounce("pm-hard@example.com"), headers=AUTH)
    assert hard.json()["hard_bounces"] == 1
    complaint = {
        **postmark_bounce("pm-spam@example.com", "SpamComplaint"),
        "RecordType": "SpamComplaint",
    }
    spam = await client.post(HOOK, json=complaint, headers=AUTH)
    assert spam.json()["complaints"] == 1
    auto = await client.post(
        HOOK, json=postmark_bounce("pm-auto@example.com", "AutoResponder"), headers=AUTH
    )
    assert auto.json()["ignored"] == 1

    hard_detail = await person(client, admin, "pm-hard@example.com")
    assert statuses(hard_detail) == {"weekly": "bounced"}
    assert events_of(hard_detail, "subscription.bounced")[0]["actor"] == "bounce:postmark"
    assert statuses(await person(client, admin, "pm-spam@example.com")) == {"weekly": "bounced"}
    assert statuses(await person(client, admin, "pm-auto@example.com")) == {"weekly": "active"}


async def test_soft_bounces_count_as_hard_at_the_threshold(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    assert settings.soft_bounce_threshold == 3
    admin = await make_key(db)
    await make_newsletter(db, "weekly", opt_in="single")
    await sign_up(client, "flaky@example.com", "weekly")
    soft = {"type": "bounce", "email": "flaky@example.com", "bounce_type": "soft"}

    for expected in (1, 2):
        answer = await client.post(HOOK, json=soft, headers=AUTH)
        assert answer.json()["soft_bounces"] == 1
        detail = await person(client, admin, "flaky@example.com")
        assert statuses(detail) == {"weekly": "active"}
        assert len(events_of(detail, "subscriber.soft_bounced")) == expected

    await client.post(HOOK, json=soft, headers=AUTH)
    detail = await person(client, admin, "flaky@example.com")
    assert statuses(detail) == {"weekly": "bounced"}
    [bounced] = events_of(detail, "subscription.bounced")
    assert bounced["data"]["bounce_type"] == "soft"
    assert bounced["data"]["soft_bounces"] == 3


async def test_unknown_addresses_answer_like_known_ones_and_stay_suppressed(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    await make_newsletter(db, "weekly", opt_in="single")
    await sign_up(client, "known@example.com", "weekly")
    known = await client.post(
        HOOK, json={"type": "bounce", "email": "known@example.com"}, headers=AUTH
    )
    unknown = await client.post(
        HOOK, json={"type": "bounce", "email": "stranger@example.com"}, headers=AUTH
    )
    assert known.status_code == unknown.status_code == 200
    assert known.json() == unknown.json()
    found = await client.get("/v1/admin/subscribers", params={"email": "stranger@"}, headers=admin)
    assert found.json()["items"] == []

    # The bounce is remembered: ops cannot add the address as active.
    added = await client.post(
        "/v1/admin/subscribers",
        json={
            "email": "Stranger@example.com",
            "newsletters": ["weekly"],
            "status": "active",
            "consent_note": "old list",
        },
        headers=admin,
    )
    assert added.status_code == 422, added.text
    assert added.json()["errors"][0]["code"] == "suppressed"


async def test_queued_mail_of_a_bounced_address_is_never_sent(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "daily")
    await sign_up(client, "bouncy@example.com", "daily")  # a confirmation mail is queued
    await sign_up(client, "reader@example.com", "daily")
    answer = await client.post(
        HOOK, json={"type": "bounce", "email": "BOUNCY@example.com"}, headers=AUTH
    )
    assert answer.status_code == 200
    assert await deliver(worker) == 1
    assert [m.rcpt_tos for m in smtp.sink.received] == [["reader@example.com"]]


async def test_complained_address_gets_no_queued_mail(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    await sign_up(client, "upset@example.com", "weekly")  # the welcome mail is queued
    spam = sns(ses_complaint("upset@example.com"))
    assert (await client.post(HOOK, json=spam, headers=AUTH)).status_code == 200
    assert await deliver(worker) == 0
    assert smtp.sink.received == []


# ---------------------------------------------------------------- auth and malformed bodies


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({}, {}),
        ({"authorization": "Bearer wrong"}, {}),
        ({"authorization": f"Bearer {SECRET}x"}, {}),
        ({"authorization": "Basic " + base64.b64encode(b"user:wrong").decode()}, {}),
        ({"authorization": "Basic !!!"}, {}),
        ({}, {"token": "wrong"}),
        ({}, {"token": ""}),
    ],
)
async def test_a_wrong_or_missing_secret_is_401(
    client: httpx.AsyncClient,
    db: Database,
    headers: dict[str, str],
    params: dict[str, str],
) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    await sign_up(client, "target@example.com", "weekly")
    answer = await client.post(
        HOOK,
        json={"type": "bounce", "email": "target@example.com"},
        headers=headers,
        params=params,
    )
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["title"] == "A valid webhook secret or admin API key is required"
    admin = await make_key(db)
    assert statuses(await person(client, admin, "target@example.com")) == {"weekly": "active"}


async def test_the_secret_may_come_as_query_token_or_basic_password(
    client: httpx.AsyncClient, db: Database
) -> None:
    body = {"type": "bounce", "email": "nobody@example.com"}
    by_query = await client.post(HOOK, json=body, params={"token": SECRET})
    assert by_query.status_code == 200
    basic = "Basic " + base64.b64encode(f"postmark:{SECRET}".encode()).decode()
    by_basic = await client.post(HOOK, json=body, headers={"authorization": basic})
    assert by_basic.status_code == 200


async def test_without_a_configured_secret_only_an_admin_key_opens_the_intake(
    settings: Settings, db: Database
) -> None:
    """design.md lists the intake as authenticated next to the admin API: its keys work."""
    app = create_app(settings.model_copy(update={"bounce_webhook_secret": ""}))
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    read = await make_key(db, "read", name="reader")
    body = {"type": "bounce", "email": "target@example.com"}
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            await sign_up(http, "target@example.com", "weekly")
            for params in ({}, {"token": ""}):
                answer = await http.post(HOOK, json=body, params=params)
                assert answer.status_code == 401
                assert answer.headers["content-type"] == "application/problem+json"
            # An admin key in the query would land in access logs: only the header counts.
            key = admin["authorization"].removeprefix("Bearer ")
            by_query = await http.post(HOOK, json=body, params={"token": key})
            assert by_query.status_code == 401
            assert (await http.post(HOOK, json=body, headers=read)).status_code == 403
            assert statuses(await person(http, admin, "target@example.com")) == {"weekly": "active"}
            answer = await http.post(HOOK, json=body, headers=admin)
            assert answer.status_code == 200, answer.text
            assert answer.json()["hard_bounces"] == 1
            assert statuses(await person(http, admin, "target@example.com")) == {
                "weekly": "bounced"
            }
    finally:
        await app.state.signups.stop()
        await app.state.db.dispose()


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"not json", 400, None),
        (b"\xff\xfe", 400, None),
        (b"[[[[", 400, None),
        (b"[" * 20_000 + b"]" * 20_000, 400, None),  # refused before it is parsed
        (b'"bounce"', 422, "body"),
        (b"{}", 422, "type"),
        (b'{"hello": "world"}', 422, "type"),
        (b'{"type": "delivery", "email": "a@example.com"}', 422, "type"),
        (b'{"type": "bounce"}', 422, "email"),
        (b'{"type": "bounce", "email": 42}', 422, "email"),
        (b'{"type": "bounce", "email": "not-an-address"}', 422, "email"),
        (b'{"type": "bounce", "email": "a@example.com", "bounce_type": "x"}', 422, "bounce_type"),
        (b'[{"type": "complaint", "email": "a@example.com"}, 7]', 422, "1.body"),
        (b'{"Type": "Notification", "Message": "not json"}', 422, "Message"),
        (b'{"Type": "Notification", "Message": "[1]"}', 422, "Message"),
        (b'{"Type": "Notification", "Message": "' + b"[" * 20_000 + b'"}', 422, "Message"),
        (b'{"Type": "Notification"}', 422, "Message"),
        (b'{"Type": "SubscriptionConfirmation"}', 422, "SubscribeURL"),
        (b'{"notificationType": "Bounce"}', 422, "bounce"),
        (b'{"notificationType": "Bounce", "bounce": {"bouncedRecipients": "x"}}', 422, None),
        (
            b'{"notificationType": "Complaint", "complaint": {"complainedRecipients": [1]}}',
            422,
            None,
        ),
        (b'{"RecordType": "Bounce", "Type": "HardBounce"}', 422, "Email"),
        (b'{"RecordType": "Bounce", "Type": "HardBounce", "Email": null}', 422, "Email"),
    ],
)
async def test_a_malformed_body_is_a_problem_never_a_500(
    client: httpx.AsyncClient, db: Database, body: bytes, status: int, field: str | None
) -> None:
    answer = await client.post(
        HOOK, content=body, headers={**AUTH, "content-type": "application/json"}
    )
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    if field is not None:
        assert answer.json()["errors"][0]["field"] == field


async def test_an_oversized_body_is_413(client: httpx.AsyncClient, db: Database) -> None:
    body = json.dumps([{"type": "bounce", "email": "a@example.com", "reason": "x" * 1000}] * 1100)
    answer = await client.post(HOOK, content=body, headers=AUTH)
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/problem+json"


async def test_a_rejected_body_changes_nothing(client: httpx.AsyncClient, db: Database) -> None:
    admin = await make_key(db)
    await make_newsletter(db, "weekly", opt_in="single")
    await sign_up(client, "first@example.com", "weekly")
    # The first report is fine, the second is not: the whole body is refused.
    answer = await client.post(
        HOOK,
        json=[{"type": "bounce", "email": "first@example.com"}, {"type": "bounce"}],
        headers=AUTH,
    )
    assert answer.status_code == 422
    assert statuses(await person(client, admin, "first@example.com")) == {"weekly": "active"}


async def test_a_bounced_address_is_not_reactivated_by_a_single_opt_in_signup(
    client: httpx.AsyncClient,
    db: Database,
    worker: DeliveryWorker,
    smtp: SMTPServer,
) -> None:
    from service.suppression import suppress

    await make_newsletter(db, "daily", opt_in="single")
    async with db.transaction() as session:
        await suppress(session, "gone@example.com", "bounced")
    answer = await client.post(
        "/v1/subscriptions", json={"email": "gone@example.com", "newsletters": ["daily"]}
    )
    assert answer.status_code == 200  # answered like everyone else
    await deliver(worker)
    assert smtp.sink.received == []
    async with db.transaction() as session:
        assert await session.scalar(text("SELECT count(*) FROM subscriptions")) == 0


async def test_ops_cannot_reactivate_a_bounced_address(
    client: httpx.AsyncClient, db: Database
) -> None:
    """A suppressed address "may not be mailed": PUT .../subscriptions/{slug} active brought
    a hard-bounced one back to active. It is a 422 naming the suppression; unsubscribing
    still works."""
    admin = await make_key(db)
    await two_lists(db, client, "gone@example.com")
    answer = await client.post(
        HOOK,
        json=[{"type": "bounce", "email": "gone@example.com", "bounce_type": "hard"}],
        headers=AUTH,
    )
    assert answer.status_code == 200, answer.text
    detail = await person(client, admin, "gone@example.com")
    assert statuses(detail) == {"weekly": "bounced", "daily": "bounced"}
    url = f"/v1/admin/subscribers/{detail['id']}/subscriptions"
    for slug in ("weekly", "daily"):
        refused = await client.put(f"{url}/{slug}", json={"status": "active"}, headers=admin)
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["code"] == "suppressed"
    await make_newsletter(db, "monthly")
    refused = await client.put(f"{url}/monthly", json={"status": "active"}, headers=admin)
    assert refused.status_code == 422
    assert statuses(await person(client, admin, "gone@example.com")) == {
        "weekly": "bounced",
        "daily": "bounced",
    }
    left = await client.put(f"{url}/weekly", json={"status": "unsubscribed"}, headers=admin)
    assert left.status_code == 200, left.text
