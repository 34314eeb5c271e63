"""What design.md names, asserted as a client that has only read design.md would assert it.

Each test here was a place where the running service and the contract disagreed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Webhook
from service.observability import configure_logging
from tests.conftest import SMTPServer, deliver, make_newsletter
from tests.test_admin import make_key
from tests.test_cli import newsletter, ok

# ---------------------------------------------------------------- newsletters


async def test_newsletter_confirmation_ttl_is_the_contract_field(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: a newsletter has `confirmation_ttl` (default 7 days)."""
    admin = await make_key(db)
    plain = await client.post(
        "/v1/admin/newsletters", json={"slug": "plain", "name": "Plain"}, headers=admin
    )
    assert plain.status_code == 201, plain.text
    assert plain.json()["confirmation_ttl"] == 7 * 86400

    hourly = await client.post(
        "/v1/admin/newsletters",
        json={"slug": "hourly", "name": "Hourly", "confirmation_ttl": 3600},
        headers=admin,
    )
    assert hourly.status_code == 201, hourly.text
    assert hourly.json()["confirmation_ttl"] == 3600
    read = await client.get("/v1/admin/newsletters/hourly", headers=admin)
    assert read.json()["confirmation_ttl"] == 3600

    daily = await client.patch(
        "/v1/admin/newsletters/hourly", json={"confirmation_ttl": "P1D"}, headers=admin
    )
    assert daily.status_code == 200, daily.text
    assert daily.json()["confirmation_ttl"] == 86400
    back = await client.patch(
        "/v1/admin/newsletters/hourly", json={"confirmation_ttl": None}, headers=admin
    )
    assert back.json()["confirmation_ttl"] == 7 * 86400

    for wrong in (10, -5, "soon", 91 * 86400):
        refused = await client.patch(
            "/v1/admin/newsletters/hourly", json={"confirmation_ttl": wrong}, headers=admin
        )
        assert refused.status_code == 422, (wrong, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["errors"][0]["field"] == "confirmation_ttl"


async def test_a_newsletters_confirmation_ttl_bounds_its_confirmation_links(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    admin = await make_key(db)
    created = await client.post(
        "/v1/admin/newsletters",
        json={"slug": "brief", "name": "Brief", "confirmation_ttl": 60},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    signup = await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["brief"]}
    )
    assert signup.status_code == 202
    async with db.transaction() as session:
        made, expires = (
            await session.execute(text("SELECT created_at, expires_at FROM confirmations"))
        ).one()
    if isinstance(made, str):  # SQLite hands back its text
        made, expires = datetime.fromisoformat(made), datetime.fromisoformat(expires)
    assert timedelta(seconds=59) <= expires - made <= timedelta(seconds=61)


# ---------------------------------------------------------------- subscribers


async def test_subscriber_search_takes_a_created_range(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: search by `email` prefix, `newsletter`, `status`, created range."""
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    for address in ("old@example.com", "new@example.com"):
        answer = await client.post(
            "/v1/subscriptions", json={"email": address, "newsletters": ["weekly"]}
        )
        assert answer.status_code == 200
    async with db.transaction() as session:
        await session.execute(
            text("UPDATE subscribers SET created_at = :at WHERE email = 'old@example.com'"),
            {"at": datetime(2024, 1, 15, 12, tzinfo=UTC).replace(tzinfo=None)}
            if db.is_sqlite
            else {"at": datetime(2024, 1, 15, 12, tzinfo=UTC)},
        )

    async def found(**params: str) -> list[str]:
        answer = await client.get("/v1/admin/subscribers", params=params, headers=admin)
        assert answer.status_code == 200, answer.text
        return sorted(item["email"] for item in answer.json()["items"])

    assert await found() == ["new@example.com", "old@example.com"]
    assert await found(created_after="2025-01-01") == ["new@example.com"]
    assert await found(created_before="2025-01-01T00:00:00Z") == ["old@example.com"]
    assert await found(created_after="2024-01-15", created_before="2024-01-16") == [
        "old@example.com"
    ]
    assert await found(created_after="2024-01-15T12:00:01+00:00", created_before="2025-01-01") == []
    assert await found(email="old", created_after="2025-01-01") == []
    wrong = await client.get(
        "/v1/admin/subscribers", params={"created_after": "yesterday"}, headers=admin
    )
    assert wrong.status_code == 422
    assert wrong.json()["errors"][0]["field"] == "created_after"


# ---------------------------------------------------------------- hostile input


async def _reader_on_weekly(client: httpx.AsyncClient, db: Database) -> tuple[dict[str, str], str]:
    """An admin key, and the id of a reader added by it, active on single opt-in `weekly`."""
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    added = await client.post(
        "/v1/admin/subscribers",
        json={
            "email": "reader@example.com",
            "newsletters": ["weekly"],
            "status": "active",
            "consent_note": "asked in person",
        },
        headers=admin,
    )
    assert added.status_code == 201, added.text
    return admin, added.json()["id"]


async def test_nul_characters_in_admin_input_are_a_422_not_a_500(
    client: httpx.AsyncClient, db: Database
) -> None:
    """PostgreSQL refuses NUL in text: every admin input says so as a field error first."""
    admin, person = await _reader_on_weekly(client, db)
    requests = [
        ("GET", "/v1/admin/subscribers?email=%00", None),
        ("GET", "/v1/admin/subscribers?email=re%00", None),
        ("PUT", f"/v1/admin/subscribers/{person}/subscriptions/weekly",
         {"status": "unsubscribed", "consent_note": "asked\x00"}),
        ("PATCH", f"/v1/admin/subscribers/{person}", {"attributes": {"k\x00": "v"}}),
        ("POST", "/v1/admin/subscribers",
         {"email": "x@example.com", "newsletters": ["weekly"], "consent_note": "a\x00"}),
        ("POST", "/v1/admin/newsletters", {"slug": "nul", "name": "N\x00"}),
        ("PATCH", "/v1/admin/newsletters/weekly", {"description": "a\x00b"}),
        ("POST", "/v1/admin/webhooks",
         {"url": "https://hooks.example/", "event_types": ["subscription.confirmed"],
          "secret": "0123456789abcdef\x00"}),
        ("POST", "/v1/admin/blocklist", {"value": "spam.example", "note": "\x00"}),
    ]  # fmt: skip
    for method, url, body in requests:
        answer = await client.request(method, url, json=body, headers=admin)
        assert answer.status_code == 422, (method, url, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    after = await client.get(f"/v1/admin/subscribers/{person}", headers=admin)
    assert [s["status"] for s in after.json()["subscriptions"]] == ["active"]


async def test_admin_bodies_that_are_not_json_are_400_413_or_415(
    client: httpx.AsyncClient, db: Database
) -> None:
    """Malformed JSON, another content type and a huge body each get their own status, as on
    the sign-up endpoint, instead of a 422 about a "dictionary" or a body held in memory."""
    admin = await make_key(db)
    json_type = {**admin, "content-type": "application/json"}
    url = "/v1/admin/newsletters"

    malformed = await client.post(url, content=b'{"slug": "x",', headers=json_type)
    assert (malformed.status_code, malformed.json()["title"]) == (
        400,
        "The request body could not be read",
    )
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        other = await client.post(
            url, content=b"slug=x&name=y", headers={**admin, "content-type": content_type}
        )
        assert other.status_code == 415, (content_type, other.text)
        assert other.headers["content-type"] == "application/problem+json"
    suffixed = await client.post(
        url,
        content=b'{"slug": "fine", "name": "Fine"}',
        headers={**admin, "content-type": "application/merge-patch+json"},
    )
    assert suffixed.status_code == 201, suffixed.text

    huge = b'{"slug": "big", "name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    declared = await client.post(url, content=huge, headers=json_type)
    assert declared.status_code == 413
    assert declared.json()["title"] == "Request body too large"
    unauthenticated = await client.post(
        url, content=huge, headers={"content-type": "application/json"}
    )
    assert unauthenticated.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    streamed = await client.post(url, content=chunks(), headers=json_type)
    assert streamed.status_code == 413
    assert streamed.headers["content-type"] == "application/problem+json"
    assert (await client.get(url + "/big", headers=admin)).status_code == 404


async def test_the_same_thing_created_at_once_is_one_201_and_409s(
    client: httpx.AsyncClient, db: Database
) -> None:
    """Each request checks, finds nothing and inserts: the unique index keeps one, and the
    others are told 409 (PostgreSQL answered them 500)."""
    await make_newsletter(db, "weekly")
    admin = await make_key(db)
    creations = [
        ("/v1/admin/newsletters", {"slug": "twice", "name": "Twice"}),
        (
            "/v1/admin/subscribers",
            {
                "email": "twice@example.com",
                "newsletters": ["weekly"],
                "status": "active",
                "consent_note": "asked",
            },
        ),
        ("/v1/admin/blocklist", {"value": "twice.example"}),
    ]
    for url, body in creations:
        answers = await asyncio.gather(
            *(client.post(url, json=body, headers=admin) for _ in range(8))
        )
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [201] + [409] * 7, (url, statuses)
        assert all(
            a.headers["content-type"] == "application/problem+json"
            for a in answers
            if a.status_code == 409
        )


async def test_an_edit_racing_an_erasure_is_a_4xx(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    for round_ in range(5):
        address = f"gone{round_}@example.com"
        signup = await client.post(
            "/v1/subscriptions", json={"email": address, "newsletters": ["weekly"]}
        )
        assert signup.status_code == 200
        found = await client.get("/v1/admin/subscribers", params={"email": address}, headers=admin)
        person = f"/v1/admin/subscribers/{found.json()['items'][0]['id']}"
        answers = await asyncio.gather(
            client.delete(person, headers=admin),
            *(
                client.put(
                    f"{person}/subscriptions/weekly",
                    json={"status": "unsubscribed" if n % 2 else "active"},
                    headers=admin,
                )
                for n in range(6)
            ),
            *(client.patch(person, json={"name": f"N{n}"}, headers=admin) for n in range(3)),
        )
        assert {a.status_code for a in answers} <= {200, 204, 404, 409}, [
            (a.status_code, a.text[:80]) for a in answers
        ]
        assert (await client.get(person, headers=admin)).status_code == 404


async def test_erasing_one_person_at_once_twice_erases_once(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: erase is 204 and the event says who erased; a second erasure finds no one,
    even when both run at once (PostgreSQL answered every one 204, each with its event)."""
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    signup = await client.post(
        "/v1/subscriptions", json={"email": "twice@example.com", "newsletters": ["weekly"]}
    )
    assert signup.status_code == 200
    found = await client.get("/v1/admin/subscribers", headers=admin)
    person = f"/v1/admin/subscribers/{found.json()['items'][0]['id']}"
    answers = await asyncio.gather(*(client.delete(person, headers=admin) for _ in range(6)))
    assert sorted(a.status_code for a in answers) == [204] + [404] * 5
    feed = await client.get("/v1/admin/events", params={"type": "subscriber.erased"}, headers=admin)
    assert len(feed.json()["items"]) == 1


async def test_an_unexpected_error_is_still_problem_json(app: FastAPI) -> None:
    """design.md: errors are problem+json; a bug must not answer Starlette's text/plain."""

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/broken-for-test", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        answer = await http.get("/v1/broken-for-test")
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json() == {
        "type": "about:blank#internal_error",
        "title": "Internal Server Error",
        "status": 500,
    }
    assert "a bug" not in answer.text


async def test_a_multipart_sign_up_with_a_file_says_why_it_is_refused(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    answer = await client.post(
        "/v1/subscriptions",
        files={
            "email": (None, "reader@example.com"),
            "newsletters": (None, "weekly"),
            "cv": ("cv.txt", b"hello", "text/plain"),
        },
    )
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"] == "A sign-up takes text fields only, no files."


async def test_a_browser_form_post_too_big_or_unreadable_gets_a_page(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: a browser form post gets HTML; 413 for an oversized body."""
    await make_newsletter(db, "weekly")
    browser = {
        "accept": "text/html,application/xhtml+xml",
        "content-type": "application/x-www-form-urlencoded",
    }
    big = await client.post(
        "/v1/subscriptions",
        content=b"email=reader%40example.com&newsletters=weekly&name=" + b"x" * 100_000,
        headers=browser,
    )
    assert big.status_code == 413
    assert big.headers["content-type"].startswith("text/html")
    assert "Request body too large" in big.text and 'name="email"' in big.text
    unreadable = await client.post(
        "/v1/subscriptions", content=b"email=r%FF%40example.com&newsletters=weekly", headers=browser
    )
    assert unreadable.status_code == 400
    assert unreadable.headers["content-type"].startswith("text/html")
    assert "The request body could not be read" in unreadable.text
    script = await client.post(
        "/v1/subscriptions",
        content=b"email=reader%40example.com&newsletters=weekly&name=" + b"x" * 100_000,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert script.status_code == 413
    assert script.headers["content-type"] == "application/problem+json"


# ---------------------------------------------------------------- webhooks and blocklist


async def test_webhook_urls_the_client_cannot_call_are_refused(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    for url in ("http://a\x01b.example/", "http://hooks.example:99999/", "https://a b.example/"):
        answer = await client.post(
            "/v1/admin/webhooks",
            json={"url": url, "event_types": ["subscription.confirmed"]},
            headers=admin,
        )
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["errors"][0]["field"] == "url"


async def test_a_stored_webhook_url_that_cannot_be_called_does_not_hold_up_mail(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    """A row from before the stricter check: its calls fail alone, mail still goes out."""
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    async with db.transaction() as session:
        session.add(
            Webhook(
                url="http://hooks\x01.example/",  # httpx cannot even build the request
                event_types=["subscription.confirmed"],
                secret="whsec_test",
                active=True,
                created_at=datetime.now(UTC),
            )
        )
    signup = await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["weekly"]}
    )
    assert signup.status_code == 200
    await deliver(worker)
    assert [m.rcpt_tos for m in smtp.sink.received] == [["reader@example.com"]]
    [hook] = (await client.get("/v1/admin/webhooks", headers=admin)).json()["items"]
    log = await client.get(f"/v1/admin/webhooks/{hook['id']}/deliveries", headers=admin)
    attempts = log.json()["items"]
    assert attempts
    assert all(a["status_code"] is None and "InvalidURL" in a["error"] for a in attempts)


async def test_webhooks_take_events_as_the_list_of_event_types(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    created = await client.post(
        "/v1/admin/webhooks",
        json={"url": "https://hooks.example/in", "events": ["subscription.confirmed"]},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    assert created.json()["event_types"] == ["subscription.confirmed"]
    changed = await client.patch(
        f"/v1/admin/webhooks/{created.json()['id']}",
        json={"events": ["subscription.unsubscribed"]},
        headers=admin,
    )
    assert changed.json()["event_types"] == ["subscription.unsubscribed"]


async def test_every_admin_list_is_cursor_paginated(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: lists are cursor-paginated (`limit`, `cursor`, `next_cursor`)."""
    admin = await make_key(db)
    for n in range(3):
        await client.post(
            "/v1/admin/webhooks",
            json={"url": f"https://hooks.example/{n}", "event_types": ["subscription.confirmed"]},
            headers=admin,
        )
        await client.post("/v1/admin/blocklist", json={"value": f"spam{n}.example"}, headers=admin)
        await make_newsletter(db, f"list-{n}")
    for url in ("/v1/admin/webhooks", "/v1/admin/blocklist", "/v1/admin/newsletters"):
        seen: list[int | str] = []
        cursor: str | None = None
        while True:
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            page = await client.get(url, params=params, headers=admin)
            assert page.status_code == 200, (url, page.text)
            body = page.json()
            assert set(body) == {"items", "next_cursor"}
            assert len(body["items"]) <= 2
            seen += [item.get("id", item.get("slug")) for item in body["items"]]
            cursor = body["next_cursor"]
            if not cursor:
                break
        assert len(seen) == len(set(seen)) == 3, (url, seen)


async def test_setting_a_subscription_on_an_unknown_newsletter_is_404(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin, person = await _reader_on_weekly(client, db)
    answer = await client.put(
        f"/v1/admin/subscribers/{person}/subscriptions/nope",
        json={"status": "active"},
        headers=admin,
    )
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"


async def test_blocklist_is_crud_and_tells_addresses_from_domains(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: `/v1/admin/blocklist` CRUD, of addresses and domains."""
    await make_newsletter(db, "weekly")
    admin = await make_key(db)
    read = await make_key(db, "read", name="reader")
    domain = await client.post("/v1/admin/blocklist", json={"value": "Spam.Example"}, headers=admin)
    assert domain.status_code == 201, domain.text
    assert (domain.json()["kind"], domain.json()["value"]) == ("domain", "spam.example")
    address = await client.post(
        "/v1/admin/blocklist", json={"value": "Troll@Example.com"}, headers=admin
    )
    assert (address.json()["kind"], address.json()["value"]) == ("address", "troll@example.com")

    entry = f"/v1/admin/blocklist/{domain.json()['id']}"
    assert (await client.get(entry, headers=read)).json()["value"] == "spam.example"
    assert (await client.patch(entry, json={"note": "x"}, headers=read)).status_code == 403
    noted = await client.patch(entry, json={"note": "Throwaway domain"}, headers=admin)
    assert noted.status_code == 200, noted.text
    assert noted.json()["note"] == "Throwaway domain"
    assert (await client.get(entry, headers=read)).json()["note"] == "Throwaway domain"
    assert (await client.get("/v1/admin/blocklist/999999", headers=read)).status_code == 404

    for blocked in ("someone@spam.example", "troll@example.com"):
        await client.post("/v1/subscriptions", json={"email": blocked, "newsletters": ["weekly"]})
    found = await client.get("/v1/admin/subscribers", headers=admin)
    assert found.json()["items"] == []

    assert (await client.delete(entry, headers=admin)).status_code == 204
    assert (await client.get(entry, headers=read)).status_code == 404


# ---------------------------------------------------------------- operations


async def test_import_command_works_with_the_contracts_flags_alone(tmp_path: Path) -> None:
    """design.md: `newsletter subscribers import FILE --newsletter S [--status pending|active]`
    (no consent flag named): the consent record names the file instead."""
    ok(await newsletter(tmp_path, "migrate"))
    ok(await newsletter(tmp_path, "newsletters", "create", "--slug", "news", "--name", "News"))
    members = tmp_path / "members.csv"
    members.write_text("email,name\nada@example.com,Ada\nnot-an-address,X\n")
    report = ok(
        await newsletter(tmp_path, "subscribers", "import", str(members), "--newsletter", "news")
    )
    assert "1 imported" in report and "1 rejected" in report
    members.write_text("email\ngrace@example.com\n")
    ok(
        await newsletter(
            tmp_path, "subscribers", "import", str(members), "--newsletter", "news",
            "--status", "active",
        )
    )  # fmt: skip
    exported = ok(
        await newsletter(
            tmp_path, "subscribers", "export", "--newsletter", "news", "--status", "active"
        )
    )
    assert "ada@example.com" in exported and "grace@example.com" in exported


def test_the_served_app_writes_no_access_log_lines() -> None:
    """docs/operations.md: no access log, since its lines would carry tokens in paths.
    uvicorn writes them whenever its access logger has a handler, inherited ones included."""
    configure_logging("info", json_logs=True)
    assert not logging.getLogger("uvicorn.access").hasHandlers()
    assert logging.getLogger("uvicorn.error").hasHandlers()


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("uvicorn.access")
    access_state = (access.handlers[:], access.propagate)
    yield None
    root.handlers[:], root.level = handlers, level
    access.handlers[:], access.propagate = access_state
