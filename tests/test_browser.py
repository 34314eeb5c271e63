"""End to end in headless Chromium: a form on another site, the mail, the reader pages.

The service runs under uvicorn on a real port; the "site" is a plain HTTP server on another
port (so another origin) whose page holds a `<form data-newsletter>` and loads
/static/subscribe.js from the service. These tests run on SQLite, the embedded default.
Screenshots of each page land in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import update

from service.app import create_app
from service.config import PROJECT_ROOT, Settings
from service.db import Database
from service.keys import create_key
from service.mail.worker import DeliveryWorker
from service.models import Confirmation, Newsletter, OutboxMessage, utcnow
from tests.conftest import SMTPServer, deliver, free_port, make_newsletter
from tests.conftest import TestDatabase as Backend

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
THANKS = "Thank you for signing up for this newsletter. We've sent you a confirmation email."
INVALID_EMAIL = "Please, enter correct email address"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

try:
    from playwright.async_api import Browser, Page, Request, async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


# ---------------------------------------------------------------- real servers


@dataclass
class LiveService:
    url: str
    settings: Settings
    worker: DeliveryWorker


@pytest.fixture
async def live(
    test_database: Backend, settings: Settings, db: Database
) -> AsyncIterator[LiveService]:
    """The app under uvicorn in a thread, on the test database; mail links point at it."""
    if test_database.backend != "sqlite":
        pytest.skip("the browser tests run on SQLite (the embedded default) only")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    live_settings = settings.model_copy(update={"base_url": url})
    app = create_app(live_settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio", ws="none"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    for _ in range(400):
        if server.started or not thread.is_alive():
            break
        await asyncio.sleep(0.025)
    assert server.started, "uvicorn did not start"
    try:
        yield LiveService(url, live_settings, DeliveryWorker(db, live_settings))
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 15)


class SiteHandler(BaseHTTPRequestHandler):
    pages: dict[str, str] = {}

    def do_GET(self) -> None:
        page = self.pages.get(self.path.split("?")[0])
        body = (page or "not found").encode()
        self.send_response(200 if page else 404)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Site:
    origin: str
    pages: dict[str, str]

    def url(self, path: str) -> str:
        return self.origin + path


@pytest.fixture
def site() -> Iterator[Site]:
    """Another origin: a plain static server for the pages that embed the form."""
    pages: dict[str, str] = {}
    handler = type("Handler", (SiteHandler,), {"pages": pages})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, name="site", daemon=True)
    thread.start()
    try:
        yield Site(f"http://127.0.0.1:{server.server_address[1]}", pages)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    if async_playwright is None:
        _unavailable("the playwright package is missing: pip install -e '.[test]'")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 390, "height": 844})
    context.set_default_timeout(10_000)
    opened = await context.new_page()
    try:
        yield opened
    finally:
        await context.close()


# ---------------------------------------------------------------- helpers


def host_page(service: str, *, checkboxes: bool = True) -> str:
    """A page of the newsletter's site with its own form, enhanced by subscribe.js."""
    choices = (
        """<fieldset><legend>Newsletters</legend>
        <label><input type="checkbox" name="newsletters" value="weekly" checked> The Weekly</label>
        <label><input type="checkbox" name="newsletters" value="daily" checked> The Daily</label>
        </fieldset>"""
        if checkboxes
        else '<input type="hidden" name="newsletters" value="weekly">'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Example site</title></head>
<body>
<form data-newsletter="weekly" action="{service}/v1/subscriptions" method="post">
  <label for="nl-email">Email address *</label>
  <input id="nl-email" type="email" name="email" required autocomplete="email">
  {choices}
  <button type="submit">Subscribe</button>
</form>
<p><a href="/elsewhere">Another link on the site</a></p>
<script src="{service}/static/subscribe.js"></script>
</body></html>"""


def frame_page(service: str, slug: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Example site</title></head>
<body><h1>Our newsletter</h1>
<iframe src="{service}/embed/{slug}" title="Newsletter sign-up" width="360" height="480"></iframe>
</body></html>"""


async def allow(db: Database, origin: str, *slugs: str) -> None:
    async with db.transaction() as session:
        await session.execute(
            update(Newsletter).where(Newsletter.slug.in_(slugs)).values(allowed_origins=[origin])
        )


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)


