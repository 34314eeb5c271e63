"""Property-based tests (hypothesis) over the whole sign-up input space, through the HTTP app.

Whatever a client sends, the answer is one the API documents (never a 5xx), every error is
problem+json whose `status` is the HTTP status, and an accepted address is stored in
email-validator's normalised form.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from email_validator import EmailNotValidError, validate_email
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from service.app import create_app
from service.config import Settings
from service.db import Database
from service.keys import create_key
from service.models import Subscriber
from service.newsletters import archive_newsletter
from tests.conftest import make_newsletter

EXAMPLES = int(os.environ.get("RELIABILITY_EXAMPLES", "200"))  # per property and database
ANSWERS = {200, 202, 400, 413, 415, 422}
PROBLEM_JSON = "application/problem+json"
THANKS = "Thank you for signing up for this newsletter. We've sent you a confirmation email."
SLUGS = ["weekly", "daily", "solo", "old"]  # solo is single opt-in, old is archived

hypothesis_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------- strategies

# Every character, control characters, lone surrogates and NUL included.
any_text = st.text(st.characters(exclude_categories=()), max_size=80)
nasty_chars = st.sampled_from(
    ["\r\n", "\n", "\r", "\x00", "\t", "\u2028", "\ufeff", "\ud800", "<", "'", '"', ";", " "]
)
nasty_text = st.lists(st.one_of(nasty_chars, any_text), max_size=6).map("".join)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and ±Infinity included: json.dumps writes them, the server decodes them
    any_text,
    nasty_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(any_text, inner, max_size=5)
    ),
    max_leaves=30,
)
# Objects near the 4 KiB limit and past it, and deeply nested ones.
big_attributes = st.integers(min_value=3_900, max_value=4_300).map(lambda n: {"k": "x" * n})
deep_attributes = st.integers(min_value=1, max_value=40).map(
    lambda depth: json.loads('{"a":' * depth + "1" + "}" * depth)
)
attributes = st.one_of(
    st.dictionaries(any_text, json_values, max_size=8), big_attributes, deep_attributes, json_values
)


def _recase(address: str, flips: list[bool]) -> str:
    return "".join(c.upper() if i < len(flips) and flips[i] else c for i, c in enumerate(address))


emails = st.one_of(
    st.emails(),
    st.builds(_recase, st.emails(), st.lists(st.booleans(), max_size=40)),
    st.emails().map(lambda e: f"  {e}\t"),
    st.from_regex(r"\A[a-zA-Z0-9._%+'-]{1,20}@[a-zA-Z0-9-]{1,15}(\.[a-zA-Z]{2,6}){1,2}\Z"),
    st.emails().map(lambda e: e.replace("@", "@@", 1)),
    nasty_text,
    st.text(string.printable, max_size=400),
    st.text(min_size=300, max_size=400),  # around the 320-character cap
    json_values,  # wrong types
)
slug_lists = st.one_of(
    st.lists(st.sampled_from([*SLUGS, "unknown", "WEEKLY", " weekly ", ""]), max_size=25),
    st.lists(any_text, max_size=5),
    st.lists(st.text(min_size=60, max_size=70), max_size=2),
    st.sampled_from(SLUGS),
    json_values,  # wrong types: a number, an object, a list of lists...
)
names = st.one_of(nasty_text, st.text(min_size=190, max_size=210), json_values)
languages = st.one_of(st.sampled_from(["en", "uk", "pt-BR", "", "en_US"]), any_text, json_values)


@st.composite
def signup_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key, values in (
        ("email", emails),
        ("newsletters", slug_lists),
        ("name", names),
        ("language", languages),
        ("attributes", attributes),
        ("website", st.one_of(st.just(""), any_text, json_values)),
    ):
        # Each field is present most of the time, absent sometimes.
        if draw(st.integers(0, 9)) or key == "newsletters":
            body[key] = draw(values)
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(any_text, json_values, max_size=4)))  # extra fields
    return body


@st.composite
def plausible_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid address and lists, with hostile optional fields: these reach the database."""
    body: dict[str, Any] = {
        "email": draw(st.emails()),
        "newsletters": draw(st.lists(st.sampled_from(SLUGS[:3]), min_size=1, max_size=3)),
    }
    if draw(st.booleans()):
        body["name"] = draw(nasty_text)
    if draw(st.booleans()):
        body["language"] = draw(st.sampled_from(["en", "uk", "pt-BR", "x" * 16]))
    if draw(st.booleans()):
        body["attributes"] = draw(st.dictionaries(any_text, json_values, max_size=6))
    return body


