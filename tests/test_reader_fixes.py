"""Reader-facing defects found by the contract audit, each pinned by what a reader or a client
sees: the preference centre, a sign-up of a known address, a confirm link after an unsubscribe,
the embedded form of a missing newsletter, and a database that has not been migrated."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import utcnow
from tests.conftest import (
    SMTPServer,
    TestDatabase,
    deliver,
    fresh_pg_database,
    make_newsletter,
)
from tests.test_admin import make_key
from tests.test_signup_api import link, problem, set_newsletter, signup, statuses
from tests.test_signup_pages import active_reader, manage_path

BOUNCE_SECRET = "reader-fixes-bounce-secret"
AWAITING = "Awaiting your confirmation"
CONFIRMED = "Your subscription is confirmed"
SINCE = "You have since unsubscribed"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings with the bounce intake switched on."""
    return settings.model_copy(update={"bounce_webhook_secret": BOUNCE_SECRET})


def ticked(page: str) -> list[str]:
    """The newsletters a browser would send if the reader pressed Save without touching a box."""
    boxes = re.findall(r'<input type="checkbox"[^>]*>', page)
    return [
        re.search(r'value="([^"]+)"', box).group(1)  # type: ignore[union-attr]
        for box in boxes
        if re.search(r"\bchecked\b", box)
    ]


def item_of(page: str, name: str) -> str:
    """The preference centre's list item of one newsletter."""
    [item] = [i for i in re.findall(r"<li>(.*?)</li>", page, flags=re.S) if f">{name}<" in i]
    return str(item)


# ---------------------------------------------------------------- 1. the preference centre


async def test_a_pending_sign_up_is_shown_unticked_and_save_leaves_it_pending(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")
    await active_reader(client, db, smtp, worker, "weekly")
    assert (await signup(client, "reader@example.com", "daily")).status_code == 202
    path = await manage_path(client, db, settings)

    page = await client.get(path)
    assert ticked(page.text) == ["weekly"]
    assert AWAITING in item_of(page.text, "The Daily")
    assert AWAITING not in item_of(page.text, "The Weekly")

    # Save as the page was shown: nothing the reader did not choose changes.
    saved = await client.post(path, data={"newsletters": ticked(page.text)})
    assert saved.status_code == 200
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "active", "daily": "pending"}
    }
    assert ticked(saved.text) == ["weekly"]

    # Ticking it is the reader's choice, and the link came by mail: it is confirmed.
    chosen = await client.post(path, data={"newsletters": ["weekly", "daily"]})
    assert chosen.status_code == 200
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "active", "daily": "active"}
    }
    assert AWAITING not in chosen.text


async def test_unsubscribe_from_all_in_the_preference_centre_ends_a_pending_sign_up_too(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await active_reader(client, db, smtp, worker, "weekly")
    await signup(client, "reader@example.com", "daily")

    page = await client.post(
        await manage_path(client, db, settings), data={"action": "unsubscribe_all"}
    )

    assert page.status_code == 200
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "unsubscribed", "daily": "unsubscribed"}
    }


async def test_a_bounced_subscription_is_not_reactivated_by_the_preference_centre(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    """Already so before the fix (save_preferences never activates a bounced one): kept."""
    await make_newsletter(db, "weekly", name="The Weekly")
    await active_reader(client, db, smtp, worker, "weekly")
    bounce = await client.post(
        "/v1/hooks/bounces",
        json={"type": "bounce", "email": "reader@example.com", "bounce_type": "hard"},
        headers={"authorization": f"Bearer {BOUNCE_SECRET}"},
    )
    assert bounce.status_code == 200, bounce.text
    path = await manage_path(client, db, settings)

    page = await client.get(path)
    assert ticked(page.text) == []
    saved = await client.post(path, data={"newsletters": ["weekly"]})

    assert saved.status_code == 200
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "bounced"}}


# ---------------------------------------------------------------- 2. a sign-up of a known address


