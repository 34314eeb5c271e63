"""Hostile input: header injection, oversized and deeply nested bodies, invalid UTF-8, SQL and
HTML in values, 10,000 newsletters in one request, slow-loris bodies, control characters in
headers. Each answer is a 4xx problem (or a harmless success), never a 5xx, and nothing is
half-stored or sent where it should not be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from service.api.bodies import TOO_DEEP
from service.app import create_app
from service.config import Settings
from service.db import Database
from service.json_depth import MAX_JSON_DEPTH, nests_deeper
from service.keys import create_key
from service.mail.worker import DeliveryWorker
from service.models import Newsletter, OutboxMessage, Subscriber, Subscription
from tests.conftest import SMTPServer, deliver, make_newsletter
from tests.test_faults import served, server_env

PROBLEM_JSON = "application/problem+json"
FORM = "application/x-www-form-urlencoded"
INJECTED = "victim@evil.example"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def hostile_app(settings: Settings, db: Database) -> AsyncIterator[FastAPI]:
    application = create_app(settings.model_copy(update={"signup_rate_limit": ""}))
    yield application
    await application.state.signups.stop()
    await application.state.db.dispose()


@pytest.fixture
async def http(hostile_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=hostile_app, client=("203.0.113.10", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
async def admin(db: Database) -> dict[str, str]:
    async with db.transaction() as session:
        key = (await create_key(session, "hostile", "admin")).key
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def mailer(hostile_app: FastAPI, settings: Settings) -> DeliveryWorker:
    return DeliveryWorker(hostile_app.state.db, settings)


def assert_problem(answer: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert answer.status_code in statuses, (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = answer.json()
    assert body["status"] == answer.status_code
    return body


async def count(db: Database, model: Any) -> int:
    async with db.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def post_json(http: httpx.AsyncClient, body: Any, **headers: str) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http.post(
        "/v1/subscriptions",
        content=raw,
        headers={"content-type": "application/json", **headers},
    )


# ---------------------------------------------------------------- header injection (CR/LF)


async def test_crlf_in_a_name_never_reaches_a_mail_header(
    http: httpx.AsyncClient,
    db: Database,
    admin: dict[str, str],
    smtp: SMTPServer,
    mailer: DeliveryWorker,
) -> None:
    await make_newsletter(db, "weekly")
    name = f"Eve\r\nBcc: {INJECTED}\r\nSubject: you won\n\rX-Evil: 1\u2028\x85"
    answer = await post_json(
        http, {"email": "eve@example.com", "newsletters": ["weekly"], "name": name}
    )
    assert answer.status_code == 202, answer.text

    found = await http.get("/v1/admin/subscribers", params={"email": "eve@"}, headers=admin)
    [item] = found.json()["items"]
    assert item["name"] == f"EveBcc: {INJECTED}Subject: you wonX-Evil: 1"
    assert await deliver(mailer) == 1
    [mail] = smtp.sink.received
    assert mail.rcpt_tos == ["eve@example.com"]
    assert mail.message["Bcc"] is None and mail.message["X-Evil"] is None
    assert "you won" not in str(mail.message["Subject"])
    assert "Eve" not in mail.text() and "Eve" not in mail.html()  # never repeated in mail


@pytest.mark.parametrize(
    "email",
    [
        f"reader@example.com\r\nBcc: {INJECTED}",
        f"reader@example.com\nBcc: {INJECTED}",
        f"reader@example.com%0d%0aBcc:{INJECTED}",
        f"reader@example.com>\r\nRCPT TO:<{INJECTED}",
        "reader@example.com\x00",
    ],
)
async def test_crlf_in_an_address_is_refused(
    http: httpx.AsyncClient, db: Database, email: str
) -> None:
    await make_newsletter(db, "weekly")
    for answer in (
        await post_json(http, {"email": email, "newsletters": ["weekly"]}),
        await http.post(
            "/v1/subscriptions",
            content=f"email={email}&newsletters=weekly".encode(),
            headers={"content-type": FORM},
        ),
    ):
        problem = assert_problem(answer, 422)
        assert problem["errors"][0]["field"] == "email"
    assert await count(db, Subscriber) == 0
    assert await count(db, OutboxMessage) == 0


@pytest.mark.parametrize("field", ["name", "from_name", "from_email", "reply_to"])
async def test_crlf_in_newsletter_fields_never_reaches_a_mail_header(
    http: httpx.AsyncClient,
    db: Database,
    admin: dict[str, str],
    smtp: SMTPServer,
    mailer: DeliveryWorker,
    field: str,
) -> None:
    value = {
        "name": "Weekly",
        "from_name": "Weekly team",
        "from_email": "weekly@example.org",
        "reply_to": "editor@example.org",
    }[field] + f"\r\nBcc: {INJECTED}\r\nX-Evil: 1"
    created = await http.post(
        "/v1/admin/newsletters",
        json={"slug": "weekly", "name": "Weekly", field: value},
        headers=admin,
    )
    if field in ("from_email", "reply_to"):
        # An address that cannot be a header is refused up front: accepted, it would kill
        # every confirmation of the list at send time.
        assert assert_problem(created, 422)["errors"][0]["field"] == field
        return
    assert created.status_code == 201, created.text
    answer = await post_json(http, {"email": "reader@example.com", "newsletters": ["weekly"]})
    assert answer.status_code == 202
    assert await deliver(mailer) == 1
    [mail] = smtp.sink.received  # delivered, with its headers whole
    assert mail.rcpt_tos == ["reader@example.com"]
    assert mail.message["Bcc"] is None and mail.message["X-Evil"] is None
    assert "\n" not in str(mail.message["From"]) + str(mail.message["List-Id"])


# ---------------------------------------------------------------- sizes and shapes


async def test_oversized_bodies_are_413_with_or_without_a_length(
    http: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    await make_newsletter(db, "weekly")
    big = json.dumps(
        {"email": "big@example.com", "newsletters": ["weekly"], "name": "x" * 70_000}
    ).encode()
    assert len(big) > settings.max_body_bytes
    assert_problem(await post_json(http, big), 413)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    streamed = await http.post(
        "/v1/subscriptions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in streamed.request.headers
    assert_problem(streamed, 413)

    form = b"email=big%40example.com&newsletters=weekly&name=" + b"x" * 70_000
    assert_problem(
        await http.post("/v1/subscriptions", content=form, headers={"content-type": FORM}), 413
    )
    assert await count(db, Subscriber) == 0


async def test_deeply_nested_json_is_refused_everywhere(
    http: httpx.AsyncClient, db: Database, admin: dict[str, str]
) -> None:
    await make_newsletter(db, "weekly")
    deep_array = b"[" * 50_000 + b"]" * 50_000  # over the sign-up's size cap
    deep_object = ('{"a":' * 3000 + "1" + "}" * 3000).encode()  # under it
    assert_problem(await post_json(http, deep_array), 413)
    assert_problem(await post_json(http, deep_object), 400)

    deep_attributes = json.loads('{"a":' * 40 + "1" + "}" * 40)
    problem = assert_problem(
        await post_json(
            http,
            {"email": "deep@example.com", "newsletters": ["weekly"], "attributes": deep_attributes},
        ),
        422,
    )
    assert problem["errors"][0]["code"] == "too_deep"

    for path in (
        "/v1/admin/newsletters",
        "/v1/admin/subscribers",
        "/v1/admin/webhooks",
        "/v1/admin/blocklist",
    ):
        for body in (deep_array, deep_object):
            answer = await http.post(
                path, content=body, headers={**admin, "content-type": "application/json"}
            )
            assert assert_problem(answer, 400)["detail"] == TOO_DEEP
    assert await count(db, Subscriber) == 0


@pytest.mark.parametrize(
    ("text", "deeper"),
    [
        ("[" * 64 + "]" * 64, False),
        ("[" * 65 + "]" * 65, True),
        ('{"a":' * 40 + "1" + "}" * 40, False),
        ('["' + "[" * 500 + '"]', False),  # brackets in a string are text
        ('["\\"[",' * 70 + "]" * 70, True),  # an escaped quote does not end the string
        ("[1," * 50 + "[]," * 500 + "0" + "]" * 50, False),  # many brackets, 51 levels
        ("[" * 30_000, True),  # unbalanced: the parser would recurse through it all
        ("{}" * 1000, False),
        ('{"a":[' * 32 + "]}" * 32, False),  # two kinds in turn: still one level a pass
        ('{"a":[' * 33 + "]}" * 33, True),
    ],
)
def test_nesting_is_measured_without_parsing(text: str, deeper: bool) -> None:
    assert nests_deeper(text.encode(), MAX_JSON_DEPTH) is deeper


async def test_json_deeper_than_the_limit_is_refused_before_it_is_parsed(
    http: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")

    def signup(levels: int) -> bytes:
        """A sign-up nesting `levels` deep in all: the body, its attributes and lists."""
        lists = levels - 2
        return (
            b'{"email": "deep@example.com", "newsletters": ["weekly"], "attributes": {"x": '
            + b"[" * lists
            + b"]" * lists
            + b"}}"
        )

    at_the_limit = assert_problem(await post_json(http, signup(MAX_JSON_DEPTH)), 422)
    assert at_the_limit["errors"][0]["code"] == "too_deep"  # read, then refused as a field
    over = assert_problem(await post_json(http, signup(MAX_JSON_DEPTH + 1)), 400)
    assert over["detail"] == TOO_DEEP
    assert await count(db, Subscriber) == 0


async def test_invalid_utf8_is_a_clean_400_or_422(
    http: httpx.AsyncClient, db: Database, admin: dict[str, str]
) -> None:
    await make_newsletter(db, "weekly")
    assert_problem(
        await post_json(http, b'{"email": "\xff\xfe@example.com", "newsletters": ["weekly"]}'), 400
    )
    assert_problem(
        await http.post(
            "/v1/subscriptions",
            content=b"email=r\xff%40example.com&newsletters=weekly",
            headers={"content-type": FORM},
        ),
        400,
    )
    # Percent-escapes of invalid UTF-8 are refused like raw bytes, not turned into U+FFFD.
    assert_problem(
        await http.post(
            "/v1/subscriptions",
            content=b"email=r%FF%FE%40example.com&newsletters=weekly",
            headers={"content-type": FORM},
        ),
        400,
    )
    boundary = "b0undary"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="email"\r\n\r\n'.encode()
        + b"r\xc3\x28@example.com\r\n"
        + f"--{boundary}--\r\n".encode()
    )
    assert_problem(
        await http.post(
            "/v1/subscriptions",
            content=multipart,
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        ),
        400,
    )
    # JSON escapes of lone surrogates: valid JSON, not valid text.
    assert_problem(
        await post_json(
            http,
            b'{"email": "\\ud800@example.com", "newsletters": ["\\udfff"], '
            b'"attributes": {"k": "\\ud800"}}',
        ),
        422,
    )
    assert_problem(
        await http.post(
            "/v1/admin/newsletters",
            content=b'{"slug": "x\xff", "name": "n"}',
            headers={**admin, "content-type": "application/json"},
        ),
        400,
    )
    for path in ("/v1/confirmations/%FF%FE", "/v1/confirmations/%C3%28"):
        assert_problem(await http.post(path), 404)
    for path in ("/confirm/%FF%FE", "/manage/%C3%28", "/unsubscribe/%FF?newsletter=%FF"):
        page = await http.get(path)
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
    search = await http.get("/v1/admin/subscribers?email=%FF%FE", headers=admin)
    assert search.status_code in (200, 422)
    assert await count(db, Subscriber) == 0


def _routes_with_parameters(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """(method, path template) of every route with a path parameter, through included
    routers (FastAPI keeps those as wrappers of the original router)."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            found += _routes_with_parameters(included.routes, prefix + route.include_context.prefix)
            continue
        path = prefix + getattr(route, "path", "")
        for method in sorted(getattr(route, "methods", None) or ()):
            if "{" in path and method != "HEAD":
                found.append((method, path))
    return found