form_text = st.text(st.characters(codec="utf-8"), max_size=60)


@st.composite
def form_bodies(draw: st.DrawFn) -> list[tuple[str, str]]:
    pairs = [("email", draw(st.one_of(st.emails(), form_text)))]
    pairs += [("newsletters", s) for s in draw(st.lists(st.sampled_from([*SLUGS, "x", ""])))]
    pairs += draw(
        st.lists(
            st.tuples(
                st.sampled_from(["name", "language", "website", "email", "other"]), form_text
            ),
            max_size=4,
        )
    )
    return pairs


# ---------------------------------------------------------------- the app under test


@dataclass
class Seen:
    """Addresses accepted so far in one test: the database keeps them between examples."""

    keys: set[str] = field(default_factory=set)
    answers: dict[int, int] = field(default_factory=dict)

    def count(self, status: int) -> None:
        self.answers[status] = self.answers.get(status, 0) + 1


@pytest.fixture
async def fuzz_app(settings: Settings, db: Database) -> AsyncIterator[FastAPI]:
    tuned = settings.model_copy(update={"signup_rate_limit": ""})
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    await make_newsletter(db, "solo", opt_in="single")
    await make_newsletter(db, "old")
    async with db.transaction() as session:
        await archive_newsletter(session, "old")
    application = create_app(tuned)
    yield application
    await application.state.signups.stop()
    await application.state.db.dispose()


