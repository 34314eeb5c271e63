"""Bot checks on every way in (design: "Any bot check that is switched on ... applies to every
way in"): the minimum form-fill time and a Turnstile/hCaptcha-style challenge."""

from __future__ import annotations

import asyncio
import html
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None

from service import botcheck
from service.app import create_app
from service.config import Settings
from service.db import Database
from service.models import OutboxMessage, Subscriber
from tests.conftest import TestDatabase as Backend
from tests.conftest import free_port, make_newsletter
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, SiteHandler, allow, host_page
from tests.test_ratelimit import BROWSER, service_with
from tests.test_signup_api import (
    ACTIVE,
    PENDING,
    THANKS,
    count,
    field_errors,
    problem,
    statuses,
)
from tests.test_signup_pages import input_value

SECRET = "verifier-secret"
GOOD = "good-token"
CHALLENGE = "Please complete the challenge."


# ---------------------------------------------------------------- a verifier on loopback


@dataclass
class Verifier:
    """A siteverify endpoint as Turnstile and hCaptcha answer it, served by uvicorn."""

    url: str
    calls: list[dict[str, str]] = field(default_factory=list)
    fail_with: int | None = None


@pytest.fixture(scope="module")
async def verifier_server() -> AsyncIterator[Verifier]:
    port = free_port()
    verifier = Verifier(f"http://127.0.0.1:{port}/siteverify")

    async def siteverify(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        verifier.calls.append(form)
        if verifier.fail_with:
            return PlainTextResponse("upstream trouble", status_code=verifier.fail_with)
        if form.get("secret") != SECRET:
            return JSONResponse({"success": False, "error-codes": ["invalid-input-secret"]})
        passed = form.get("response") == GOOD
        return JSONResponse(
            {"success": passed, "error-codes": [] if passed else ["invalid-input-response"]}
        )

    app = Starlette(routes=[Route("/siteverify", siteverify, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="verifier", daemon=True)
    thread.start()
    for _ in range(400):
        if server.started or not thread.is_alive():
            break
        await asyncio.sleep(0.025)
    assert server.started, "the verifier did not start"
    yield verifier
    server.should_exit = True
    await asyncio.to_thread(thread.join, 10)


@pytest.fixture
def verifier(verifier_server: Verifier) -> Verifier:
    verifier_server.calls.clear()
    verifier_server.fail_with = None
    return verifier_server


def challenge_on(verifier: Verifier) -> dict[str, Any]:
    return {"challenge_verify_url": verifier.url, "challenge_secret": SECRET}


async def nothing_stored(db: Database) -> None:
    assert await count(db, Subscriber) == 0
    assert await count(db, OutboxMessage) == 0


# ---------------------------------------------------------------- challenge


async def test_a_passing_challenge_token_signs_up_and_the_verifier_sees_the_client(
    db: Database, settings: Settings, verifier: Verifier
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **challenge_on(verifier)) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={
                "email": "reader@example.com",
                "newsletters": ["weekly"],
                "challenge_token": GOOD,
            },
        )
        assert answer.status_code == 202
        assert answer.json() == PENDING
        assert await statuses(service.client, db) == {"reader@example.com": {"weekly": "pending"}}
    assert verifier.calls == [{"secret": SECRET, "response": GOOD, "remoteip": "203.0.113.7"}]


@pytest.mark.parametrize("name", ["cf-turnstile-response", "h-captcha-response"])
async def test_the_widgets_own_field_names_are_accepted_from_a_browser_form(
    db: Database, settings: Settings, verifier: Verifier, name: str
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **challenge_on(verifier)) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            data={"email": "reader@example.com", "newsletters": "weekly", name: GOOD},
            headers=BROWSER,
        )
    assert answer.status_code == 200
    assert THANKS in html.unescape(answer.text)
    assert await count(db, Subscriber) == 1


async def test_a_signup_without_a_challenge_token_is_422_and_asks_nobody(
    db: Database, settings: Settings, verifier: Verifier
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **challenge_on(verifier)) as service:
        answer = await service.client.post(
            "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["weekly"]}
        )
    errors = field_errors(answer)
    assert errors["challenge"] == {
        "field": "challenge",
        "code": "challenge_failed",
        "message": CHALLENGE,
    }
    assert verifier.calls == []
    await nothing_stored(db)


async def test_a_failed_challenge_is_422_and_nothing_is_stored(
    db: Database, settings: Settings, verifier: Verifier
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **challenge_on(verifier)) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={"email": "reader@example.com", "newsletters": ["weekly"], "challenge_token": "x"},
        )
    assert field_errors(answer)["challenge"]["code"] == "challenge_failed"
    assert problem(answer, 422)["title"] == CHALLENGE
    assert len(verifier.calls) == 1
    await nothing_stored(db)


