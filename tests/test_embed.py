"""The embeddable form, CORS per newsletter, redirects bounded by allowed origins, escaping."""

from __future__ import annotations

import base64
import hashlib
import html
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from service.app import create_app
from service.config import Settings
from service.db import Database
from service.mail.worker import DeliveryWorker
from service.models import Newsletter, utcnow
from service.origins import origin_of, safe_redirect
from tests.conftest import SMTPServer, deliver, make_newsletter
from tests.test_admin import make_key

THANKS = "Thank you for signing up for this newsletter. We've sent you a confirmation email."
INVALID_EMAIL = "Please, enter correct email address"
SITE = "https://site.example"
BROWSER = {"accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
HOSTILE = "<script>alert(1)</script>"


async def configure(db: Database, slug: str, **values: Any) -> None:
    async with db.transaction() as session:
        await session.execute(update(Newsletter).where(Newsletter.slug == slug).values(**values))


def link(text: str, path: str) -> str:
    found = re.search(rf"http://testserver(/{path}/[^\s\"<>]+)", text)
    assert found, f"no /{path}/ link in {text!r}"
    return html.unescape(found.group(1))


def csp(answer: httpx.Response) -> dict[str, str]:
    policy = answer.headers["content-security-policy"]
    return {
        name: value.strip()
        for name, _, value in (part.strip().partition(" ") for part in policy.split(";"))
    }


def sha256_source(content: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(content.encode()).digest()).decode() + "'"


# ---------------------------------------------------------------- the embedded form


async def test_embed_page_is_a_self_contained_signup_form(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")

    page = await client.get("/embed/weekly")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "The Weekly" in text
    assert "Enter your email to subscribe" in text
    assert "* indicates required" in text
    assert re.search(r'<label for="email">Email address \*</label>', text)
    assert re.search(r'<input type="email" id="email" name="email"[^>]* required', text)
    assert re.search(r"<button type=\"submit\">Subscribe</button>", text)
    assert 'action="/v1/subscriptions"' in text and 'method="post"' in text
    assert 'data-newsletter="weekly"' in text
    assert '<input type="hidden" name="newsletters" value="weekly">' in text
    assert 'aria-live="polite"' in text
    pending = re.search(r'data-message-pending="([^"]*)"', text)
    assert pending and html.unescape(pending.group(1)) == THANKS
    # Nothing from anywhere else: no external script, style, image or font.
    markup = re.sub(r"<script>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", markup)
    assert "<link" not in markup
    # The script that answers in place is inline, and the CSP lets exactly it run.
    [script] = re.findall(r"<script>(.*?)</script>", text, flags=re.S)
    assert "fetch(" in script and "/v1/subscriptions" in script
    assert csp(page)["script-src"] == sha256_source(script)
    [style] = re.findall(r"<style>(.*?)</style>", text, flags=re.S)
    assert csp(page)["style-src"] == sha256_source(style)
    assert csp(page)["default-src"] == "'none'"


async def test_embed_page_may_be_framed_by_the_newsletters_sites_only(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "open")
    await configure(db, "weekly", allowed_origins=[SITE, "http://localhost:8080/"])

    limited = await client.get("/embed/weekly")
    anywhere = await client.get("/embed/open")

    for page in (limited, anywhere):
        assert page.status_code == 200
        assert "x-frame-options" not in page.headers
    assert csp(limited)["frame-ancestors"] == "http://localhost:8080 https://site.example"
    assert csp(anywhere)["frame-ancestors"] == "*"


async def test_reader_pages_refuse_to_be_framed(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", allowed_origins=[SITE])
    await client.post(
        "/v1/subscriptions", json={"email": "a@example.com", "newsletters": ["weekly"]}
    )

    for path in ("/confirm/not-a-token", "/manage/not-a-token"):
        page = await client.get(path)
        assert page.headers["x-frame-options"] == "DENY"
        assert csp(page)["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("slug", ["nope", "old"])
async def test_embed_page_of_unknown_or_archived_newsletter_is_404(
    client: httpx.AsyncClient, db: Database, slug: str
) -> None:
    await make_newsletter(db, "old", name="The Old One")
    await configure(db, "old", archived_at=utcnow())

    page = await client.get(f"/embed/{slug}")

    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "This sign-up form is not available" in page.text
    assert "The Old One" not in page.text


async def test_embedded_form_without_js_answers_in_the_frame(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    await configure(db, "weekly", allowed_origins=[SITE])
    form = {"email": "not-an-address", "newsletters": "weekly", "embed": "1", "website": ""}

    again = await client.post("/v1/subscriptions", data=form, headers=BROWSER)
    done = await client.post(
        "/v1/subscriptions", data={**form, "email": "reader@example.com"}, headers=BROWSER
    )

    assert again.status_code == 422
    assert INVALID_EMAIL in again.text
    assert 'value="not-an-address"' in again.text
    assert 'data-newsletter="weekly"' in again.text  # the small embedded form, not the page
    assert 'aria-invalid="true"' in again.text
    assert csp(again)["frame-ancestors"] == SITE
    assert done.status_code == 200
    assert THANKS in html.unescape(done.text)
    assert csp(done)["frame-ancestors"] == SITE


async def test_subscribe_script_is_served_as_javascript(client: httpx.AsyncClient) -> None:
    script = await client.get("/static/subscribe.js")

    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "form[data-newsletter]" in script.text
    assert "aria-live" in script.text


# ---------------------------------------------------------------- CORS


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }


async def test_preflight_from_an_allowed_origin_is_answered(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", allowed_origins=[SITE + "/"])

    answer = await client.options("/v1/subscriptions", headers=preflight_headers(SITE))

    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == SITE
    assert answer.headers["access-control-allow-methods"] == "POST"
    assert answer.headers["access-control-allow-headers"].lower() == "content-type"
    assert int(answer.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in answer.headers
    assert "Origin" in answer.headers["vary"]


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://site.example", "https://site.example:8443"]
)
async def test_preflight_from_another_origin_gets_no_cors_headers(
    client: httpx.AsyncClient, db: Database, origin: str
) -> None:
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", allowed_origins=[SITE])

    answer = await client.options("/v1/subscriptions", headers=preflight_headers(origin))

    assert answer.status_code >= 400
    assert not [h for h in answer.headers if h.startswith("access-control-")]


async def test_signup_from_an_allowed_origin_is_readable_by_the_page(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", allowed_origins=[SITE])
    body = {"email": "reader@example.com", "newsletters": ["weekly"]}

    allowed = await client.post("/v1/subscriptions", json=body, headers={"origin": SITE})
    refused = await client.post(
        "/v1/subscriptions",
        json={**body, "email": "other@example.com"},
        headers={"origin": "https://evil.example"},
    )
    invalid = await client.post(
        "/v1/subscriptions", json={**body, "email": "nope"}, headers={"origin": SITE}
    )

    assert allowed.status_code == 202
    assert allowed.json()["message"] == THANKS
    assert allowed.headers["access-control-allow-origin"] == SITE
    assert "access-control-allow-credentials" not in allowed.headers
    assert "Origin" in allowed.headers["vary"]
    # The request is served (a plain form post from anywhere is too), unreadable by the page.
    assert refused.status_code == 202
    assert "access-control-allow-origin" not in refused.headers
    assert "Origin" in refused.headers["vary"]
    # Field errors reach the page too, so it can show them.
    assert invalid.status_code == 422
    assert invalid.headers["access-control-allow-origin"] == SITE
    assert invalid.json()["errors"][0]["message"] == INVALID_EMAIL


async def test_archived_newsletters_allow_no_origin(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "old")
    await configure(db, "old", allowed_origins=[SITE], archived_at=utcnow())

    answer = await client.options("/v1/subscriptions", headers=preflight_headers(SITE))

    assert "access-control-allow-origin" not in answer.headers


async def test_allowed_origins_are_read_again_after_the_cache_time(
    app: FastAPI, client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    before = await client.options("/v1/subscriptions", headers=preflight_headers(SITE))
    await configure(db, "weekly", allowed_origins=[SITE])
    cached = await client.options("/v1/subscriptions", headers=preflight_headers(SITE))
    app.state.allowed_origins.ttl = 0  # as if the cache time had passed
    after = await client.options("/v1/subscriptions", headers=preflight_headers(SITE))

    assert "access-control-allow-origin" not in before.headers
    assert "access-control-allow-origin" not in cached.headers
    assert after.headers["access-control-allow-origin"] == SITE


async def test_other_paths_get_no_cors_headers(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", allowed_origins=[SITE])

    admin = await client.get("/v1/admin/newsletters", headers={"origin": SITE})
    page = await client.get("/embed/weekly", headers={"origin": SITE})

    assert "access-control-allow-origin" not in admin.headers
    assert "access-control-allow-origin" not in page.headers


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://site.example/thanks?x=1", "https://site.example/thanks?x=1"),
        ("https://SITE.example:443/welcome", "https://SITE.example:443/welcome"),
        ("http://site.example:8443/", "http://site.example:8443/"),
        ("https://site.example@evil.example/", None),  # reads as site.example to people
        ("//evil.example/", None),
        ("/relative/path", None),
        ("javascript:alert(1)", None),
        ("https:\\\\evil.example", None),
        ("https://site.example/\r\nSet-Cookie: a=b", None),
        ("", None),
        (None, None),
    ],
)
def test_a_redirect_is_an_absolute_http_url_that_reads_as_what_it_is(
    url: str | None, expected: str | None
) -> None:
    assert safe_redirect(url) == expected


def test_origins_are_normalised() -> None:
    assert origin_of("HTTPS://Site.Example:443/path") == "https://site.example"
    assert origin_of("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert origin_of("http://[::1]:8000/") == "http://[::1]:8000"
    assert origin_of("https://bücher.example") == "https://xn--bcher-kva.example"
    assert origin_of("https://a;b.example") is None  # would break out of a CSP source
    assert origin_of("ftp://site.example") is None


async def confirmation_path(
    client: httpx.AsyncClient, smtp: SMTPServer, worker: DeliveryWorker
) -> str:
    answer = await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["weekly"]}
    )
    assert answer.status_code == 202
    await deliver(worker)
    return link(smtp.sink.received[-1].text(), "confirm")


async def test_confirm_redirects_to_a_url_on_an_allowed_origin(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", allowed_origins=[SITE], redirect_after_confirm=SITE + "/welcome")
    path = await confirmation_path(client, smtp, worker)

    answer = await client.post(path)

    assert answer.status_code == 303
    assert answer.headers["location"] == SITE + "/welcome"


async def test_confirm_redirects_to_the_configured_url_whatever_the_allowed_origins(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    """design: POST /confirm/{token} shows the page "or 303 to the redirect URL": the URL is
    set by ops, so it is honoured as set, not only on the embedding sites."""
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", redirect_after_confirm="https://other.example/welcome")
    path = await confirmation_path(client, smtp, worker)

    answer = await client.post(path)

    assert answer.status_code == 303
    assert answer.headers["location"] == "https://other.example/welcome"


async def test_confirm_ignores_a_stored_redirect_that_does_not_read_as_what_it_is(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    # Refused by the admin API; one stored by other means is still never followed.
    await make_newsletter(db, "weekly")
    await configure(db, "weekly", redirect_after_confirm="https://site.example@evil.example/")
    path = await confirmation_path(client, smtp, worker)

    answer = await client.post(path)

    assert answer.status_code == 200
    assert "location" not in answer.headers
    assert "Your subscription is confirmed" in answer.text


async def test_signup_form_post_redirects_to_the_configured_url(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    created = await client.post(
        "/v1/admin/newsletters",
        json={"slug": "weekly", "name": "W", "redirect_after_signup": "https://site.example/t"},
        headers=admin,
    )
    assert created.status_code == 201, created.text

    answer = await client.post(
        "/v1/subscriptions",
        data={"email": "reader@example.com", "newsletters": "weekly"},
        headers=BROWSER,
    )

    assert answer.status_code == 303
    assert answer.headers["location"] == "https://site.example/t"
    # A script's JSON post is answered as always.
    api = await client.post(
        "/v1/subscriptions", json={"email": "other@example.com", "newsletters": ["weekly"]}
    )
    assert api.status_code == 202


async def test_a_redirect_url_that_would_never_be_followed_is_refused(
    client: httpx.AsyncClient, db: Database
) -> None:
    admin = await make_key(db)
    for url in ("https://site.example@evil.example/", "//evil.example/", "javascript:x"):
        answer = await client.post(
            "/v1/admin/newsletters",
            json={"slug": "weekly", "name": "W", "redirect_after_confirm": url},
            headers=admin,
        )
        assert answer.status_code == 422, (url, answer.text)
        assert answer.json()["errors"][0]["field"] == "redirect_after_confirm"


# ---------------------------------------------------------------- escaping


def assert_escaped(page: str) -> None:
    assert HOSTILE not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_hostile_names_show_as_text_on_every_page_and_in_mail(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    smtp: SMTPServer,
    worker: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly", name=HOSTILE)
    await make_newsletter(db, "daily", name="The Daily")
    await configure(db, "weekly", from_name="<img src=x onerror=alert(2)>", description=HOSTILE)
    reader = "<script>alert('reader')</script>"

    embed = await client.get("/embed/weekly")
    signup = await client.get("/subscribe/weekly")
    thanks = await client.post(
        "/v1/subscriptions",
        data={"email": "reader@example.com", "newsletters": ["weekly", "daily"], "name": reader},
        headers=BROWSER,
    )
    assert thanks.status_code == 200
    await deliver(worker)
    confirmation = smtp.sink.received[-1]
    path = link(confirmation.text(), "confirm")
    confirm = await client.get(path)
    confirmed = await client.post(path)
    await deliver(worker)
    welcome = smtp.sink.received[-1]
    token = link(welcome.text(), "manage").removeprefix("/manage/")
    manage = await client.get(f"/manage/{token}")
    unsubscribe = await client.get(f"/unsubscribe/{token}", params={"newsletter": "weekly"})

    for page in (embed, signup, thanks, confirm, confirmed, manage, unsubscribe):
        assert HOSTILE not in page.text and "<img src=x" not in page.text
        assert "&lt;img src=x onerror=alert(2)&gt;" in page.text  # the sender, as text
    for page in (embed, signup, confirm, confirmed, manage, unsubscribe):
        assert_escaped(page.text)
    for mail in (confirmation, welcome):
        assert_escaped(mail.html())
        assert HOSTILE in mail.message["Subject"]  # plain text, not HTML
        # Nothing the sign-up typed is repeated to the address it named.
        assert "reader" not in mail.text().replace("reader@example.com", "")
        assert "alert('reader')" not in mail.html() and "alert(&#39;reader&#39;)" not in mail.html()
    assert "alert('reader')" not in manage.text


async def test_dev_mailbox_lists_mail_with_links_escaped(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    maildir = tmp_path / "maildir"
    dev = settings.model_copy(update={"mail_url": f"maildir://{maildir}", "dev_mailbox": True})
    app = create_app(dev)
    await make_newsletter(db, "weekly", name=HOSTILE)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            await http.post(
                "/v1/subscriptions", json={"email": "a@example.com", "newsletters": ["weekly"]}
            )
            assert await deliver(DeliveryWorker(app.state.db, dev)) == 1

            listing = await http.get("/dev/mailbox")
            key = re.search(r'href="/dev/mailbox/([^"/]+)"', listing.text)
            assert key, listing.text
            one = await http.get(f"/dev/mailbox/{key.group(1)}")
            part = await http.get(f"/dev/mailbox/{key.group(1)}/html")
    finally:
        await app.state.db.dispose()

    assert listing.status_code == 200
    assert "Please confirm your subscription to" in listing.text
    assert_escaped(listing.text)
    assert re.search(r'<a href="http://testserver/confirm/[^"]+">', listing.text)
    assert one.status_code == 200
    assert_escaped(one.text)
    assert re.search(r'<a href="http://testserver/confirm/[^"]+">', one.text)
    assert f'src="/dev/mailbox/{key.group(1)}/html"' in one.text
    # The HTML part runs in a sandbox: no script of its own, no requests.
    assert part.status_code == 200
    assert "sandbox" in csp(part)
    assert csp(part)["default-src"] == "'none'"