@pytest.fixture
async def http(fuzz_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=fuzz_app, client=("203.0.113.9", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
async def admin(db: Database) -> dict[str, str]:
    async with db.transaction() as session:
        key = (await create_key(session, "fuzz", "admin")).key
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def seen(request: pytest.FixtureRequest) -> Any:
    """Lives across the examples of one test; its tally is printed with `-s`."""
    tally = Seen()
    yield tally
    print(f"\n{request.node.name}: answers {dict(sorted(tally.answers.items()))}")


def normalised(raw: Any) -> str | None:
    """The oracle: email-validator's own normal form of what the client sent, if valid."""
    if not isinstance(raw, str):
        return None
    try:
        return validate_email(raw.strip(), check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def assert_documented(answer: httpx.Response) -> None:
    assert answer.status_code in ANSWERS, (answer.status_code, answer.text[:500])
    if answer.status_code >= 400:
        assert answer.headers["content-type"] == PROBLEM_JSON, answer.text[:500]
        problem = answer.json()
        assert problem["status"] == answer.status_code
        assert isinstance(problem["title"], str) and problem["title"]
        assert problem["type"].startswith("about:blank")
        if answer.status_code == 422:
            assert problem["errors"], problem
            for error in problem["errors"]:
                assert {"field", "code", "message"} <= set(error)
                assert error["message"] and error["code"]
    else:
        assert answer.json() in (
            {"status": "pending", "message": THANKS},
            {"status": "active", "message": "Successfully subscribed"},
        )


async def check_stored(db: Database, fields: dict[str, Any], seen: Seen) -> None:
    """After a 2xx: the address is stored once, normalised; a honeypot stores nothing new
    (and is answered as a success whatever else the body got wrong)."""
    expected = normalised(fields.get("email"))
    honeypot = bool(fields.get("website"))
    if honeypot and expected is None:
        return  # an invalid address: nothing it could have stored under
    assert expected is not None, fields.get("email")  # nothing invalid is ever accepted
    async with db.transaction() as session:
        stored = (
            await session.execute(
                select(Subscriber.email, Subscriber.name).where(
                    Subscriber.email_key == expected.lower()
                )
            )
        ).all()
    if honeypot and expected.lower() not in seen.keys:
        assert stored == [], "a filled honeypot stored the address"
        return
    created = expected.lower() not in seen.keys
    seen.keys.add(expected.lower())
    [(email, name)] = stored
    # The first sign-up of an address fixes the case of its local part.
    assert email == expected if created else email.lower() == expected.lower()
    assert name is None or (name.isprintable() and name == name.strip())


# ---------------------------------------------------------------- properties


@hypothesis_settings
@given(body=signup_bodies())
async def test_any_json_signup_gets_a_documented_answer_and_stores_normalised(
    http: httpx.AsyncClient, db: Database, seen: Seen, body: dict[str, Any]
) -> None:
    # json.dumps escapes lone surrogates and writes NaN/Infinity: the server must cope.
    answer = await http.post(
        "/v1/subscriptions",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    seen.count(answer.status_code)
    assert_documented(answer)
    if answer.is_success:
        await check_stored(db, body, seen)


@hypothesis_settings
@given(body=plausible_bodies())
async def test_hostile_optional_fields_are_stored_or_refused_never_fail(
    http: httpx.AsyncClient, db: Database, admin: dict[str, str], seen: Seen, body: dict[str, Any]
) -> None:
    answer = await http.post(
        "/v1/subscriptions",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    seen.count(answer.status_code)
    assert_documented(answer)
    if not answer.is_success:
        return
    key = str(normalised(body["email"])).lower()
    created = key not in seen.keys
    await check_stored(db, body, seen)
    # Whatever was accepted, ops can read back: the admin API shows it as sent.
    found = await http.get("/v1/admin/subscribers", params={"email": key}, headers=admin)
    assert found.status_code == 200, found.text
    [item] = [i for i in found.json()["items"] if i["email"].lower() == key]
    shown = await http.get(f"/v1/admin/subscribers/{item['id']}", headers=admin)
    assert shown.status_code == 200, shown.text
    if created:
        assert shown.json()["attributes"] == body.get("attributes", {})


@hypothesis_settings
@given(pairs=form_bodies(), html=st.booleans())
async def test_any_form_signup_gets_a_documented_answer(
    http: httpx.AsyncClient,
    db: Database,
    seen: Seen,
    pairs: list[tuple[str, str]],
    html: bool,
) -> None:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if html:
        headers["accept"] = "text/html"
    answer = await http.post("/v1/subscriptions", content=urlencode(pairs), headers=headers)
    seen.count(answer.status_code)
    if html:
        # A browser gets a page: the thank-you page, or the form again with its errors.
        assert answer.status_code in (200, 202, 400, 413, 422), answer.text[:300]
        assert answer.headers["content-type"].startswith("text/html")
    else:
        assert_documented(answer)
    if answer.is_success:
        await check_stored(db, dict(reversed(pairs)), seen)


@hypothesis_settings
@given(content=st.binary(max_size=300), kind=st.sampled_from(["json", "form", "multipart", "xml"]))
async def test_any_bytes_get_a_documented_answer(
    http: httpx.AsyncClient, seen: Seen, content: bytes, kind: str
) -> None:
    content_type = {
        "json": "application/json",
        "form": "application/x-www-form-urlencoded",
        "multipart": "multipart/form-data; boundary=xyz",
        "xml": "application/xml",
    }[kind]
    answer = await http.post(
        "/v1/subscriptions", content=content, headers={"content-type": content_type}
    )
    seen.count(answer.status_code)
    assert_documented(answer)
    assert not answer.is_success or kind != "xml"