async def test_a_failed_challenge_in_a_browser_shows_the_form_again_with_the_message(
    db: Database, settings: Settings, verifier: Verifier
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **challenge_on(verifier)) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            data={"email": "reader@example.com", "newsletters": "weekly"},
            headers=BROWSER,
        )
    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("text/html")
    assert CHALLENGE in answer.text
    assert input_value(answer.text, "email") == "reader@example.com"
    await nothing_stored(db)


async def test_field_errors_come_first_and_do_not_spend_the_challenge_token(
    db: Database, settings: Settings, verifier: Verifier
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, **challenge_on(verifier)) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={"email": "not-an-address", "newsletters": ["weekly"], "challenge_token": GOOD},
        )
    assert field_errors(answer)["email"]["code"] == "invalid_email"
    assert verifier.calls == []


@pytest.mark.parametrize("trouble", ["down", "500"])
async def test_a_verifier_that_cannot_answer_fails_closed_with_503(
    db: Database, settings: Settings, verifier: Verifier, trouble: str
) -> None:
    await make_newsletter(db, "weekly")
    if trouble == "down":
        changes = {
            "challenge_verify_url": f"http://127.0.0.1:{free_port()}/siteverify",
            "challenge_secret": SECRET,
            "challenge_timeout": 2.0,
        }
    else:
        verifier.fail_with = 500
        changes = challenge_on(verifier)
    async with service_with(settings, **changes) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={
                "email": "reader@example.com",
                "newsletters": ["weekly"],
                "challenge_token": GOOD,
            },
        )
        page = await service.client.post(
            "/v1/subscriptions",
            data={"email": "reader@example.com", "newsletters": "weekly", "challenge_token": GOOD},
            headers=BROWSER,
        )
    body = problem(answer, 503)
    assert body["title"] == "The challenge could not be checked. Please try again."
    assert page.status_code == 503
    assert "The challenge could not be checked" in page.text
    await nothing_stored(db)


async def test_the_form_pages_carry_the_challenge_widget_when_a_site_key_is_set(
    db: Database, settings: Settings, verifier: Verifier
) -> None:
    await make_newsletter(db, "weekly")
    widget = {"challenge_site_key": "site-key-1", "challenge_widget_class": "h-captcha"}
    async with service_with(settings, **challenge_on(verifier), **widget) as service:
        page = await service.client.get("/subscribe/weekly")
        embed = await service.client.get("/embed/weekly")
    for answer in (page, embed):
        assert answer.status_code == 200
        assert '<div class="h-captcha" data-sitekey="site-key-1"' in answer.text


# ---------------------------------------------------------------- minimum fill time


async def test_the_form_token_endpoint_hands_out_a_fresh_signed_time(
    db: Database, settings: Settings
) -> None:
    async with service_with(settings) as service:
        answer = await service.client.get(
            "/v1/form-token", headers={"origin": "https://elsewhere.example"}
        )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "*"
    assert answer.headers["cache-control"] == "no-store"
    token = answer.json()["form_ts"]
    age = botcheck.form_token_age(settings, token)
    assert age is not None and abs(age) < 30


async def test_the_form_pages_carry_a_signed_form_time(db: Database, settings: Settings) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings) as service:
        for path in ("/subscribe/weekly", "/embed/weekly"):
            page = await service.client.get(path)
            token = input_value(page.text, "form_ts")
            assert botcheck.form_token_age(settings, token) is not None, path


async def test_a_form_posted_at_once_is_thanked_and_nothing_is_stored(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, min_fill_seconds=30) as service:
        page = await service.client.get("/subscribe/weekly")
        answer = await service.client.post(
            "/v1/subscriptions",
            data={
                "email": "reader@example.com",
                "newsletters": "weekly",
                "form_ts": input_value(page.text, "form_ts"),
            },
            headers=BROWSER,
        )
    assert answer.status_code == 200
    assert THANKS in html.unescape(answer.text)
    await nothing_stored(db)


async def test_a_form_kept_open_long_enough_signs_up(db: Database, settings: Settings) -> None:
    await make_newsletter(db, "weekly")
    shown = botcheck.form_token(settings, now=time.time() - 45)  # the page was shown 45 s ago
    async with service_with(settings, min_fill_seconds=30) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            data={"email": "reader@example.com", "newsletters": "weekly", "form_ts": shown},
            headers=BROWSER,
        )
        assert answer.status_code == 200
        assert await statuses(service.client, db) == {"reader@example.com": {"weekly": "pending"}}


async def test_a_json_client_waits_after_fetching_its_form_token(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings, min_fill_seconds=0.3) as service:
        token = (await service.client.get("/v1/form-token")).json()["form_ts"]
        hasty = await service.client.post(
            "/v1/subscriptions",
            json={"email": "hasty@example.com", "newsletters": ["weekly"], "form_ts": token},
        )
        await asyncio.sleep(0.5)
        patient = await service.client.post(
            "/v1/subscriptions",
            json={"email": "patient@example.com", "newsletters": ["weekly"], "form_ts": token},
        )
        assert hasty.json() == patient.json() == PENDING
        assert await statuses(service.client, db) == {"patient@example.com": {"weekly": "pending"}}


