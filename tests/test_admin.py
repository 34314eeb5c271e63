"""The admin API: keys and scopes, newsletters, subscribers, privacy, feed, blocklist."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text

from service.db import Database
from service.keys import create_key
from service.mail.worker import DeliveryWorker
from service.models import Base
from service.suppression import address_hash
from tests.conftest import SMTPServer, deliver, make_newsletter
from tests.test_journey import link


async def make_key(db: Database, scope: str = "admin", name: str = "ops") -> dict[str, str]:
    async with db.transaction() as session:
        key = (await create_key(session, name, scope)).key
    return {"authorization": f"Bearer {key}"}


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    schema = app.openapi()
    return [
        (method.upper(), path)
        for path, item in schema["paths"].items()
        if path.startswith("/v1/admin")
        for method in item
    ]


async def test_no_admin_route_answers_without_a_valid_key(
    app: FastAPI, client: httpx.AsyncClient, db: Database
) -> None:
    routes = _routes(app)
    assert len(routes) >= 20
    read = await make_key(db, "read")
    for method, path in routes:
        url = re.sub(r"\{[^}]+\}", "x", path)
        for headers in ({}, {"authorization": "Bearer nl_wrong"}, {"authorization": "Basic x"}):
            answer = await client.request(method, url, headers=headers)
            assert answer.status_code == 401, (method, path, headers, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
        if method != "GET":
            answer = await client.request(method, url, headers=read, json={})
            assert answer.status_code == 403, (method, path, answer.text)


async def test_revoked_key_stops_working_at_once(client: httpx.AsyncClient, db: Database) -> None:
    headers = await make_key(db)
    assert (await client.get("/v1/admin/newsletters", headers=headers)).status_code == 200
    async with db.transaction() as session:
        await session.execute(text("UPDATE api_keys SET revoked_at = created_at"))
    assert (await client.get("/v1/admin/newsletters", headers=headers)).status_code == 401


async def test_newsletter_crud_and_archive(client: httpx.AsyncClient, db: Database) -> None:
    headers = await make_key(db)
    created = await client.post(
        "/v1/admin/newsletters",
        json={
            "slug": "weekly",
            "name": "The Weekly",
            "opt_in": "single",
            "allowed_origins": ["https://example.com"],
        },
        headers=headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["counts"] == {"pending": 0, "active": 0, "unsubscribed": 0, "bounced": 0}
    again = await client.post(
        "/v1/admin/newsletters", json={"slug": "weekly", "name": "x"}, headers=headers
    )
    assert again.status_code == 409
    bad = await client.post(
        "/v1/admin/newsletters", json={"slug": "Not A Slug", "name": "x"}, headers=headers
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "slug"
    missing = await client.post("/v1/admin/newsletters", json={"slug": "x"}, headers=headers)
    assert missing.status_code == 422
    assert missing.json()["errors"][0] == {
        "field": "name",
        "code": "required",
        "message": "This field is required.",
    }

    patched = await client.patch(
        "/v1/admin/newsletters/weekly", json={"description": "Fridays"}, headers=headers
    )
    assert patched.json()["description"] == "Fridays"
    # A language tag is checked as the public sign-up checks one, on create and on change.
    for answer in (
        await client.post(
            "/v1/admin/newsletters",
            json={"slug": "badlang", "name": "x", "language": "zz-bad!"},
            headers=headers,
        ),
        await client.patch(
            "/v1/admin/newsletters/weekly", json={"language": "en_US<"}, headers=headers
        ),
    ):
        assert answer.status_code == 422, answer.text
        assert answer.json()["errors"][0] == {
            "field": "language",
            "code": "invalid",
            "message": "Language must be a tag like en or uk.",
        }
    retagged = await client.patch(
        "/v1/admin/newsletters/weekly", json={"language": "pt-BR"}, headers=headers
    )
    assert retagged.json()["language"] == "pt-BR"
    assert (await client.get("/v1/admin/newsletters/badlang", headers=headers)).status_code == 404
    assert (await client.get("/v1/admin/newsletters/nope", headers=headers)).status_code == 404

    archived = await client.delete("/v1/admin/newsletters/weekly", headers=headers)
    assert archived.status_code == 200
    assert archived.json()["archived_at"] is not None
    public = await client.get("/v1/newsletters")
    assert public.json() == []
    signup = await client.post(
        "/v1/subscriptions", json={"email": "a@example.com", "newsletters": ["weekly"]}
    )
    assert signup.json()["errors"][0]["code"] == "unknown_newsletter"

    feed = await client.get(
        "/v1/admin/events", params={"type": "newsletter.archived"}, headers=headers
    )
    [event] = feed.json()["items"]
    assert event["actor"] == "key:ops" and event["newsletter"] == "weekly"


async def test_pagination_stays_right_while_rows_arrive(
    client: httpx.AsyncClient, db: Database
) -> None:
    headers = await make_key(db, "read")
    await make_newsletter(db, "weekly", opt_in="single")
    for i in range(5):
        await client.post(
            "/v1/subscriptions", json={"email": f"p{i}@example.com", "newsletters": ["weekly"]}
        )
    first = (await client.get("/v1/admin/subscribers", params={"limit": 3}, headers=headers)).json()
    assert len(first["items"]) == 3 and first["next_cursor"]
    await client.post(
        "/v1/subscriptions", json={"email": "p5@example.com", "newsletters": ["weekly"]}
    )
    second = (
        await client.get(
            "/v1/admin/subscribers",
            params={"limit": 3, "cursor": first["next_cursor"]},
            headers=headers,
        )
    ).json()
    emails = [i["email"] for i in first["items"] + second["items"]]
    assert emails == [f"p{i}@example.com" for i in range(6)]
    bad = await client.get("/v1/admin/subscribers", params={"cursor": "!!"}, headers=headers)
    assert bad.status_code == 422


async def test_add_active_needs_consent_note_and_pending_sends_confirmation(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    headers = await make_key(db)
    await make_newsletter(db, "weekly")
    no_note = await client.post(
        "/v1/admin/subscribers",
        json={"email": "a@example.com", "newsletters": ["weekly"], "status": "active"},
        headers=headers,
    )
    assert no_note.status_code == 422
    assert no_note.json()["errors"][0]["field"] == "consent_note"

    active = await client.post(
        "/v1/admin/subscribers",
        json={
            "email": "a@example.com",
            "newsletters": ["weekly"],
            "status": "active",
            "consent_note": "paper form, 2026 meetup",
            "name": "Ada",
        },
        headers=headers,
    )
    assert active.status_code == 201, active.text
    body = active.json()
    assert body["subscriptions"][0]["status"] == "active"
    assert body["subscriptions"][0]["consent"]["source"] == "admin"
    assert body["subscriptions"][0]["consent"]["page"] == "paper form, 2026 meetup"
    assert body["events"][0]["actor"] == "key:ops"
    assert body["manage_url"].startswith("http://testserver/manage/")
    page = await client.get(body["manage_url"].removeprefix("http://testserver"))
    assert page.status_code == 200

    duplicate = await client.post(
        "/v1/admin/subscribers",
        json={"email": "A@example.com", "newsletters": ["weekly"], "status": "pending"},
        headers=headers,
    )
    assert duplicate.status_code == 409

    pending = await client.post(
        "/v1/admin/subscribers",
        json={"email": "b@example.com", "newsletters": ["weekly"], "status": "pending"},
        headers=headers,
    )
    assert pending.status_code == 201
    assert pending.json()["subscriptions"][0]["status"] == "pending"
    await deliver(worker)
    assert [m.rcpt_tos for m in smtp.sink.received] == [["b@example.com"]]
    resent = await client.post(
        f"/v1/admin/subscribers/{pending.json()['id']}/resend-confirmation", headers=headers
    )
    assert resent.status_code == 202
    assert resent.json() == {"status": "pending", "newsletters": ["weekly"]}
    await deliver(worker)
    assert len(smtp.sink.received) == 2
    nothing = await client.post(
        f"/v1/admin/subscribers/{body['id']}/resend-confirmation", headers=headers
    )
    assert nothing.status_code == 409


async def test_update_and_set_status(client: httpx.AsyncClient, db: Database) -> None:
    headers = await make_key(db)
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    added = (
        await client.post(
            "/v1/admin/subscribers",
            json={
                "email": "a@example.com",
                "newsletters": ["weekly"],
                "status": "active",
                "consent_note": "import from old CRM",
            },
            headers=headers,
        )
    ).json()
    url = f"/v1/admin/subscribers/{added['id']}"
    patched = await client.patch(
        url, json={"name": "<b>Ada</b>", "attributes": {"plan": "pro"}}, headers=headers
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "<b>Ada</b>"
    assert patched.json()["attributes"] == {"plan": "pro"}
    assert (await client.patch(url, json={"email": "x@y.z"}, headers=headers)).status_code == 422

    put = await client.put(
        f"{url}/subscriptions/weekly", json={"status": "unsubscribed"}, headers=headers
    )
    assert put.status_code == 200
    put = await client.put(f"{url}/subscriptions/daily", json={"status": "active"}, headers=headers)
    states = {s["newsletter"]: s["status"] for s in put.json()["subscriptions"]}
    assert states == {"weekly": "unsubscribed", "daily": "active"}
    bad = await client.put(
        f"{url}/subscriptions/daily", json={"status": "bounced"}, headers=headers
    )
    assert bad.status_code == 422
    assert (
        await client.get("/v1/admin/subscribers/" + "0" * 32, headers=headers)
    ).status_code == 404


async def _all_text(db: Database) -> str:
    """Every value in every table, as one string: what an erasure must leave no trace in."""
    parts: list[str] = []
    async with db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(table.select())).all():
                parts.append(repr(tuple(row)))
    return "\n".join(parts)


async def test_erase_leaves_no_trace_and_import_cannot_bring_them_back(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    headers = await make_key(db)
    await make_newsletter(db, "weekly")
    await client.post(
        "/v1/subscriptions",
        json={"email": "Erase.Me@Example.com", "newsletters": ["weekly"], "name": "Eve Secret"},
        headers={"user-agent": "EveBrowser/1.0"},
    )
    await deliver(worker)
    found = (
        await client.get("/v1/admin/subscribers", params={"email": "erase"}, headers=headers)
    ).json()["items"]
    [person] = found
    export = await client.get(f"/v1/admin/subscribers/{person['id']}/export", headers=headers)
    assert export.status_code == 200
    exported: dict[str, Any] = export.json()
    assert exported["email"] == "Erase.Me@example.com"
    assert exported["subscriptions"][0]["consent"]["user_agent"] == "EveBrowser/1.0"
    assert any(e["type"] == "subscription.pending" for e in exported["events"])

    erased = await client.delete(f"/v1/admin/subscribers/{person['id']}", headers=headers)
    assert erased.status_code == 204
    everything = (await _all_text(db)).lower()
    for trace in ("erase.me", "eve secret", "evebrowser", "203.0.113.7"):
        assert trace not in everything
    assert address_hash("erase.me@example.com") in everything
    again = await client.delete(f"/v1/admin/subscribers/{person['id']}", headers=headers)
    assert again.status_code == 404

    readd = await client.post(
        "/v1/admin/subscribers",
        json={
            "email": "erase.me@example.com",
            "newsletters": ["weekly"],
            "status": "active",
            "consent_note": "old list",
        },
        headers=headers,
    )
    assert readd.status_code == 422
    assert readd.json()["errors"][0]["code"] == "suppressed"

    feed = (
        await client.get("/v1/admin/events", params={"type": "subscriber.erased"}, headers=headers)
    ).json()["items"]
    assert feed[0]["actor"] == "key:ops"

    # The person may still come back on their own, through double opt-in.
    smtp.sink.received.clear()
    back = await client.post(
        "/v1/subscriptions", json={"email": "erase.me@example.com", "newsletters": ["weekly"]}
    )
    assert back.status_code == 202
    await deliver(worker)
    [mail] = smtp.sink.received
    confirm = re.search(r"http://testserver(/confirm/\S+)", mail.text())
    assert confirm
    assert (await client.post(confirm.group(1))).status_code == 200
    async with db.transaction() as session:
        left = await session.scalar(text("SELECT count(*) FROM suppressions"))
    assert left == 0


async def test_blocklist_is_honoured_by_signup_and_admin_add(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    headers = await make_key(db)
    await make_newsletter(db, "weekly")
    block = await client.post(
        "/v1/admin/blocklist", json={"kind": "domain", "value": "Spam.Example"}, headers=headers
    )
    assert block.status_code == 201
    assert block.json()["value"] == "spam.example"
    dup = await client.post(
        "/v1/admin/blocklist", json={"kind": "domain", "value": "spam.example"}, headers=headers
    )
    assert dup.status_code == 409
    bad = await client.post(
        "/v1/admin/blocklist", json={"kind": "domain", "value": "no"}, headers=headers
    )
    assert bad.status_code == 422
    await client.post(
        "/v1/admin/blocklist", json={"kind": "address", "value": "Bad@Example.com"}, headers=headers
    )

    for email in ("x@spam.example", "y@mail.spam.example", "bad@example.com"):
        answer = await client.post(
            "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"]}
        )
        assert answer.status_code == 202  # answered like everyone else
    await deliver(worker)
    assert smtp.sink.received == []
    async with db.transaction() as session:
        assert await session.scalar(text("SELECT count(*) FROM subscribers")) == 0
    admin_add = await client.post(
        "/v1/admin/subscribers",
        json={"email": "z@spam.example", "newsletters": ["weekly"], "status": "pending"},
        headers=headers,
    )
    assert admin_add.status_code == 422
    audit = (
        await client.get("/v1/admin/events", params={"type": "blocklist.added"}, headers=headers)
    ).json()["items"]
    assert [(e["actor"], e["data"]["value"]) for e in audit] == [
        ("key:ops", "spam.example"),
        ("key:ops", "bad@example.com"),
    ]
    listed = (await client.get("/v1/admin/blocklist", headers=headers)).json()["items"]
    assert [e["value"] for e in listed] == ["spam.example", "bad@example.com"]
    assert (
        await client.delete(f"/v1/admin/blocklist/{listed[0]['id']}", headers=headers)
    ).status_code == 204
    ok = await client.post(
        "/v1/subscriptions", json={"email": "x@spam.example", "newsletters": ["weekly"]}
    )
    assert ok.status_code == 202
    await deliver(worker)
    assert len(smtp.sink.received) == 1


async def test_stats_are_computed_by_the_database(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    headers = await make_key(db, "read")
    await make_newsletter(db, "weekly")
    for i in range(4):
        await client.post(
            "/v1/subscriptions", json={"email": f"s{i}@example.com", "newsletters": ["weekly"]}
        )
    await deliver(worker)
    links = [re.search(r"http://testserver(/confirm/\S+)", m.text()) for m in smtp.sink.received]
    for found in links[:3]:
        assert found
        await client.post(found.group(1))
    async with db.transaction() as session:
        # Back-date the pending stamps so the median has something to measure.
        await session.execute(
            text(
                "UPDATE subscriptions SET pending_at = pending_at - INTERVAL '10 minutes'"
                if not db.is_sqlite
                else "UPDATE subscriptions SET pending_at = datetime(pending_at, '-10 minutes')"
            )
        )
    await client.post(
        "/v1/subscriptions", json={"email": "s0@example.com", "newsletters": ["weekly"]}
    )
    stats = await client.get("/v1/admin/newsletters/weekly/stats", headers=headers)
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert body["counts"] == {"pending": 1, "active": 3, "unsubscribed": 0, "bounced": 0}
    [today] = body["days"]
    assert today["signups"] == 4 and today["confirmations"] == 3
    assert body["confirmation_rate"] == 0.75
    assert body["median_time_to_confirm_seconds"] == pytest.approx(600, abs=5)
    assert (
        await client.get("/v1/admin/newsletters/nope/stats", headers=headers)
    ).status_code == 404
    async with db.transaction() as session:
        count = await session.scalar(select(func.count()).select_from(text("events")))
    assert count == 8  # newsletter.created, 4 pending, 3 confirmed; the repeat adds none


async def test_prefix_search_pages_in_address_order(
    client: httpx.AsyncClient, db: Database
) -> None:
    headers = await make_key(db, "read")
    await make_newsletter(db, "weekly", opt_in="single")
    for local in ("zed", "anna", "bob", "carol", "ann_x", "annie"):
        await client.post(
            "/v1/subscriptions", json={"email": f"{local}@example.com", "newsletters": ["weekly"]}
        )
    first = (
        await client.get(
            "/v1/admin/subscribers", params={"email": "ann", "limit": 2}, headers=headers
        )
    ).json()
    assert [i["email"] for i in first["items"]] == ["ann_x@example.com", "anna@example.com"]
    second = (
        await client.get(
            "/v1/admin/subscribers",
            params={"email": "ann", "limit": 2, "cursor": first["next_cursor"]},
            headers=headers,
        )
    ).json()
    assert [i["email"] for i in second["items"]] == ["annie@example.com"]
    assert second["next_cursor"] is None
    # "_" and "%" are not wildcards.
    literal = (
        await client.get("/v1/admin/subscribers", params={"email": "ann_"}, headers=headers)
    ).json()
    assert [i["email"] for i in literal["items"]] == ["ann_x@example.com"]


async def test_the_same_add_at_once_adds_once_and_mails_once(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    """Concurrent adds of one address as pending each looked, found nobody, and went on: on
    PostgreSQL all answered 201, with a confirmation, an event and a mail each. One is added;
    the others get 409 and leave nothing behind."""
    await make_newsletter(db, "news")
    headers = await make_key(db)
    answers = await asyncio.gather(
        *(
            client.post(
                "/v1/admin/subscribers",
                json={"email": "twice@example.com", "newsletters": ["news"]},
                headers=headers,
            )
            for _ in range(10)
        )
    )
    assert sorted(a.status_code for a in answers) == [201] + [409] * 9, [a.text for a in answers]
    async with db.transaction() as session:
        pending = await session.scalar(
            text("SELECT count(*) FROM events WHERE type = 'subscription.pending'")
        )
        confirmations = await session.scalar(text("SELECT count(*) FROM confirmations"))
    assert (pending, confirmations) == (1, 1)
    assert await deliver(worker) == 1
    assert [m.rcpt_tos for m in smtp.sink.received] == [["twice@example.com"]]


async def test_stats_count_people_and_single_opt_in_sign_ups(
    client: httpx.AsyncClient, db: Database
) -> None:
    """A single opt-in sign-up is a sign-up (it counted as none, and as a confirmation), and
    one person signing up twice in a day is one sign-up (it counted events)."""
    headers = await make_key(db, "read")
    await make_newsletter(db, "news", opt_in="single")
    await make_newsletter(db, "weekly")
    for i in range(3):
        answer = await client.post(
            "/v1/subscriptions", json={"email": f"n{i}@example.com", "newsletters": ["news"]}
        )
        assert answer.status_code == 200
    for email in ("a@example.com", "b@example.com", "a@example.com"):
        answer = await client.post(
            "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"]}
        )
        assert answer.status_code == 202
    single = (await client.get("/v1/admin/newsletters/news/stats", headers=headers)).json()
    [today] = single["days"]
    assert (today["signups"], today["confirmations"], today["unsubscribes"]) == (3, 0, 0)
    double = (await client.get("/v1/admin/newsletters/weekly/stats", headers=headers)).json()
    [today] = double["days"]
    assert (today["signups"], today["confirmations"]) == (2, 0)


async def test_added_as_pending_confirms_even_on_a_single_opt_in_list(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    """design: add "with status and a consent note, or as pending with a confirmation mail".
    On a single opt-in list a pending add went straight to active, with no note and no mail."""
    await make_newsletter(db, "news", opt_in="single")
    headers = await make_key(db)
    added = await client.post(
        "/v1/admin/subscribers",
        json={"email": "h@example.com", "newsletters": ["news"], "status": "pending"},
        headers=headers,
    )
    assert added.status_code == 201, added.text
    assert [s["status"] for s in added.json()["subscriptions"]] == ["pending"]
    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    assert (await client.post(link(mail.text(), "confirm"))).status_code == 200
    shown = await client.get(f"/v1/admin/subscribers/{added.json()['id']}", headers=headers)
    assert [s["status"] for s in shown.json()["subscriptions"]] == ["active"]
    # A reader's own sign-up to the same kind of list is still active at once.
    await make_newsletter(db, "daily", opt_in="single")
    own = await client.post(
        "/v1/subscriptions", json={"email": "o@example.com", "newsletters": ["daily"]}
    )
    assert own.status_code == 200 and own.json()["status"] == "active"
