"""What design.md names, asserted from outside: the second round of contract checks.

Each test here was a place where the running service and the contract disagreed (most of
them only on PostgreSQL, which refuses what SQLite lets through)."""

from __future__ import annotations

import base64

import httpx

from service.db import Database
from tests.conftest import make_newsletter
from tests.test_admin import make_key


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# ---------------------------------------------------------------- admin API: bad input


async def test_a_slug_or_filter_no_newsletter_can_have_is_a_4xx_not_a_500(
    client: httpx.AsyncClient, db: Database
) -> None:
    """A NUL byte in a path slug, a filter or a cursor reached PostgreSQL, which refused it:
    500. A slug that cannot exist is "no such newsletter"; a filter or cursor is a field
    error."""
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    added = await client.post(
        "/v1/admin/subscribers",
        json={"email": "reader@example.com", "newsletters": ["weekly"], "status": "active",
              "consent_note": "asked in person"},
        headers=admin,
    )  # fmt: skip
    assert added.status_code == 201, added.text
    person = added.json()["id"]
    not_found = [
        ("GET", "/v1/admin/newsletters/%00", None),
        ("GET", "/v1/admin/newsletters/we%00ekly/stats", None),
        ("GET", "/v1/admin/newsletters/%00/subscribers.csv", None),
        ("PATCH", "/v1/admin/newsletters/%00", {"name": "X"}),
        ("DELETE", "/v1/admin/newsletters/%00", None),
        ("PUT", f"/v1/admin/subscribers/{person}/subscriptions/%00", {"status": "active"}),
    ]
    for method, url, body in not_found:
        answer = await client.request(method, url, json=body, headers=admin)
        assert answer.status_code == 404, (method, url, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    nul_key = _cursor(b"k:\x00a")
    invalid = [
        ("/v1/admin/subscribers?newsletter=%00", "newsletter"),
        ("/v1/admin/events?type=subscription.%00", "type"),
        (f"/v1/admin/subscribers?email=re&cursor={nul_key}", "cursor"),
    ]
    for url, field in invalid:
        answer = await client.get(url, headers=admin)
        assert answer.status_code == 422, (url, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["errors"][0]["field"] == field
    # An unknown (but possible) newsletter or event type is still just no rows.
    for url in ("/v1/admin/subscribers?newsletter=nope", "/v1/admin/events?type=nope"):
        answer = await client.get(url, headers=admin)
        assert answer.status_code == 200, (url, answer.text)
        assert answer.json() == {"items": [], "next_cursor": None}


async def test_ids_and_cursors_past_a_columns_range_are_a_4xx_not_a_500(
    client: httpx.AsyncClient, db: Database
) -> None:
    """Webhooks, blocklist entries, imports and newsletters have 32-bit ids on PostgreSQL: an
    id or a cursor past 2**31 - 1 overflowed the driver (500)."""
    admin = await make_key(db)
    for url in (
        "/v1/admin/imports/2147483648",
        "/v1/admin/webhooks/2147483648",
        "/v1/admin/webhooks/2147483648/deliveries",
        "/v1/admin/blocklist/2147483648",
        "/v1/admin/imports/9223372036854775807",
    ):
        answer = await client.get(url, headers=admin)
        assert answer.status_code == 422, (url, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
    deleted = await client.delete("/v1/admin/blocklist/2147483648", headers=admin)
    assert deleted.status_code == 422, deleted.text
    for path in ("newsletters", "webhooks", "blocklist"):
        answer = await client.get(
            f"/v1/admin/{path}", params={"cursor": _cursor(b"99999999999")}, headers=admin
        )
        assert answer.status_code == 422, (path, answer.status_code, answer.text)
        assert answer.json()["errors"][0]["code"] == "invalid_cursor"
    # 64-bit lists still take such a cursor: it is just past every row.
    for path in ("subscribers", "events"):
        answer = await client.get(
            f"/v1/admin/{path}", params={"cursor": _cursor(b"99999999999")}, headers=admin
        )
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json()["items"] == []