def mail_link(text: str, service: str, path: str) -> str:
    found = re.search(rf"{re.escape(service)}/{path}/[^\s\"<>]+", text)
    assert found, f"no {service}/{path}/ link in {text!r}"
    return found.group(0)


async def admin_statuses(db: Database, service: str, email: str) -> dict[str, str]:
    async with db.transaction() as session:
        key = (await create_key(session, "browser-test", "read")).key
    async with httpx.AsyncClient(base_url=service) as http:
        answer = await http.get(
            "/v1/admin/subscribers",
            params={"email": email},
            headers={"authorization": f"Bearer {key}"},
        )
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["items"]
    return {s["newsletter"]: s["status"] for s in item["subscriptions"]}


def count_signup_posts(page: Page) -> list[str]:
    posts: list[str] = []

    def record(request: Request) -> None:
        if request.method == "POST" and request.url.endswith("/v1/subscriptions"):
            posts.append(request.url)

    page.on("request", record)
    return posts


# ---------------------------------------------------------------- the journey


async def test_signup_on_another_site_confirm_and_manage_in_the_browser(
    live: LiveService, site: Site, page: Page, db: Database, smtp: SMTPServer
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")
    await allow(db, site.origin, "weekly", "daily")
    site.pages["/"] = host_page(live.url)
    posts = count_signup_posts(page)

    # Sign up on the site: the answer shows in place, no page load.
    await page.goto(site.url("/"))
    await page.evaluate("window.stillHere = true")
    await page.get_by_label("Email address").fill("reader@example.com")
    await page.get_by_role("button", name="Subscribe").click()
    await expect(page.get_by_role("status")).to_have_text(THANKS)
    assert page.url == site.url("/")
    assert await page.evaluate("window.stillHere") is True
    assert posts == [f"{live.url}/v1/subscriptions"]
    await screenshot(page, "1-site-signed-up")

    # The confirmation mail arrives; its link confirms in one visit (the page posts itself).
    assert await deliver(live.worker) == 1
    [confirmation] = smtp.sink.received
    assert confirmation.rcpt_tos == ["reader@example.com"]
    confirm_url = mail_link(confirmation.text(), live.url, "confirm")
    assert confirm_url in confirmation.html()
    await page.goto(confirm_url)
    await expect(page.get_by_role("heading", level=1)).to_have_text(
        "Your subscription is confirmed"
    )
    await expect(page.get_by_text("The Weekly", exact=True)).to_be_visible()
    assert page.url == confirm_url
    await screenshot(page, "2-confirmed")

    # The welcome mail's link opens the preference centre; leave one newsletter.
    assert await deliver(live.worker) == 1
    welcome = smtp.sink.received[-1]
    manage_url = mail_link(welcome.text(), live.url, "manage")
    await page.goto(manage_url)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Your subscriptions")
    await expect(page.get_by_label("The Daily")).to_be_checked()
    await screenshot(page, "3-manage")
    await page.get_by_label("The Daily").uncheck()
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("status")).to_have_text("Your preferences have been saved.")
    await expect(page.get_by_label("The Daily")).not_to_be_checked()
    await expect(page.get_by_label("The Weekly")).to_be_checked()
    await screenshot(page, "4-manage-saved")

    assert await admin_statuses(db, live.url, "reader@example.com") == {
        "weekly": "active",
        "daily": "unsubscribed",
    }


