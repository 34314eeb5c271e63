"""Pages and mail in the newsletter's language (English and Ukrainian), English as fallback."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx
import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po
from jinja2 import DictLoader, Environment
from sqlalchemy import update

from service import i18n
from service.config import PROJECT_ROOT
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Newsletter
from tests.conftest import SMTPServer, deliver, make_newsletter

THANKS = "Thank you for signing up for this newsletter. We've sent you a confirmation email."
BROWSER = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
UK_CATALOGUE = PROJECT_ROOT / "translations" / "uk" / "LC_MESSAGES" / "messages.po"


async def set_language(db: Database, slug: str, language: str) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(Newsletter).where(Newsletter.slug == slug).values(language=language)
        )


def link(text: str, path: str) -> str:
    found = re.search(rf"http://testserver(/{path}/[^\s\"<>]+)", text)
    assert found, f"no /{path}/ link in {text!r}"
    return html.unescape(found.group(1))


def lang_of(page: str) -> str:
    found = re.search(r'<html lang="([^"]+)"', page)
    assert found
    return found.group(1)


async def test_ukrainian_newsletter_gets_ukrainian_mail_and_pages(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="Щотижневик")
    await set_language(db, "weekly", "uk")

    answer = await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["weekly"]}
    )
    # The API's JSON is the contract: it stays English.
    assert answer.status_code == 202
    assert answer.json()["message"] == THANKS

    await deliver(worker)
    [mail] = smtp.sink.received
    assert mail.message["Subject"] == "Підтвердьте підписку: Щотижневик"
    assert mail.message["Content-Language"] == "uk"
    text = mail.text()
    assert "Щоб підтвердити, відкрийте це посилання:" in text
    assert "Якщо ви цього не робили" in text
    assert "To confirm" not in text
    assert 'lang="uk"' in mail.html()
    assert "Підтвердити підписку" in mail.html()
    path = link(text, "confirm")
    assert path == link(mail.html(), "confirm")

    page = await client.get(path)
    assert page.status_code == 200
    assert lang_of(page.text) == "uk"
    assert page.headers["content-language"] == "uk"
    assert "Підтвердьте підписку" in page.text
    assert re.search(r"<button type=\"submit\">Підтвердити</button>", page.text)
    assert "Confirm your subscription" not in page.text

    confirmed = await client.post(path)
    assert confirmed.status_code == 200
    assert "Вашу підписку підтверджено" in confirmed.text
    assert "Your subscription is confirmed" not in confirmed.text

    await deliver(worker)
    welcome = smtp.sink.received[-1]
    assert welcome.message["Subject"] == "Ласкаво просимо: Щотижневик"
    assert "Тепер ви отримуватимете:" in welcome.text()
    manage = await client.get(link(welcome.text(), "manage"))
    # Not tied to one newsletter: the reader's language, else the browser's.
    assert lang_of(manage.text) == "en"
    manage_uk = await client.get(
        link(welcome.text(), "manage"), headers={"accept-language": "uk-UA,uk;q=0.9,en;q=0.5"}
    )
    assert lang_of(manage_uk.text) == "uk"
    assert "Ваші підписки" in manage_uk.text
    assert "Стан: активна" in manage_uk.text


async def test_ukrainian_form_post_shows_the_error_in_ukrainian(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="Щотижневик")
    await set_language(db, "weekly", "uk")

    page = await client.post(
        "/v1/subscriptions", data={"email": "nope", "newsletters": "weekly"}, headers=BROWSER
    )
    api = await client.post("/v1/subscriptions", json={"email": "nope", "newsletters": ["weekly"]})

    assert page.status_code == 422
    assert lang_of(page.text) == "uk"
    assert "Будь ласка, введіть правильну адресу електронної пошти" in page.text
    assert "Введіть свою електронну адресу, щоб підписатися" in page.text
    assert api.json()["errors"][0]["message"] == "Please, enter correct email address"


async def test_subscriber_language_chooses_the_manage_page_language(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly", opt_in="single")

    await client.post(
        "/v1/subscriptions",
        json={"email": "reader@example.com", "newsletters": ["weekly"], "language": "uk"},
    )
    await deliver(worker)
    welcome = smtp.sink.received[-1]
    assert welcome.message["Subject"] == "Welcome to The Weekly"  # the newsletter's language
    page = await client.get(link(welcome.text(), "manage"), headers={"accept-language": "en"})

    assert lang_of(page.text) == "uk"
    assert "Ваші підписки" in page.text


@pytest.mark.parametrize(
    ("accept", "expected", "title"),
    [
        ("uk", "uk", "Це посилання недійсне"),
        ("fr-FR,uk;q=0.5", "uk", "Це посилання недійсне"),
        ("uk;q=0.2,en;q=0.8", "en", "This link is not valid"),
        ("fr", "en", "This link is not valid"),
        ("", "en", "This link is not valid"),
    ],
)
async def test_pages_without_a_newsletter_follow_accept_language(
    client: httpx.AsyncClient, accept: str, expected: str, title: str
) -> None:
    page = await client.get("/confirm/unknown-token", headers={"accept-language": accept})

    assert page.status_code == 404
    assert lang_of(page.text) == expected
    assert title in page.text


async def test_newsletter_in_a_language_we_lack_gets_english(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="Die Woche")
    await set_language(db, "weekly", "de")

    page = await client.get("/subscribe/weekly", headers={"accept-language": "uk"})
    await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["weekly"]}
    )
    await deliver(worker)

    assert lang_of(page.text) == "en"
    assert "Enter your email to subscribe" in page.text
    assert smtp.sink.received[0].message["Subject"] == (
        "Please confirm your subscription to Die Woche"
    )


def test_a_string_missing_from_the_catalogue_falls_back_to_english() -> None:
    env = Environment(
        loader=DictLoader(
            {
                "page": "{{ _('Subscribe') }} | {{ _('A sentence no catalogue has') }} | "
                "{% trans name=name %}Hello {{ name }}, nobody translated this{% endtrans %}"
            }
        ),
        autoescape=True,
    )
    i18n.install(env)

    rendered = env.get_template("page").render(lang="uk", name="<b>Ada</b>")

    assert rendered == (
        "Підписатися | A sentence no catalogue has | "
        "Hello &lt;b&gt;Ada&lt;/b&gt;, nobody translated this"
    )


def test_language_tags_are_matched_to_the_catalogues() -> None:
    assert i18n.supported("uk-UA") == "uk"
    assert i18n.supported("UK_ua") == "uk"
    assert i18n.supported("en-GB") == "en"
    assert i18n.supported("de") is None
    assert i18n.negotiate("de-DE, uk;q=0.7, en;q=0.3") == "uk"
    assert i18n.negotiate("uk;q=0, en") == "en"
    assert i18n.negotiate("garbage;q=x") == "en"


def extracted_messages() -> dict[str, list[str]]:
    """What `pybabel extract -F babel.cfg` finds in the sources, by message id."""
    with (PROJECT_ROOT / "babel.cfg").open() as handle:
        method_map, options_map = parse_mapping_cfg(handle)
    found: dict[str, list[str]] = {}
    for filename, _line, message, _comments, _context in extract_from_dir(
        str(PROJECT_ROOT), method_map, options_map
    ):
        ids = message if isinstance(message, tuple) else (message,)
        for msgid in ids:
            if msgid:
                found.setdefault(msgid, []).append(filename)
    return found


def test_ukrainian_catalogue_translates_every_string_of_the_templates() -> None:
    extracted = extracted_messages()
    with Path(UK_CATALOGUE).open("rb") as handle:
        catalogue = read_po(handle, locale="uk")
    translated = {m.id: m for m in catalogue if m.id}

    assert len(extracted) > 50
    missing = sorted(set(extracted) - set(translated))
    assert not missing, f"run pybabel extract/update, then translate: {missing}"
    stale = sorted(set(translated) - set(extracted))
    assert not stale, f"no longer in the templates: {stale}"
    for msgid, message in translated.items():
        assert isinstance(msgid, str) and isinstance(message.string, str)
        assert message.string.strip(), f"untranslated: {msgid!r}"
        assert not message.fuzzy, f"fuzzy: {msgid!r}"
        placeholders = re.compile(r"%\(\w+\)s")
        assert sorted(placeholders.findall(msgid)) == sorted(
            placeholders.findall(message.string)
        ), f"placeholders differ: {msgid!r}"