async def test_signing_up_a_known_address_again_never_rewrites_what_the_reader_gave(
    settings: Settings, db: Database, smtp: SMTPServer
) -> None:
    """Reported by the audit; not reproduced (signup._upsert_subscribers inserts with ON
    CONFLICT DO NOTHING and nothing else writes a subscriber's name): pinned on every way in,
    confirmation included."""
    uncapped = settings.model_copy(update={"confirmation_mail_interval": timedelta(0)})
    app = create_app(uncapped)
    worker = DeliveryWorker(app.state.db, uncapped)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await make_newsletter(db, "news", opt_in="single")
    mallory = {"name": "Mallory", "language": "en", "attributes": {"plan": "free"}}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            given = {"name": "Reader", "language": "uk", "attributes": {"plan": "pro"}}
            assert (await signup(http, "reader@example.com", "weekly", **given)).status_code == 202
            await deliver(worker)
            await http.post(link(smtp.sink.received[-1].text(), "confirm"))

            again = [
                await signup(http, "Reader@Example.com", "daily", **mallory),
                await signup(http, "reader@example.com", "news", **mallory),
                await http.post(
                    "/v1/subscriptions",
                    data={"email": "reader@example.com", "newsletters": "weekly", "name": "Eve"},
                    headers={"accept": "text/html"},
                ),
            ]
            assert [a.status_code for a in again] == [202, 200, 200]
            await deliver(worker)
            [confirm] = [m for m in smtp.sink.received[1:] if "/confirm/" in m.text()]
            assert (await http.post(link(confirm.text(), "confirm"))).status_code == 200

            admin = await make_key(db, "read")
            [item] = (await http.get("/v1/admin/subscribers", headers=admin)).json()["items"]
            person = (await http.get(f"/v1/admin/subscribers/{item['id']}", headers=admin)).json()
    finally:
        await app.state.signups.stop()
        await app.state.db.dispose()

    assert {k: person[k] for k in ("email", "name", "language", "attributes")} == {
        "email": "reader@example.com",
        "name": "Reader",
        "language": "uk",
        "attributes": {"plan": "pro"},
    }
    assert {s["newsletter"]: s["status"] for s in person["subscriptions"]} == {
        "weekly": "active",
        "daily": "active",
        "news": "active",
    }


# ---------------------------------------------------------------- 3. confirming after unsubscribing


async def _confirm_link(
    client: httpx.AsyncClient, smtp: SMTPServer, worker: DeliveryWorker, *slugs: str
) -> str:
    """reader@example.com signed up (double opt-in); the token of the confirmation mail."""
    assert (await signup(client, "reader@example.com", *slugs)).status_code == 202
    await deliver(worker)
    return link(smtp.sink.received[-1].text(), "confirm").removeprefix("/confirm/")


async def _unsubscribe(
    client: httpx.AsyncClient, db: Database, settings: Settings, slug: str | None = None
) -> None:
    path = (await manage_path(client, db, settings)).replace("/manage/", "/unsubscribe/")
    answer = await client.post(path, params={"newsletter": slug} if slug else None)
    assert answer.status_code == 200


async def test_a_confirm_link_clicked_after_unsubscribing_activates_nothing_and_says_so(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    token = await _confirm_link(client, smtp, worker, "weekly")
    await _unsubscribe(client, db, settings)

    shown = await client.get(f"/confirm/{token}")
    pressed = await client.post(f"/confirm/{token}")
    api = await client.post(f"/v1/confirmations/{token}")

    for page in (shown, pressed):
        assert page.status_code == 410
        assert SINCE in page.text and "The Weekly" in page.text
        assert CONFIRMED not in page.text
        assert 'href="/subscribe/weekly"' in page.text
    body = problem(api, 410)
    assert body["type"] == "about:blank#unsubscribed_since"
    assert body["title"] == SINCE
    assert body["newsletters"] == ["weekly"]
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "unsubscribed"}}
    assert await deliver(worker) == 0  # no welcome mail


async def test_a_confirm_link_used_again_after_unsubscribing_no_longer_says_confirmed(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    token = await _confirm_link(client, smtp, worker, "weekly")
    first = await client.post(f"/v1/confirmations/{token}")
    assert first.status_code == 200
    assert first.json() == {"status": "active", "newsletters": ["weekly"]}
    await _unsubscribe(client, db, settings, "weekly")

    again = await client.post(f"/confirm/{token}")
    api = await client.post(f"/v1/confirmations/{token}")

    assert again.status_code == 410 and SINCE in again.text
    assert problem(api, 410)["newsletters"] == ["weekly"]
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "unsubscribed"}}