async def test_a_nul_in_any_public_path_parameter_is_a_4xx_not_a_500(
    http: httpx.AsyncClient, hostile_app: FastAPI, db: Database
) -> None:
    """Every public route with a path parameter, walked from the app's routes, with a NUL byte
    in it: PostgreSQL refuses the byte, so a value that reached a query was a 500 there
    (GET /embed/a%00b was). The admin routes have their own test (test_contract_round2)."""
    await make_newsletter(db, "weekly")
    routes = [r for r in _routes_with_parameters(hostile_app.routes) if "/admin" not in r[1]]
    assert ("GET", "/embed/{slug}") in routes
    assert ("POST", "/confirm/{token}/resend") in routes
    for method, template in routes:
        for nul in ("%00", "a%00b", "weekly%00"):
            url = re.sub(r"\{[^}]+\}", nul, template)
            answer = await http.request(method, url)
            assert 400 <= answer.status_code < 500, (method, url, answer.status_code)
    assert await count(db, Subscriber) == 0


# ---------------------------------------------------------------- SQL and HTML in values


async def test_sql_looking_values_are_only_data(
    http: httpx.AsyncClient, db: Database, admin: dict[str, str]
) -> None:
    await make_newsletter(db, "weekly")
    name = "Robert'); DROP TABLE subscribers;--"
    answer = await post_json(
        http,
        {
            "email": "o'brien+x@example.com",
            "newsletters": ["weekly"],
            "name": name,
            "attributes": {"q": "1' OR '1'='1", "'; DELETE FROM outbox;--": "x"},
        },
    )
    assert answer.status_code == 202, answer.text
    answer = await post_json(http, {"email": "x@example.com", "newsletters": ["weekly' OR 1=1--"]})
    assert assert_problem(answer, 422)["errors"][0]["code"] == "unknown_newsletter"

    found = await http.get("/v1/admin/subscribers", params={"email": "o'brien"}, headers=admin)
    [item] = found.json()["items"]
    assert (item["email"], item["name"]) == ("o'brien+x@example.com", name)
    shown = await http.get(f"/v1/admin/subscribers/{item['id']}", headers=admin)
    assert shown.json()["attributes"]["q"] == "1' OR '1'='1"
    # LIKE wildcards and quotes in a prefix search match themselves, not everything.
    for prefix in ("%", "_", "%' OR '1'='1", "' OR 1=1--"):
        search = await http.get("/v1/admin/subscribers", params={"email": prefix}, headers=admin)
        assert search.status_code == 200
        assert search.json()["items"] == [], prefix
    assert await count(db, Subscriber) == 1
    assert await count(db, OutboxMessage) == 1