@pytest.mark.parametrize("case", ["missing", "forged", "other key", "future", "garbage"])
async def test_json_signups_without_a_good_form_time_look_accepted_and_store_nothing(
    db: Database, settings: Settings, case: str
) -> None:
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "news", opt_in="single")
    old = time.time() - 60
    tokens = {
        "missing": None,
        "forged": botcheck.form_token(settings, now=old)[:-2] + "AA",
        "other key": botcheck.form_token(settings.model_copy(update={"secret_keys": ["x"]}), old),
        "future": botcheck.form_token(settings, now=time.time() + 3600),
        "garbage": "not a token",
    }
    extra = {} if tokens[case] is None else {"form_ts": tokens[case]}
    async with service_with(settings, min_fill_seconds=3) as service:
        double = await service.client.post(
            "/v1/subscriptions",
            json={"email": "reader@example.com", "newsletters": ["weekly"], **extra},
        )
        single = await service.client.post(
            "/v1/subscriptions",
            json={"email": "reader@example.com", "newsletters": ["news"], **extra},
        )
    assert (double.status_code, double.json()) == (202, PENDING)
    assert (single.status_code, single.json()) == (200, ACTIVE)
    await nothing_stored(db)


async def test_a_form_time_signed_with_a_retired_key_still_counts(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    shown = botcheck.form_token(settings, now=time.time() - 60)
    rotated = ["the-new-key", *settings.secret_keys]
    async with service_with(settings, min_fill_seconds=3, secret_keys=rotated) as service:
        answer = await service.client.post(
            "/v1/subscriptions",
            json={"email": "reader@example.com", "newsletters": ["weekly"], "form_ts": shown},
        )
        assert answer.json() == PENDING
        assert await statuses(service.client, db) == {"reader@example.com": {"weekly": "pending"}}


async def test_without_a_minimum_fill_time_no_form_time_is_needed(
    db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    async with service_with(settings) as service:
        answer = await service.client.post(
            "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["weekly"]}
        )
        assert answer.json() == PENDING
        assert await statuses(service.client, db) == {"reader@example.com": {"weekly": "pending"}}


# ---------------------------------------------------------------- subscribe.js in a browser


@pytest.fixture
async def live_min_fill(
    test_database: Backend, settings: Settings, db: Database
) -> AsyncIterator[str]:
    """The app under uvicorn with a 1 s minimum fill time; its base URL."""
    if test_database.backend != "sqlite":
        pytest.skip("the browser tests run on SQLite (the embedded default) only")
    if not CHROMIUM.exists() or async_playwright is None:
        pytest.skip("Chromium and playwright are needed (see tests/test_browser.py)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_app(settings.model_copy(update={"base_url": url, "min_fill_seconds": 1.0}))
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
    yield url
    server.should_exit = True
    await asyncio.to_thread(thread.join, 15)


@pytest.mark.parametrize("typing_time", [1.5, 0.0])
async def test_subscribe_js_on_another_site_sends_the_time_its_form_was_shown(
    live_min_fill: str, db: Database, settings: Settings, typing_time: float
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    pages: dict[str, str] = {}
    handler = type("Handler", (SiteHandler,), {"pages": pages})
    site = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    site_thread = threading.Thread(target=site.serve_forever, name="site", daemon=True)
    site_thread.start()
    origin = f"http://127.0.0.1:{site.server_address[1]}"
    await allow(db, origin, "weekly")
    pages["/"] = host_page(live_min_fill, checkboxes=False)
    sent: list[dict[str, Any]] = []
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
            )
            page = await browser.new_page()
            page.on(
                "request",
                lambda r: (
                    sent.append(r.post_data_json)
                    if r.method == "POST" and r.url.endswith("/v1/subscriptions")
                    else None
                ),
            )
            await page.goto(origin + "/")
            # subscribe.js fetched a token for the form as the page loaded.
            await expect(page.locator('input[name="form_ts"]')).to_have_count(1)
            await asyncio.sleep(typing_time)
            await page.get_by_label("Email address").fill("reader@example.com")
            await page.get_by_role("button", name="Subscribe").click()
            await expect(page.get_by_role("status")).to_have_text(THANKS)
            await browser.close()
    finally:
        site.shutdown()
        site.server_close()
        site_thread.join(5)

    [body] = sent
    assert botcheck.form_token_age(settings, body["form_ts"]) is not None
    # The reader who took their time is signed up; the instant post was thanked and dropped.
    assert await count(db, Subscriber) == (1 if typing_time else 0)