async def test_a_confirm_link_confirms_what_is_still_pending_and_names_what_was_left(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")
    token = await _confirm_link(client, smtp, worker, "weekly", "daily")
    await _unsubscribe(client, db, settings, "daily")

    page = await client.post(f"/confirm/{token}")
    api = await client.post(f"/v1/confirmations/{token}")

    assert page.status_code == 200
    assert CONFIRMED in page.text
    received, left = page.text.split("You unsubscribed from these")
    assert "The Weekly" in received and "The Daily" not in received
    assert "The Daily" in left
    assert api.status_code == 200
    assert api.json() == {"status": "active", "newsletters": ["weekly"]}
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "active", "daily": "unsubscribed"}
    }


# ---------------------------------------------------------------- 4. a sign-up form that is gone


@pytest.mark.parametrize("path", ["/embed/nope", "/embed/old", "/subscribe/nope", "/subscribe/old"])
async def test_a_missing_sign_up_form_says_so_rather_than_blaming_a_mail_link(
    client: httpx.AsyncClient, db: Database, path: str
) -> None:
    await make_newsletter(db, "old", name="The Old One")
    await set_newsletter(db, "old", archived_at=utcnow())

    page = await client.get(path)
    in_ukrainian = await client.get(path, headers={"accept-language": "uk"})

    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "This sign-up form is not available" in page.text
    main = page.text.split("<main", 1)[1].lower()
    assert "email" not in main and "link" not in main
    assert "The Old One" not in page.text
    assert in_ukrainian.status_code == 404
    assert "Ця форма підписки недоступна" in in_ukrainian.text
    if path.startswith("/embed/"):  # shown inside the site's frame, like the form would be
        assert "X-Frame-Options" not in page.headers


# ---------------------------------------------------------------- 5. a database not migrated


@asynccontextmanager
async def unmigrated(
    settings: Settings, test_database: TestDatabase, tmp_path: Path
) -> AsyncIterator[Settings]:
    """The suite's settings on a database of the same backend with no schema at all."""
    if test_database.backend == "sqlite":
        yield settings.model_copy(update={"database_url": f"sqlite:///{tmp_path}/empty.db"})
        return
    async with fresh_pg_database("newsletter_unmigrated") as url:
        yield settings.model_copy(update={"database_url": url})


async def test_api_routes_on_an_unmigrated_database_answer_503_not_ready(
    settings: Settings, test_database: TestDatabase, tmp_path: Path
) -> None:
    async with unmigrated(settings, test_database, tmp_path) as bare:
        app = create_app(bare)
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
                answers = [
                    await http.post(
                        "/v1/subscriptions",
                        json={"email": "reader@example.com", "newsletters": ["weekly"]},
                    ),
                    await http.get("/v1/newsletters"),
                    await http.post("/v1/confirmations/some-token"),
                ]
        finally:
            await app.state.signups.stop()
            await app.state.db.dispose()

    for answer in answers:
        body = problem(answer, 503)
        assert body["title"] == "Service not ready: database not migrated"
        assert body["type"] == "about:blank#not_migrated"
        assert int(answer.headers["retry-after"]) > 0


async def test_the_worker_on_an_unmigrated_database_logs_one_clear_error_and_waits(
    settings: Settings,
    test_database: TestDatabase,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with unmigrated(settings, test_database, tmp_path) as bare:
        bare = bare.model_copy(update={"worker_poll_interval": 0.001})
        db = Database(bare)
        stop = asyncio.Event()
        try:
            with caplog.at_level(logging.INFO, logger="service.mail.worker"):
                running = asyncio.create_task(DeliveryWorker(db, bare).run_forever(stop))
                await asyncio.sleep(0.6)  # several looks at the database at the first delays
                stop.set()
                await asyncio.wait_for(running, 5)  # stops promptly while it waits
        finally:
            await db.dispose()

    records = [r for r in caplog.records if r.name == "service.mail.worker"]
    assert [r.levelname for r in records] == ["ERROR"]
    assert "newsletter migrate" in records[0].getMessage()
    assert records[0].exc_info is None  # one line, not a traceback