async def test_html_looking_values_are_escaped_on_every_page(
    http: httpx.AsyncClient, db: Database, admin: dict[str, str]
) -> None:
    script = '"><script>alert(1)</script>'
    created = await http.post(
        "/v1/admin/newsletters",
        json={"slug": "weekly", "name": f"Weekly{script}", "description": script},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    form_again = await http.post(
        "/v1/subscriptions",
        content=f"email=x{script}&newsletters=weekly".encode(),
        headers={"content-type": FORM, "accept": "text/html"},
    )
    assert form_again.status_code == 422
    assert "&lt;script&gt;" in form_again.text
    for page in (form_again, await http.get("/embed/weekly"), await http.get("/subscribe/weekly")):
        assert page.headers["content-type"].startswith("text/html")
        assert "<script>alert(1)</script>" not in page.text

    answer = await post_json(
        http, {"email": "html@example.com", "newsletters": ["weekly"], "name": script}
    )
    assert answer.status_code == 202
    found = await http.get("/v1/admin/subscribers", params={"email": "html@"}, headers=admin)
    assert found.json()["items"][0]["name"] == script.strip()  # stored as text, as sent


# ---------------------------------------------------------------- 10,000 newsletters


async def test_ten_thousand_newsletters_in_one_request_are_refused_cheaply(
    http: httpx.AsyncClient, db: Database, settings: Settings, hostile_app: FastAPI
) -> None:
    await make_newsletter(db, "weekly")
    slugs = [f"n{i}" for i in range(10_000)]
    body = {"email": "many@example.com", "newsletters": slugs}
    assert_problem(await post_json(http, body), 413)  # 80 kB: over the body cap
    form = "&".join(["email=many%40example.com"] + [f"newsletters={s}" for s in slugs])
    assert_problem(
        await http.post("/v1/subscriptions", content=form, headers={"content-type": FORM}),
        400,  # more fields than a form may carry
        413,
    )

    # With a body cap large enough to read them, the per-sign-up limit refuses them.
    roomy = create_app(
        settings.model_copy(update={"signup_rate_limit": "", "max_body_bytes": 1_000_000})
    )
    try:
        transport = httpx.ASGITransport(app=roomy, client=("203.0.113.11", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as big:
            problem = assert_problem(await post_json(big, body), 422)
            assert problem["errors"][0]["code"] == "too_many"
            repeated = {"email": "many@example.com", "newsletters": ["weekly"] * 10_000}
            assert_problem(await post_json(big, repeated), 422)
    finally:
        await roomy.state.signups.stop()
        await roomy.state.db.dispose()
    assert await count(db, Subscriber) == 0
    assert await count(db, Subscription) == 0


# ---------------------------------------------------------------- control characters in headers


async def test_control_characters_in_request_headers_are_not_stored(
    http: httpx.AsyncClient, db: Database, admin: dict[str, str]
) -> None:
    await make_newsletter(db, "weekly")
    answer = await http.post(
        "/v1/subscriptions",
        json={"email": "agent@example.com", "newsletters": ["weekly"]},
        headers=[
            (b"user-agent", b"evil\x00agent\x1b[31m"),
            (b"referer", b"https://x.example/\x00"),
        ],
    )
    assert answer.status_code == 202, answer.text
    found = await http.get("/v1/admin/subscribers", params={"email": "agent@"}, headers=admin)
    shown = await http.get(f"/v1/admin/subscribers/{found.json()['items'][0]['id']}", headers=admin)
    [consent] = [s["consent"] for s in shown.json()["subscriptions"]]
    assert consent["user_agent"] == "evilagent[31m"
    assert consent["page"] == "https://x.example/"


# ---------------------------------------------------------------- a real server: slow loris


async def _dribble(port: int, head: bytes, body: bytes, pause: float) -> bytes:
    """Send the head at once, then the body a byte at a time; return all the server says."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read_all() -> None:
        # A byte sent after the server closed draws a reset: what came before it still counts.
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    reading = asyncio.create_task(read_all())
    try:
        writer.write(head)
        await writer.drain()
        for byte in body:
            if received or reading.done():
                break  # the server has answered
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(pause)
        await asyncio.wait_for(reading, 60)  # the server must close the connection
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return bytes(received)


async def test_slow_loris_body_is_cut_off_with_408(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    await make_newsletter(db, "weekly")
    env = server_env(settings, NEWSLETTER_REQUEST_TIMEOUT="1.5")
    body = json.dumps({"email": "slow@example.com", "newsletters": ["weekly"]}).encode()
    async with served(env, tmp_path / "api.log") as base:
        port = int(base.rsplit(":", 1)[1])
        sized = (
            b"POST /v1/subscriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        chunked = (
            b"POST /v1/subscriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunked_body = b"".join(b"1\r\n" + bytes([b]) + b"\r\n" for b in body) + b"0\r\n\r\n"
        for head, payload in ((sized, body), (chunked, chunked_body)):
            answer = await _dribble(port, head, payload, pause=0.25)
            status_line, _, rest = answer.partition(b"\r\n")
            assert status_line == b"HTTP/1.1 408 Request Timeout", answer[:300]
            assert b"content-type: application/problem+json" in rest.lower()
            assert b'"status":408' in rest

        # A client at a normal pace is served as usual, by the same server.
        async with httpx.AsyncClient(base_url=base) as client:
            normal = await client.post(
                "/v1/subscriptions", content=body, headers={"content-type": "application/json"}
            )
            assert normal.status_code == 202
    async with db.transaction() as session:
        stored = list(await session.scalars(select(Subscriber.email)))
    assert stored == ["slow@example.com"]  # only the normal one
    assert await count(db, Newsletter) == 1
