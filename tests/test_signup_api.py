"""The public sign-up and confirmation API, as a front-end sees it (design: "Public HTTP API")."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, Response
from sqlalchemy import func, select, update

from service.api.routes import DirectRoute
from service.app import create_app
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Confirmation, Newsletter, OutboxMessage, Subscriber, Subscription, utcnow
from service.tokens import manage_token
from tests.conftest import SMTPServer, deliver, make_newsletter

THANKS = "Thank you for signing up for this newsletter. We've sent you a confirmation email."
PENDING = {"status": "pending", "message": THANKS}
ACTIVE = {"status": "active", "message": "Successfully subscribed"}
INVALID_EMAIL = "Please, enter correct email address"
REQUIRED = "This field is required."
PROBLEM_JSON = "application/problem+json"
FORM = "application/x-www-form-urlencoded"


# ---------------------------------------------------------------- helpers


def link(text: str, path: str) -> str:
    """The path of the first absolute /{path}/... link in a mail part."""
    found = re.search(rf"http://testserver(/{path}/[^\s\"<>]+)", text)
    assert found, f"no /{path}/ link in {text!r}"
    return found.group(1)


def multipart(fields: list[tuple[str, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body of plain fields (httpx only sends multipart with files)."""
    boundary = "test-boundary-5c1e0a9f"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields
    ]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def signup(
    client: httpx.AsyncClient, email: str, *slugs: str, **extra: Any
) -> httpx.Response:
    return await client.post(
        "/v1/subscriptions", json={"email": email, "newsletters": list(slugs), **extra}
    )


def problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    """Check an RFC 9457 answer and return its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].split(";")[0] == PROBLEM_JSON
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    assert body["title"]
    return body


def field_errors(answer: httpx.Response) -> dict[str, dict[str, str]]:
    body = problem(answer, 422)
    return {error["field"]: error for error in body["errors"]}


async def subscribers(client: httpx.AsyncClient, db: Database) -> list[dict[str, Any]]:
    """Everyone the admin API knows of, as ops would see them."""
    from service.keys import create_key

    async with db.transaction() as session:
        key = (await create_key(session, "contract-tests", "read")).key
    answer = await client.get("/v1/admin/subscribers", headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def statuses(client: httpx.AsyncClient, db: Database) -> dict[str, dict[str, str]]:
    """{email: {newsletter slug: status}} from the admin API."""
    return {
        item["email"]: {s["newsletter"]: s["status"] for s in item["subscriptions"]}
        for item in await subscribers(client, db)
    }


async def count(db: Database, model: Any) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def set_newsletter(db: Database, slug: str, **values: Any) -> None:
    async with db.transaction() as session:
        await session.execute(update(Newsletter).where(Newsletter.slug == slug).values(**values))


async def expire_confirmations(db: Database) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(Confirmation).values(expires_at=utcnow() - timedelta(seconds=1))
        )


@dataclass
class OtherApp:
    client: httpx.AsyncClient
    worker: DeliveryWorker
    settings: Settings


@asynccontextmanager
async def app_with(settings: Settings, **changes: Any) -> AsyncIterator[OtherApp]:
    """The service built with other settings, on the same (already emptied) database."""
    changed = settings.model_copy(update=changes)
    application: FastAPI = create_app(changed)
    transport = httpx.ASGITransport(app=application, client=("203.0.113.7", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield OtherApp(http, DeliveryWorker(application.state.db, changed), changed)
    finally:
        signups = getattr(application.state, "signups", None)
        if signups is not None:
            await signups.stop()
        await application.state.db.dispose()


async def confirm_by_mail(
    client: httpx.AsyncClient, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    """Deliver what is queued and press the confirmation link of the latest mail."""
    await deliver(worker)
    path = link(smtp.sink.received[-1].text(), "confirm")
    assert (await client.post(path)).status_code == 200


# ---------------------------------------------------------------- accepted sign-ups


async def test_json_signup_is_pending_and_sends_one_confirmation_mail(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")

    answer = await signup(client, "reader@example.com", "weekly")

    assert answer.status_code == 202
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == PENDING
    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    assert mail.rcpt_tos == ["reader@example.com"]
    assert "/confirm/" in mail.text()
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "pending"}}


async def test_urlencoded_signup_with_repeated_newsletters_covers_each(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")

    answer = await client.post(
        "/v1/subscriptions",
        content="email=reader%40example.com&newsletters=weekly&newsletters=daily",
        headers={"content-type": FORM},
    )

    assert answer.status_code == 202
    assert answer.json() == PENDING
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "pending", "daily": "pending"}
    }
    assert await deliver(worker) == 1


async def test_multipart_signup_with_repeated_newsletters_covers_each(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    body, content_type = multipart(
        [("email", "reader@example.com"), ("newsletters", "weekly"), ("newsletters", "daily")]
    )

    answer = await client.post(
        "/v1/subscriptions", content=body, headers={"content-type": content_type}
    )

    assert answer.status_code == 202
    assert answer.json() == PENDING
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "pending", "daily": "pending"}
    }
    assert await deliver(worker) == 1


async def test_single_opt_in_signup_is_active_at_once_with_a_welcome_mail_only(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "news", name="Product News", opt_in="single")
    await make_newsletter(db, "tips", name="Tips", opt_in="single")

    answer = await signup(client, "reader@example.com", "news", "tips")

    assert answer.status_code == 200
    assert answer.json() == ACTIVE
    assert await statuses(client, db) == {
        "reader@example.com": {"news": "active", "tips": "active"}
    }
    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    assert "Welcome" in mail.message["Subject"]
    assert "/confirm/" not in mail.text() and "/confirm/" not in mail.html()
    assert mail.message["List-Unsubscribe"]


async def test_mixed_single_and_double_opt_in_signup_answers_pending(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "news", opt_in="single")
    await make_newsletter(db, "weekly")

    answer = await signup(client, "reader@example.com", "news", "weekly")

    assert answer.status_code == 202
    assert answer.json() == PENDING
    assert await statuses(client, db) == {
        "reader@example.com": {"news": "active", "weekly": "pending"}
    }


async def test_a_bare_string_is_accepted_for_one_newsletter_in_json(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    answer = await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": "weekly"}
    )

    assert answer.status_code == 202
    assert answer.json() == PENDING


# ---------------------------------------------------------------- field errors


@pytest.mark.parametrize(
    "address", ["not-an-email", "reader@", "reader@@example.com", "reader@example..com"]
)
async def test_invalid_address_is_a_field_error_in_the_sites_words(
    client: httpx.AsyncClient, db: Database, address: str
) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(client, address, "weekly")

    body = problem(answer, 422)
    assert body["title"] == INVALID_EMAIL
    [error] = body["errors"]
    assert error["field"] == "email"
    assert error["code"] == "invalid_email"
    assert error["message"] == INVALID_EMAIL
    assert isinstance(error["detail"], str) and error["detail"].strip()
    assert await count(db, Subscriber) == 0


async def test_invalid_address_in_a_form_post_is_a_problem_json_field_error(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    answer = await client.post(
        "/v1/subscriptions", data={"email": "nobody", "newsletters": "weekly"}
    )

    assert field_errors(answer)["email"]["code"] == "invalid_email"


@pytest.mark.parametrize(
    "body",
    [
        {"newsletters": ["weekly"]},
        {"email": "", "newsletters": ["weekly"]},
        {"email": "   ", "newsletters": ["weekly"]},
        {"email": None, "newsletters": ["weekly"]},
    ],
    ids=["absent", "empty", "blank", "null"],
)
async def test_missing_email_is_required(
    client: httpx.AsyncClient, db: Database, body: dict[str, Any]
) -> None:
    await make_newsletter(db, "weekly")

    answer = await client.post("/v1/subscriptions", json=body)

    errors = field_errors(answer)
    assert answer.json()["title"] == REQUIRED
    assert errors == {"email": {"field": "email", "code": "required", "message": REQUIRED}}


@pytest.mark.parametrize(
    "body",
    [
        {"email": "reader@example.com"},
        {"email": "reader@example.com", "newsletters": []},
        {"email": "reader@example.com", "newsletters": [" "]},
        {"email": "reader@example.com", "newsletters": ""},
    ],
    ids=["absent", "empty-list", "blank-slug", "empty-string"],
)
async def test_missing_newsletters_is_required(
    client: httpx.AsyncClient, db: Database, body: dict[str, Any]
) -> None:
    await make_newsletter(db, "weekly")

    answer = await client.post("/v1/subscriptions", json=body)

    errors = field_errors(answer)
    assert errors == {
        "newsletters": {"field": "newsletters", "code": "required", "message": REQUIRED}
    }


async def test_every_field_error_is_reported_at_once(
    client: httpx.AsyncClient, db: Database
) -> None:
    answer = await client.post("/v1/subscriptions", data={"name": "x" * 201})

    errors = field_errors(answer)
    assert errors["email"]["code"] == "required"
    assert errors["newsletters"]["code"] == "required"
    assert errors["name"]["code"] == "too_long"


async def test_unknown_newsletter_is_a_field_error(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(client, "reader@example.com", "weekly", "no-such-list")

    errors = field_errors(answer)
    assert errors["newsletters"]["code"] == "unknown_newsletter"
    assert "no-such-list" in errors["newsletters"]["message"]
    assert await count(db, Subscriber) == 0


async def test_archived_newsletter_is_a_field_error(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    await set_newsletter(db, "weekly", archived_at=utcnow())

    answer = await signup(client, "reader@example.com", "weekly")

    assert field_errors(answer)["newsletters"]["code"] == "unknown_newsletter"
    assert await count(db, Subscriber) == 0


@pytest.mark.parametrize("slug", ["week\u0000ly", "Weekly", "x" * 5000, "../weekly", "week ly"])
async def test_slug_no_newsletter_can_have_is_unknown(
    client: httpx.AsyncClient, db: Database, slug: str
) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(client, "reader@example.com", slug)

    assert field_errors(answer)["newsletters"]["code"] == "unknown_newsletter"


@pytest.mark.parametrize(
    ("newsletters", "code"), [([1, 2], "invalid"), ({"weekly": True}, "invalid")]
)
async def test_newsletters_must_be_a_list_of_slugs(
    client: httpx.AsyncClient, db: Database, newsletters: Any, code: str
) -> None:
    await make_newsletter(db, "weekly")

    answer = await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": newsletters}
    )

    assert field_errors(answer)["newsletters"]["code"] == code


async def test_more_newsletters_than_allowed_in_one_signup_is_a_field_error(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    slugs = ["weekly"] + [f"list-{i}" for i in range(settings.max_newsletters_per_signup)]

    answer = await signup(client, "reader@example.com", *slugs)

    assert field_errors(answer)["newsletters"]["code"] == "too_many"


@pytest.mark.parametrize(
    "attributes",
    [["plan", "free"], "plan=free", 42, True],
    ids=["list", "string", "number", "bool"],
)
async def test_attributes_must_be_a_json_object(
    client: httpx.AsyncClient, db: Database, attributes: Any
) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(client, "reader@example.com", "weekly", attributes=attributes)

    assert field_errors(answer)["attributes"]["code"] == "invalid"
    assert await count(db, Subscriber) == 0


async def test_attributes_in_a_form_body_are_not_an_object(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    answer = await client.post(
        "/v1/subscriptions",
        data={"email": "reader@example.com", "newsletters": "weekly", "attributes": '{"a": 1}'},
    )

    assert field_errors(answer)["attributes"]["code"] == "invalid"


async def test_attributes_over_the_size_bound_are_too_large(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    big = {"notes": "x" * settings.max_attributes_bytes}

    answer = await signup(client, "reader@example.com", "weekly", attributes=big)

    assert field_errors(answer)["attributes"]["code"] == "too_large"
    assert await count(db, Subscriber) == 0


async def test_small_attributes_are_accepted(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(
        client, "reader@example.com", "weekly", attributes={"plan": "free", "tags": ["a", "b"]}
    )

    assert answer.status_code == 202
    assert answer.json() == PENDING


async def test_deeply_nested_attributes_are_a_field_error_not_a_crash(
    client: httpx.AsyncClient, db: Database
) -> None:
    """A few hundred bytes of nesting that the JSON decoder accepts but the encoder cannot store."""
    await make_newsletter(db, "weekly")
    for depth in (20, 900, 915, 925):
        nested = "[" * depth + "]" * depth
        body = '{"email": "reader@example.com", "newsletters": ["weekly"], "attributes": {"x": %s}}'
        answer = await client.post(
            "/v1/subscriptions",
            content=body % nested,
            headers={"content-type": "application/json"},
        )
        assert answer.status_code in (400, 422), (depth, answer.text)
        assert answer.headers["content-type"].split(";")[0] == PROBLEM_JSON
    assert await count(db, Subscriber) == 0


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity"])
async def test_attributes_that_are_not_finite_numbers_are_a_field_error(
    client: httpx.AsyncClient, db: Database, number: str
) -> None:
    await make_newsletter(db, "weekly")
    body = '{"email": "reader@example.com", "newsletters": ["weekly"], "attributes": {"x": %s}}'

    answer = await client.post(
        "/v1/subscriptions", content=body % number, headers={"content-type": "application/json"}
    )

    assert field_errors(answer)["attributes"]["code"] == "invalid"
    assert await count(db, Subscriber) == 0


async def test_name_longer_than_200_characters_is_too_long(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    too_long = await signup(client, "reader@example.com", "weekly", name="n" * 201)
    just_right = await signup(client, "reader@example.com", "weekly", name="n" * 200)

    assert field_errors(too_long)["name"]["code"] == "too_long"
    assert just_right.status_code == 202


async def test_name_that_is_not_text_is_invalid(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(client, "reader@example.com", "weekly", name={"first": "Ada"})

    assert field_errors(answer)["name"]["code"] == "invalid"


async def test_name_is_stored_as_plain_text_without_control_characters(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(
        client, "reader@example.com", "weekly", name="Ada\r\nBcc: victim@example.com"
    )

    assert answer.status_code == 202
    [item] = await subscribers(client, db)
    assert item["name"] == "AdaBcc: victim@example.com"


async def test_language_that_is_not_a_tag_is_invalid(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(client, "reader@example.com", "weekly", language="en; DROP")

    assert field_errors(answer)["language"]["code"] == "invalid"


# ---------------------------------------------------------------- unreadable bodies


async def test_body_over_the_limit_is_413(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    padding = "x" * (settings.max_body_bytes + 1)

    answer = await signup(client, "reader@example.com", "weekly", name=padding)

    problem(answer, 413)
    assert await count(db, Subscriber) == 0


async def test_streamed_body_over_the_limit_is_413_without_content_length(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"email": "reader@example.com", "newsletters": ["weekly"], "name": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}'

    async with app_with(settings, max_body_bytes=1024) as other:
        answer = await other.client.post(
            "/v1/subscriptions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in answer.request.headers
        problem(answer, 413)
        small = await signup(other.client, "reader@example.com", "weekly")
        assert small.status_code == 202
    assert await count(db, Subscriber) == 1


async def test_form_body_over_the_limit_is_413(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    body, content_type = multipart(
        [("email", "reader@example.com"), ("newsletters", "weekly"), ("name", "x" * 70_000)]
    )

    answer = await client.post(
        "/v1/subscriptions", content=body, headers={"content-type": content_type}
    )

    problem(answer, 413)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", None])
async def test_other_content_types_are_415(
    client: httpx.AsyncClient, db: Database, content_type: str | None
) -> None:
    await make_newsletter(db, "weekly")
    headers = {"content-type": content_type} if content_type else {}

    answer = await client.post(
        "/v1/subscriptions",
        content=b'{"email": "reader@example.com", "newsletters": ["weekly"]}',
        headers=headers,
    )

    problem(answer, 415)
    assert await count(db, Subscriber) == 0


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"email": "reader@example.com", "newsletters": ["weekly"]', "application/json"),
        (b"", "application/json"),
        (b'["reader@example.com", "weekly"]', "application/json"),
        (b'"reader@example.com"', "application/json"),
        (b"null", "application/json"),
        (b'{"email": "\xff\xfe@example.com", "newsletters": ["weekly"]}', "application/json"),
        (b"email=\xff\xfe%40example.com&newsletters=weekly", FORM),
        (
            b'--b\r\nContent-Disposition: form-data; name="email"\r\n\r\n'
            b"\xff\xfe@example.com\r\n"
            b'--b\r\nContent-Disposition: form-data; name="newsletters"\r\n\r\nweekly\r\n'
            b"--b--\r\n",
            "multipart/form-data; boundary=b",
        ),
        (b"--nope\r\nthis is not multipart", "multipart/form-data; boundary=other"),
        (b'{"email": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "application/json"),
    ],
    ids=[
        "truncated-json",
        "empty-json",
        "json-array",
        "json-string",
        "json-null",
        "json-invalid-utf8",
        "form-invalid-utf8",
        "multipart-invalid-utf8",
        "broken-multipart",
        "json-nested-30000",
    ],
)
async def test_unreadable_body_is_400(
    client: httpx.AsyncClient, db: Database, content: bytes, content_type: str
) -> None:
    await make_newsletter(db, "weekly")

    answer = await client.post(
        "/v1/subscriptions", content=content, headers={"content-type": content_type}
    )

    problem(answer, 400)
    assert await count(db, Subscriber) == 0


async def test_json_nested_100000_deep_is_400(db: Database, settings: Settings) -> None:
    await make_newsletter(db, "weekly")
    nested = b"[" * 100_000 + b"]" * 100_000

    async with app_with(settings, max_body_bytes=1024 * 1024) as other:
        answer = await other.client.post(
            "/v1/subscriptions", content=nested, headers={"content-type": "application/json"}
        )
        inside = await other.client.post(
            "/v1/subscriptions",
            content=b'{"email": "reader@example.com", "newsletters": ["weekly"], "name": '
            + nested
            + b"}",
            headers={"content-type": "application/json"},
        )

    problem(answer, 400)
    problem(inside, 400)
    assert await count(db, Subscriber) == 0


# ---------------------------------------------------------------- enumeration


async def test_answer_is_the_same_for_new_pending_active_and_unsubscribed_addresses(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")

    new = await signup(client, "reader@example.com", "weekly")
    pending = await signup(client, "reader@example.com", "weekly")
    await confirm_by_mail(client, smtp, worker)
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}
    active = await signup(client, "reader@example.com", "weekly")
    [item] = await subscribers(client, db)
    token = manage_token(settings.secret_keys, item["id"])
    assert (await client.post(f"/unsubscribe/{token}")).status_code == 200
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "unsubscribed"}}
    unsubscribed = await signup(client, "reader@example.com", "weekly")

    answers = [new, pending, active, unsubscribed]
    assert [a.status_code for a in answers] == [202] * 4
    assert [a.json() for a in answers] == [PENDING] * 4
    assert len({a.content for a in answers}) == 1
    assert len({a.headers.get("content-type") for a in answers}) == 1
    # The one who had unsubscribed is asked to confirm again, not silently re-added.
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "pending"}}


async def test_single_opt_in_answer_is_the_same_for_new_and_active_addresses(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "news", opt_in="single")

    new = await signup(client, "reader@example.com", "news")
    active = await signup(client, "reader@example.com", "news")

    assert new.status_code == active.status_code == 200
    assert new.json() == active.json() == ACTIVE


# ---------------------------------------------------------------- honeypot


@pytest.mark.parametrize("encoding", ["json", "form"])
async def test_filled_honeypot_answers_success_and_stores_and_sends_nothing(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    encoding: str,
) -> None:
    await make_newsletter(db, "weekly")
    fields = {
        "email": "victim@example.com",
        "newsletters": ["weekly"],
        "website": "http://spam.example",
    }

    if encoding == "json":
        answer = await client.post("/v1/subscriptions", json=fields)
    else:
        answer = await client.post("/v1/subscriptions", data=fields)

    assert answer.status_code == 202
    assert answer.json() == PENDING
    assert await subscribers(client, db) == []
    assert await count(db, Subscriber) == 0
    assert await count(db, Subscription) == 0
    assert await count(db, OutboxMessage) == 0
    assert await deliver(worker) == 0
    assert smtp.sink.received == []


async def test_filled_honeypot_on_single_opt_in_looks_like_a_real_subscription(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "news", opt_in="single")

    answer = await signup(client, "victim@example.com", "news", website="x")

    assert answer.status_code == 200
    assert answer.json() == ACTIVE
    assert await count(db, Subscriber) == 0
    assert await deliver(worker) == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "not an address", "newsletters": ["weekly"]},
        {"email": "victim@example.com", "newsletters": ["no-such-list"]},
        {"newsletters": ["weekly"]},
        {"email": "victim@example.com"},
        {"email": "victim@example.com", "newsletters": ["weekly"], "language": "<x>"},
    ],
    ids=["bad-address", "unknown-newsletter", "no-address", "no-newsletter", "bad-language"],
)
async def test_filled_honeypot_with_field_errors_still_answers_success(
    client: httpx.AsyncClient, db: Database, fields: dict[str, Any]
) -> None:
    """A bot that filled the honeypot hears the success a person would, whatever else it got
    wrong: field errors would tell it what to fix. A browser form gets the thank-you page."""
    await make_newsletter(db, "weekly")
    answer = await client.post("/v1/subscriptions", json={**fields, "website": "x"})
    assert answer.status_code == 202, answer.text
    assert answer.json() == PENDING
    page = await client.post(
        "/v1/subscriptions", data={**fields, "website": "x"}, headers={"accept": "text/html"}
    )
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "We've sent you a confirmation email." in html.unescape(page.text)
    assert await count(db, Subscriber) == 0
    # The same body without the honeypot is a field error.
    refused = await client.post("/v1/subscriptions", json=fields)
    assert refused.status_code == 422


async def test_empty_honeypot_is_a_normal_signup(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(client, "reader@example.com", "weekly", website="")

    assert answer.status_code == 202
    assert await count(db, Subscriber) == 1


# ---------------------------------------------------------------- the confirmation mail


async def test_one_confirmation_mail_lists_every_newsletter_and_one_link_activates_all(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")

    answer = await signup(client, "reader@example.com", "weekly", "daily")

    assert answer.status_code == 202
    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    for part in (mail.text(), mail.html()):
        assert "The Weekly" in part and "The Daily" in part
    assert len(set(re.findall(r"/confirm/[\w-]+", mail.text()))) == 1
    path = link(mail.text(), "confirm")
    assert path == link(mail.html(), "confirm")

    confirmed = await client.post(f"/v1/confirmations/{path.removeprefix('/confirm/')}")

    assert confirmed.status_code == 200
    assert confirmed.json()["status"] == "active"
    assert sorted(confirmed.json()["newsletters"]) == ["daily", "weekly"]
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "active", "daily": "active"}
    }


@pytest.mark.parametrize(
    "name", ["Click http://evil.example now", "<script>alert(1)</script>"], ids=["url", "script"]
)
async def test_confirmation_mail_never_repeats_the_supplied_name(
    client: httpx.AsyncClient,
    db: Database,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    name: str,
) -> None:
    await make_newsletter(db, "weekly")

    answer = await signup(
        client, "victim@example.com", "weekly", name=name, attributes={"note": name}
    )

    assert answer.status_code == 202
    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    raw = mail.message.as_string()
    for part in (mail.text(), mail.html(), raw):
        for fragment in ("evil.example", "Click http", "<script", "&lt;script", "alert(1)"):
            assert fragment not in part
    assert "/confirm/" in mail.text()


async def test_second_signup_right_away_sends_no_second_mail(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")

    first = await signup(client, "reader@example.com", "weekly")
    await deliver(worker)
    second = await signup(client, "reader@example.com", "weekly")
    third = await signup(client, "READER@example.com", "weekly")

    assert [first.status_code, second.status_code, third.status_code] == [202, 202, 202]
    assert first.json() == second.json() == third.json() == PENDING
    assert await deliver(worker) == 0
    assert len(smtp.sink.received) == 1
    # The link already sent still works.
    assert (await client.post(link(smtp.sink.received[0].text(), "confirm"))).status_code == 200
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}


async def test_active_reader_signing_up_again_gets_already_subscribed_mail_up_to_the_daily_cap(
    db: Database, settings: Settings, smtp: SMTPServer
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    async with app_with(settings, confirmation_mail_interval=timedelta(0)) as other:
        assert (await signup(other.client, "reader@example.com", "weekly")).status_code == 202
        await confirm_by_mail(other.client, smtp, other.worker)
        assert await deliver(other.worker) == 1  # the welcome mail
        smtp.sink.received.clear()

        again = await signup(other.client, "reader@example.com", "weekly")

        assert again.status_code == 202
        assert again.json() == PENDING
        assert await deliver(other.worker) == 1
        [mail] = smtp.sink.received
        assert mail.rcpt_tos == ["reader@example.com"]
        assert "already subscribed" in mail.message["Subject"]
        assert "/confirm/" not in mail.text()
        manage = link(mail.text(), "manage")
        assert manage == link(mail.html(), "manage")
        page = await other.client.get(manage)
        assert page.status_code == 200
        assert "The Weekly" in page.text

        for _ in range(6):
            answer = await signup(other.client, "reader@example.com", "weekly")
            assert answer.status_code == 202
            assert answer.json() == PENDING
        await deliver(other.worker)

    # Five capped mails a day: the confirmation and four "already subscribed".
    subjects = [m.message["Subject"] for m in smtp.sink.received]
    assert len(subjects) == 4
    assert all("already subscribed" in s for s in subjects)


async def test_the_daily_cap_also_stops_fresh_confirmation_mails(
    db: Database, settings: Settings, smtp: SMTPServer
) -> None:
    await make_newsletter(db, "weekly")
    async with app_with(settings, confirmation_mail_interval=timedelta(0)) as other:
        for _ in range(8):
            answer = await signup(other.client, "reader@example.com", "weekly")
            assert answer.status_code == 202
            assert answer.json() == PENDING
        await deliver(other.worker)

    assert len(smtp.sink.received) == 5
    assert all("/confirm/" in m.text() for m in smtp.sink.received)


async def test_addresses_differing_only_in_case_are_one_subscriber(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")

    first = await signup(client, "Reader@Example.com", "weekly")
    second = await signup(client, "reader@example.COM", "daily")

    assert first.status_code == second.status_code == 202
    [item] = await subscribers(client, db)
    assert item["email"].lower() == "reader@example.com"
    assert {s["newsletter"]: s["status"] for s in item["subscriptions"]} == {
        "weekly": "pending",
        "daily": "pending",
    }
    assert await count(db, Subscriber) == 1


# ---------------------------------------------------------------- confirmation links


async def test_confirmation_api_activates_and_answers_the_newsletters(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await signup(client, "reader@example.com", "weekly")
    await deliver(worker)
    token = link(smtp.sink.received[0].text(), "confirm").removeprefix("/confirm/")

    answer = await client.post(f"/v1/confirmations/{token}")
    again = await client.post(f"/v1/confirmations/{token}")

    assert answer.status_code == 200
    assert answer.json() == {"status": "active", "newsletters": ["weekly"]}
    assert again.status_code == 200
    assert again.json() == {"status": "active", "newsletters": ["weekly"]}
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}
    assert await deliver(worker) == 1
    assert "Welcome" in smtp.sink.received[-1].message["Subject"]


async def test_expired_token_answers_410_and_changes_nothing(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await signup(client, "reader@example.com", "weekly")
    await deliver(worker)
    path = link(smtp.sink.received[0].text(), "confirm")
    token = path.removeprefix("/confirm/")
    await expire_confirmations(db)

    page = await client.get(path)
    api = await client.post(f"/v1/confirmations/{token}")
    posted = await client.post(path)

    assert page.status_code == 410
    assert page.headers["content-type"].startswith("text/html")
    assert f'action="/confirm/{token}/resend"' in page.text
    assert 'method="post"' in page.text
    problem(api, 410)
    assert posted.status_code == 410
    assert f'action="/confirm/{token}/resend"' in posted.text
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "pending"}}


async def test_expired_link_page_sends_a_new_link_that_works(
    db: Database, settings: Settings, smtp: SMTPServer
) -> None:
    await make_newsletter(db, "weekly")
    async with app_with(
        settings, confirmation_ttl=timedelta(seconds=0), confirmation_mail_interval=timedelta(0)
    ) as other:
        await signup(other.client, "reader@example.com", "weekly")
        await deliver(other.worker)
        old = link(smtp.sink.received[0].text(), "confirm")
        expired = await other.client.get(old)
        assert expired.status_code == 410
        resend = re.search(r'action="(/confirm/[^"]+/resend)"', expired.text)
        assert resend

        sent = await other.client.post(resend.group(1))

        assert sent.status_code == 200
        assert await deliver(other.worker) == 1
        new = link(smtp.sink.received[1].text(), "confirm")
        assert new != old
    # The new link expires at once too under these settings; with the normal ones it works.
    async with app_with(settings) as normal:
        async with db.transaction() as session:
            await session.execute(
                update(Confirmation).values(expires_at=utcnow() + timedelta(days=1))
            )
        confirmed = await normal.client.post(f"/v1/confirmations/{new.removeprefix('/confirm/')}")
        assert confirmed.status_code == 200
        assert confirmed.json() == {"status": "active", "newsletters": ["weekly"]}


async def test_unknown_token_answers_404(client: httpx.AsyncClient, db: Database) -> None:
    page = await client.get("/confirm/not-a-real-token")
    posted = await client.post("/confirm/not-a-real-token")
    api = await client.post("/v1/confirmations/not-a-real-token")
    long = await client.post("/v1/confirmations/" + "a" * 500)

    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "This link is not valid" in page.text
    assert posted.status_code == 404
    problem(api, 404)
    problem(long, 404)


async def test_confirm_page_get_changes_nothing(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await signup(client, "reader@example.com", "weekly")
    await deliver(worker)
    path = link(smtp.sink.received[0].text(), "confirm")

    page = await client.get(path)

    assert page.status_code == 200
    assert f'action="{path}"' in page.text
    assert "The Weekly" in page.text
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "pending"}}
    assert await deliver(worker) == 0


async def test_public_newsletters_lists_only_unarchived_ones(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly", description="Every Friday.")
    await make_newsletter(db, "news", name="News", opt_in="single")
    await make_newsletter(db, "old", name="Old")
    await set_newsletter(db, "old", archived_at=utcnow())

    answer = await client.get("/v1/newsletters")

    assert answer.status_code == 200
    assert answer.json() == [
        {
            "slug": "weekly",
            "name": "The Weekly",
            "description": "Every Friday.",
            "opt_in": "double",
        },
        {"slug": "news", "name": "News", "description": "", "opt_in": "single"},
    ]


# ---------------------------------------------------------------- the route itself


def test_signup_route_is_called_directly_and_still_documented(settings: Settings) -> None:
    app = create_app(settings)
    [route] = [r for r in app.routes if getattr(r, "path", "") == "/v1/subscriptions"]
    assert isinstance(route, DirectRoute)
    operation = app.openapi()["paths"]["/v1/subscriptions"]["post"]
    assert operation["summary"] == "Sign up to one or more newsletters"
    assert {"202", "422", "429"} <= set(operation["responses"])
    assert "example" in str(operation["requestBody"])


def test_direct_route_refuses_an_endpoint_with_parameters() -> None:
    async def with_query(request: Request, page: int = 1) -> Response:
        return Response()

    router = APIRouter()
    with pytest.raises(TypeError, match="takes only the Request"):
        router.add_api_route("/x", with_query, route_class_override=DirectRoute)
