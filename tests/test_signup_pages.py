"""Reader pages: the plain HTML sign-up form, unsubscribe and the preference centre."""

from __future__ import annotations

import asyncio
import html
import re

import httpx
import pytest

from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Subscriber, utcnow
from service.tokens import manage_token
from tests.conftest import SMTPServer, deliver, make_newsletter
from tests.test_signup_api import (
    INVALID_EMAIL,
    THANKS,
    count,
    link,
    multipart,
    set_newsletter,
    signup,
    statuses,
    subscribers,
)

BROWSER = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


async def browser_signup(client: httpx.AsyncClient, **fields: str | list[str]) -> httpx.Response:
    """What a plain <form method=post> sends, with no JavaScript."""
    return await client.post("/v1/subscriptions", data=fields, headers=BROWSER)


def is_html(answer: httpx.Response) -> bool:
    return answer.headers["content-type"].startswith("text/html")


def input_value(page: str, name: str) -> str:
    found = re.search(rf'<input[^>]*name="{name}"[^>]*value="([^"]*)"', page) or re.search(
        rf'<input[^>]*value="([^"]*)"[^>]*name="{name}"', page
    )
    assert found, f"no input {name!r} with a value in the page"
    return html.unescape(found.group(1))


async def manage_path(client: httpx.AsyncClient, db: Database, settings: Settings) -> str:
    [item] = await subscribers(client, db)
    return f"/manage/{manage_token(settings.secret_keys, item['id'])}"


async def active_reader(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker, *slugs: str
) -> None:
    """reader@example.com, confirmed on these newsletters through the mail link."""
    assert (await signup(client, "reader@example.com", *slugs)).status_code == 202
    await deliver(worker)
    assert (await client.post(link(smtp.sink.received[-1].text(), "confirm"))).status_code == 200


# ---------------------------------------------------------------- the sign-up form


async def test_signup_form_page_shows_the_form(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")

    page = await client.get("/subscribe/weekly")

    assert page.status_code == 200
    assert is_html(page)
    assert "The Weekly" in page.text
    assert 'action="/v1/subscriptions"' in page.text and 'method="post"' in page.text
    assert re.search(r'<input[^>]*type="email"[^>]*name="email"', page.text)
    assert input_value(page.text, "newsletters") == "weekly"
    assert 'name="website"' in page.text  # the honeypot


@pytest.mark.parametrize("archived", [False, True], ids=["unknown", "archived"])
async def test_signup_form_page_of_no_public_newsletter_is_404(
    client: httpx.AsyncClient, db: Database, archived: bool
) -> None:
    await make_newsletter(db, "old")
    if archived:
        await set_newsletter(db, "old", archived_at=utcnow())

    page = await client.get("/subscribe/old" if archived else "/subscribe/nope")

    assert page.status_code == 404
    assert is_html(page)


async def test_browser_form_post_gets_the_thank_you_page(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")

    page = await browser_signup(client, email="reader@example.com", newsletters="weekly")

    assert page.status_code == 200
    assert is_html(page)
    assert THANKS in html.unescape(page.text)
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "pending"}}
    assert await deliver(worker) == 1


async def test_browser_form_post_to_single_opt_in_says_subscribed(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "news", opt_in="single")

    page = await browser_signup(client, email="reader@example.com", newsletters="news")

    assert page.status_code == 200
    assert is_html(page)
    assert "Successfully subscribed" in page.text