async def test_form_on_another_site_works_without_javascript(
    live: LiveService, site: Site, browser: Browser, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")
    await allow(db, site.origin, "weekly", "daily")
    site.pages["/"] = host_page(live.url)
    context = await browser.new_context(java_script_enabled=False)
    try:
        page = await context.new_page()
        await page.goto(site.url("/"))
        await page.get_by_label("Email address").fill("nojs@example.com")
        await page.get_by_role("button", name="Subscribe").click()

        await expect(page.get_by_role("status")).to_have_text(THANKS)
        assert page.url == f"{live.url}/v1/subscriptions"  # a plain post: a new page
        await screenshot(page, "5-nojs-thanks")

        # The embedded form without scripts: errors come back in the form itself.
        await page.goto(f"{live.url}/embed/weekly")
        await page.get_by_label("Email address").fill("nojs@example")
        await page.get_by_role("button", name="Subscribe").click()
        await expect(page.get_by_text(INVALID_EMAIL)).to_be_visible()
        await expect(page.get_by_label("Email address")).to_have_value("nojs@example")
        await screenshot(page, "6-nojs-embed-error")
    finally:
        await context.close()

    assert await admin_statuses(db, live.url, "nojs@example.com") == {
        "weekly": "pending",
        "daily": "pending",
    }


async def test_bad_address_shows_the_message_by_the_field_and_focuses_it(
    live: LiveService, site: Site, page: Page, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await make_newsletter(db, "daily", name="The Daily")
    await allow(db, site.origin, "weekly", "daily")
    site.pages["/"] = host_page(live.url)
    await page.goto(site.url("/"))
    email = page.get_by_label("Email address")

    await email.fill("reader@example")
    await page.get_by_role("button", name="Subscribe").click()

    error = page.locator("p.nl-error")
    await expect(error).to_have_text(INVALID_EMAIL)
    await expect(email).to_have_attribute("aria-invalid", "true")
    await expect(email).to_be_focused()
    described_by = await email.get_attribute("aria-describedby")
    assert described_by == await error.get_attribute("id")
    await expect(page.get_by_role("status")).to_have_text(INVALID_EMAIL)
    assert page.url == site.url("/")
    await screenshot(page, "7-site-bad-address")

    # No newsletter ticked: the message goes by the checkboxes.
    await email.fill("reader@example.com")
    await page.get_by_label("The Weekly").uncheck()
    await page.get_by_label("The Daily").uncheck()
    await page.get_by_role("button", name="Subscribe").click()
    await expect(page.locator("fieldset p.nl-error")).to_have_text("This field is required.")
    await expect(page.get_by_label("The Weekly")).to_be_focused()
    await expect(email).not_to_have_attribute("aria-invalid", "true")

    # Corrected: the errors go, the success shows.
    await page.get_by_label("The Weekly").check()
    await page.get_by_role("button", name="Subscribe").click()
    await expect(page.get_by_role("status")).to_have_text(THANKS)
    await expect(page.locator("p.nl-error")).to_have_count(0)


async def test_keyboard_only_signup(
    live: LiveService, site: Site, page: Page, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await allow(db, site.origin, "weekly")
    site.pages["/"] = host_page(live.url, checkboxes=False)
    await page.goto(site.url("/"))

    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Email address")).to_be_focused()
    await page.keyboard.type("keys@example.com")
    await page.keyboard.press("Enter")

    await expect(page.get_by_role("status")).to_have_text(THANKS)
    assert page.url == site.url("/")
    await expect(page.get_by_role("status")).to_be_focused()
    assert await admin_statuses(db, live.url, "keys@example.com") == {"weekly": "pending"}


async def test_a_second_submit_while_sending_is_ignored(
    live: LiveService, site: Site, page: Page, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await allow(db, site.origin, "weekly")
    site.pages["/"] = host_page(live.url, checkboxes=False)
    posts = count_signup_posts(page)
    await page.goto(site.url("/"))
    await page.get_by_label("Email address").fill("twice@example.com")

    disabled_while_sending = await page.evaluate(
        """() => {
            const form = document.querySelector("form[data-newsletter]");
            form.requestSubmit();
            const disabled = form.querySelector("button").disabled;
            form.requestSubmit();
            return disabled;
        }"""
    )

    assert disabled_while_sending is True
    await expect(page.get_by_role("status")).to_have_text(THANKS)
    await expect(page.get_by_role("button", name="Subscribe")).to_be_enabled()
    assert posts == [f"{live.url}/v1/subscriptions"]


async def test_embedded_form_in_a_frame_on_an_allowed_site(
    live: LiveService, site: Site, page: Page, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await allow(db, site.origin, "weekly")
    site.pages["/"] = frame_page(live.url, "weekly")
    await page.goto(site.url("/"))
    frame = page.frame_locator("iframe")

    await expect(frame.get_by_text("Enter your email to subscribe")).to_be_visible()
    await expect(frame.get_by_text("* indicates required")).to_be_visible()
    await frame.get_by_label("Email address").fill("framed@example")
    await frame.get_by_role("button", name="Subscribe").click()
    await expect(frame.locator("p.nl-error")).to_have_text(INVALID_EMAIL)
    await screenshot(page, "8-frame-error")
    await frame.get_by_label("Email address").fill("framed@example.com")
    await frame.get_by_role("button", name="Subscribe").click()
    await expect(frame.get_by_role("status")).to_have_text(THANKS)
    await screenshot(page, "9-frame-thanks")

    assert page.url == site.url("/")
    assert page.frames[1].url == f"{live.url}/embed/weekly"  # answered in place
    assert await admin_statuses(db, live.url, "framed@example.com") == {"weekly": "pending"}


async def test_embedded_form_refuses_a_frame_on_another_site(
    live: LiveService, site: Site, page: Page, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await allow(db, "https://the-real-site.example", "weekly")
    site.pages["/"] = frame_page(live.url, "weekly")

    await page.goto(site.url("/"))
    await page.wait_for_load_state("load")

    [_, framed] = page.frames
    assert not framed.url.startswith(live.url)  # Chromium shows its own error page instead
    await expect(page.frame_locator("iframe").get_by_text("Enter your email")).to_have_count(0)


async def test_reader_pages_work_without_javascript(
    live: LiveService, browser: Browser, db: Database, smtp: SMTPServer
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    async with httpx.AsyncClient(base_url=live.url) as http:
        for email in ("reader@example.com", "late@example.com"):
            answer = await http.post(
                "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"]}
            )
            assert answer.status_code == 202
    assert await deliver(live.worker) == 2
    links = {
        mail.rcpt_tos[0]: mail_link(mail.text(), live.url, "confirm") for mail in smtp.sink.received
    }
    context = await browser.new_context(java_script_enabled=False)
    try:
        page = await context.new_page()

        # Without scripts the confirm page waits for the button; the GET changed nothing.
        await page.goto(links["reader@example.com"])
        await expect(page.get_by_role("heading", level=1)).to_have_text("Confirm your subscription")
        await expect(page.get_by_text("From The Weekly")).to_be_visible()
        await screenshot(page, "10-nojs-confirm")
        assert await admin_statuses(db, live.url, "reader@example.com") == {"weekly": "pending"}
        await page.get_by_role("button", name="Confirm").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text(
            "Your subscription is confirmed"
        )
        assert await admin_statuses(db, live.url, "reader@example.com") == {"weekly": "active"}

        # Unsubscribe from the welcome mail's link: a page with a button, then done.
        assert await deliver(live.worker) == 1
        unsubscribe_url = mail_link(smtp.sink.received[-1].text(), live.url, "unsubscribe")
        await page.goto(unsubscribe_url)
        await expect(page.get_by_text("Stop receiving The Weekly?")).to_be_visible()
        await screenshot(page, "11-unsubscribe")
        await page.get_by_role("button", name="Unsubscribe").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text(
            "You have been unsubscribed"
        )
        await screenshot(page, "12-unsubscribed")
        assert await admin_statuses(db, live.url, "reader@example.com") == {
            "weekly": "unsubscribed"
        }

        # An expired link offers a new one.
        past = utcnow() - timedelta(days=30)
        async with db.transaction() as session:
            await session.execute(update(Confirmation).values(expires_at=past))
            await session.execute(update(OutboxMessage).values(created_at=past))
        await page.goto(links["late@example.com"])
        await expect(page.get_by_role("heading", level=1)).to_have_text("This link has expired")
        await screenshot(page, "13-expired")
        await page.get_by_role("button", name="Send me a new link").click()
        await expect(page.get_by_role("status")).to_have_text(THANKS)
    finally:
        await context.close()
    assert await deliver(live.worker) == 1
    assert smtp.sink.received[-1].rcpt_tos == ["late@example.com"]
    assert (
        mail_link(smtp.sink.received[-1].text(), live.url, "confirm") != links["late@example.com"]
    )


async def test_ukrainian_embed_page(live: LiveService, page: Page, db: Database) -> None:
    await make_newsletter(db, "weekly", name="Щотижневик")
    async with db.transaction() as session:
        await session.execute(update(Newsletter).values(language="uk"))
    await page.goto(f"{live.url}/embed/weekly")

    await page.get_by_label("Адреса електронної пошти").fill("reader@example")
    await page.get_by_role("button", name="Підписатися").click()

    await expect(page.locator("p.nl-error")).to_have_text(
        "Будь ласка, введіть правильну адресу електронної пошти"
    )
    await screenshot(page, "14-embed-uk")
    await page.get_by_label("Адреса електронної пошти").fill("reader@example.com")
    await page.get_by_role("button", name="Підписатися").click()
    await expect(page.get_by_role("status")).to_have_text(
        "Дякуємо, що підписалися на цю розсилку. Ми надіслали вам лист для підтвердження."
    )