async def test_multipart_browser_form_post_gets_the_thank_you_page(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    body, content_type = multipart([("email", "reader@example.com"), ("newsletters", "weekly")])

    page = await client.post(
        "/v1/subscriptions", content=body, headers={**BROWSER, "content-type": content_type}
    )

    assert page.status_code == 200
    assert is_html(page)
    assert await count(db, Subscriber) == 1


async def test_browser_form_post_with_bad_address_shows_the_form_again_with_the_message(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")

    page = await browser_signup(client, email="reader@example", newsletters="weekly")

    assert page.status_code == 422
    assert is_html(page)
    assert INVALID_EMAIL in page.text
    assert input_value(page.text, "email") == "reader@example"
    assert input_value(page.text, "newsletters") == "weekly"
    assert 'action="/v1/subscriptions"' in page.text
    assert await count(db, Subscriber) == 0


async def test_typed_value_kept_in_the_form_is_escaped(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    typed = '"><script>alert(1)</script>'

    page = await browser_signup(client, email=typed, newsletters="weekly")

    assert page.status_code == 422
    assert "<script>alert(1)" not in page.text
    assert input_value(page.text, "email") == typed


async def test_browser_form_post_without_address_says_it_is_required(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    page = await browser_signup(client, email="", newsletters="weekly")

    assert page.status_code == 422
    assert is_html(page)
    assert "This field is required." in page.text


async def test_browser_form_post_with_redirect_after_signup_is_303_to_it(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    await set_newsletter(
        db,
        "weekly",
        redirect_after_signup="https://site.example/thanks",
        allowed_origins=["https://site.example"],
    )

    page = await browser_signup(client, email="reader@example.com", newsletters="weekly")
    api = await signup(client, "other@example.com", "weekly")

    assert page.status_code == 303
    assert page.headers["location"] == "https://site.example/thanks"
    assert api.status_code == 202  # JSON clients get JSON, not a redirect
    assert await count(db, Subscriber) == 2


async def test_browser_form_post_with_filled_honeypot_gets_the_same_thank_you_page(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")

    real = await browser_signup(client, email="reader@example.com", newsletters="weekly")
    bot = await browser_signup(
        client, email="victim@example.com", newsletters="weekly", website="http://spam.example"
    )

    assert bot.status_code == real.status_code == 200
    assert bot.text == real.text
    assert list(await statuses(client, db)) == ["reader@example.com"]
    await deliver(worker)
    assert [m.rcpt_tos for m in smtp.sink.received] == [["reader@example.com"]]


# ---------------------------------------------------------------- unsubscribe


async def test_unsubscribe_page_get_shows_a_button_and_changes_nothing(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await active_reader(client, db, smtp, worker, "weekly")
    token = (await manage_path(client, db, settings)).removeprefix("/manage/")

    page = await client.get(f"/unsubscribe/{token}")
    one = await client.get(f"/unsubscribe/{token}", params={"newsletter": "weekly"})

    assert page.status_code == 200
    assert f'action="/unsubscribe/{token}"' in page.text
    assert re.search(r"<button[^>]*>\s*Unsubscribe", page.text)
    assert one.status_code == 200
    assert "The Weekly" in one.text
    assert f'action="/unsubscribe/{token}?newsletter=weekly"' in one.text
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}


async def test_unsubscribe_post_unsubscribes_from_everything(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await active_reader(client, db, smtp, worker, "weekly", "daily")
    token = (await manage_path(client, db, settings)).removeprefix("/manage/")

    page = await client.post(f"/unsubscribe/{token}")
    again = await client.post(f"/unsubscribe/{token}")

    assert page.status_code == 200
    assert "You have been unsubscribed" in page.text
    assert again.status_code == 200
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "unsubscribed", "daily": "unsubscribed"}
    }


async def test_a_double_clicked_save_is_a_page_for_every_click(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    """Saves that add the same newsletter at once raced on its unique key (PostgreSQL): some
    answered an API's JSON 409 to a reader. Each click gets the page, and one subscription."""
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily", opt_in="single")
    await active_reader(client, db, smtp, worker, "weekly")
    path = await manage_path(client, db, settings)
    for _ in range(3):
        answers = await asyncio.gather(
            *(
                client.post(path, data={"newsletters": ["weekly", "daily"]}, headers=BROWSER)
                for _ in range(8)
            )
        )
        assert {a.status_code for a in answers} == {200}, [a.text[:200] for a in answers]
        assert all(is_html(a) for a in answers)
        assert await statuses(client, db) == {
            "reader@example.com": {"weekly": "active", "daily": "active"}
        }
        # Untick daily again, for the next round of concurrent saves.
        untick = await client.post(path, data={"newsletters": ["weekly"]}, headers=BROWSER)
        assert untick.status_code == 200


async def test_unsubscribe_post_with_newsletter_leaves_the_others(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await active_reader(client, db, smtp, worker, "weekly", "daily")
    token = (await manage_path(client, db, settings)).removeprefix("/manage/")

    page = await client.post(f"/unsubscribe/{token}", params={"newsletter": "daily"})

    assert page.status_code == 200
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "active", "daily": "unsubscribed"}
    }


async def test_welcome_mail_unsubscribe_header_points_at_the_reader_pages(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await active_reader(client, db, smtp, worker, "weekly")
    await deliver(worker)
    welcome = smtp.sink.received[-1]
    https = welcome.message["List-Unsubscribe"].split(",")[0].strip(" <>")
    path = https.removeprefix("http://testserver")
    assert path.startswith("/unsubscribe/")

    page = await client.get(path)
    posted = await client.post(path)

    assert page.status_code == 200
    assert posted.status_code == 200
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "unsubscribed"}}


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unsubscribe_with_a_forged_token_is_404(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    method: str,
) -> None:
    await make_newsletter(db, "weekly")
    await active_reader(client, db, smtp, worker, "weekly")
    [item] = await subscribers(client, db)
    forged = manage_token(["some-other-key"], item["id"])

    page = await client.request(method, f"/unsubscribe/{forged}")

    assert page.status_code == 404
    assert is_html(page)
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}


# ---------------------------------------------------------------- the preference centre


async def test_manage_page_lists_every_public_newsletter_with_its_status(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")
    await make_newsletter(db, "monthly", name="The Monthly")
    await make_newsletter(db, "old", name="The Archive")
    await active_reader(client, db, smtp, worker, "weekly")
    await signup(client, "reader@example.com", "daily")
    await set_newsletter(db, "old", archived_at=utcnow())

    page = await client.get(await manage_path(client, db, settings))

    assert page.status_code == 200
    assert is_html(page)
    items = re.findall(r"<li>(.*?)</li>", page.text, flags=re.S)
    shown = {
        re.search(r"<strong>(.*?)</strong>", item).group(1): (  # type: ignore[union-attr]
            re.search(r"Status: ([\w ]+)", item).group(1),  # type: ignore[union-attr]
            "checked" in item,
        )
        for item in items
    }
    assert shown == {
        "The Weekly": ("active", True),
        "The Daily": ("pending", False),  # unconfirmed: Save must not confirm it unasked
        "The Monthly": ("not subscribed", False),
    }
    assert "reader@example.com" in page.text


async def test_manage_post_with_checkboxes_saves_the_choice(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await make_newsletter(db, "monthly")
    await active_reader(client, db, smtp, worker, "weekly", "daily")
    path = await manage_path(client, db, settings)

    page = await client.post(path, data={"newsletters": ["daily", "monthly"]})

    assert page.status_code == 200
    assert "Your preferences have been saved." in page.text
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "unsubscribed", "daily": "active", "monthly": "active"}
    }
    reloaded = await client.get(path)
    assert "Status: unsubscribed" in reloaded.text


async def test_manage_post_unsubscribe_all_unsubscribes_from_everything(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await active_reader(client, db, smtp, worker, "weekly", "daily")
    path = await manage_path(client, db, settings)

    page = await client.post(
        path, data={"action": "unsubscribe_all", "newsletters": ["weekly", "daily"]}
    )

    assert page.status_code == 200
    assert await statuses(client, db) == {
        "reader@example.com": {"weekly": "unsubscribed", "daily": "unsubscribed"}
    }


async def test_manage_link_of_the_already_subscribed_mail_opens_the_preference_centre(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await active_reader(client, db, smtp, worker, "weekly")
    welcome_count = await deliver(worker)
    assert welcome_count == 1
    welcome = smtp.sink.received[-1]
    https = welcome.message["List-Unsubscribe"].split(",")[0].strip(" <>")
    token = https.removeprefix("http://testserver/unsubscribe/").split("?")[0]

    page = await client.get(f"/manage/{token}")

    assert page.status_code == 200
    assert "The Weekly" in page.text
    assert f"/manage/{token}" == await manage_path(client, db, settings)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_manage_with_a_bad_token_is_404(
    client: httpx.AsyncClient, db: Database, method: str
) -> None:
    data = {"action": "unsubscribe_all"} if method == "POST" else None

    page = await client.request(method, "/manage/" + "a" * 32 + ".bad-signature", data=data)

    assert page.status_code == 404
    assert is_html(page)


@pytest.mark.parametrize("newsletter", ["no-such-list", "week\u0000ly"], ids=["unknown", "nul"])
async def test_unsubscribe_post_for_an_unknown_newsletter_is_404_and_changes_nothing(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
    newsletter: str,
) -> None:
    await make_newsletter(db, "weekly")
    await active_reader(client, db, smtp, worker, "weekly")
    token = (await manage_path(client, db, settings)).removeprefix("/manage/")

    page = await client.post(f"/unsubscribe/{token}", params={"newsletter": newsletter})

    assert page.status_code == 404
    assert is_html(page)
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}


async def test_unsubscribe_page_for_a_list_that_is_gone_is_404_not_everything(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    await active_reader(client, db, smtp, worker, "weekly")
    token = (await manage_path(client, db, settings)).removeprefix("/manage/")
    page = await client.get(f"/unsubscribe/{token}", params={"newsletter": "no-such-list"})
    assert page.status_code == 404
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}


async def test_manage_post_with_a_bare_string_keeps_that_one_and_junk_changes_nothing(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await active_reader(client, db, smtp, worker, "weekly")
    path = await manage_path(client, db, settings)
    kept = await client.post(path, json={"newsletters": "weekly"})
    assert kept.status_code == 200
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}
    junk = await client.post(path, json={"newsletters": {"weekly": True}})
    assert junk.status_code == 422
    assert await statuses(client, db) == {"reader@example.com": {"weekly": "active"}}


async def test_form_page_offers_the_typo_suggestion(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    page = await client.post(
        "/v1/subscriptions",
        data={"email": "reader@gmial.com", "newsletters": "weekly"},
        headers=BROWSER,
    )
    assert page.status_code == 422
    assert "Please, enter correct email address" in page.text
    assert "Did you mean reader@gmail.com?" in page.text
