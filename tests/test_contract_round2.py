"""What design.md names, asserted from outside: the second round of contract checks.

Each test here was a place where the running service and the contract disagreed (most of
them only on PostgreSQL, which refuses what SQLite lets through)."""

from __future__ import annotations

import asyncio
import base64
import subprocess
from pathlib import Path

import httpx
import pytest

from service.db import Database
from service.mail.worker import DeliveryWorker
from tests.conftest import (
    ReceivedMail,
    SMTPServer,
    TestDatabase,
    deliver,
    free_port,
    fresh_pg_database,
    make_newsletter,
)
from tests.test_admin import make_key
from tests.test_cli import NEWSLETTER, cli_env, ok


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


# ---------------------------------------------------------------- the CLI


async def _run_cli(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`newsletter ARGS` with only the data directory and `env` as settings."""
    environment = cli_env(data_dir)
    environment.update({f"NEWSLETTER_{k.upper()}": v for k, v in env.items()})
    return await asyncio.to_thread(
        subprocess.run,
        [NEWSLETTER, *args],
        env=environment,
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """A clear message and a non-zero exit, no traceback."""
    shown = result.stdout + result.stderr
    assert result.returncode != 0, shown
    assert "Traceback" not in shown and "╭" not in shown, shown
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), shown
    for word in words:
        assert word in message, shown


async def test_commands_on_a_fresh_embedded_database_migrate_it_as_serve_does(
    tmp_path: Path,
) -> None:
    """design.md: every command reads the same settings as the server, and serve migrates an
    embedded SQLite database. A first `newsletters create` (before any `serve`) answered with
    a traceback about a missing table."""
    created = await _run_cli(tmp_path, "newsletters", "create", "--slug", "news", "--name", "N")
    assert created.returncode == 0, created.stderr
    assert "news" in ok(await _run_cli(tmp_path, "newsletters", "list"))
    fresh = tmp_path / "other"
    fresh.mkdir()
    for args in (("outbox", "status"), ("purge-pending", "--older-than", "7d")):
        assert (await _run_cli(fresh, *args)).returncode == 0, args


async def test_cli_errors_are_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    """design.md: every command reads the same settings; a wrong one must say which."""
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    for args in (("newsletters", "list"), ("keys", "create", "--name", "x"), ("outbox", "status"),
                 ("purge-pending", "--older-than", "30d"), ("subscribers", "export",
                 "--newsletter", "x"), ("migrate",)):  # fmt: skip
        _refused(await _run_cli(tmp_path, *args, secret_keys="k", database_url=closed), "database")
    _refused(
        await _run_cli(tmp_path, "newsletters", "list", database_url="mysql://db/news"),
        "NEWSLETTER_DATABASE_URL",
    )
    _refused(
        await _run_cli(tmp_path, "outbox", "status", mail_url="ftp://mail.example"),
        "NEWSLETTER_MAIL_URL",
    )
    _refused(
        await _run_cli(tmp_path, "newsletters", "list", check_deliverability="maybe"),
        "NEWSLETTER_CHECK_DELIVERABILITY",
    )
    _refused(await _run_cli(tmp_path, "migrate", "no-such-revision"), "no-such-revision")
    for name in ("", " ", "x" * 101):
        _refused(await _run_cli(tmp_path, "keys", "create", "--name", name), "name")
    ok(await _run_cli(tmp_path, "newsletters", "create", "--slug", "news", "--name", "N"))
    nowhere = tmp_path / "missing" / "out.csv"
    _refused(
        await _run_cli(tmp_path, "subscribers", "export", "--newsletter", "news", "--output",
                       str(nowhere)),
        "No such file or directory", str(nowhere),
    )  # fmt: skip
    _refused(await _run_cli(tmp_path, "purge-pending", "--older-than", "soon"), "30d")


async def test_cli_on_an_unmigrated_postgresql_database_says_to_migrate(
    test_database: TestDatabase, tmp_path: Path
) -> None:
    if test_database.backend != "postgresql":
        pytest.skip("SQLite is migrated by the commands themselves")
    async with fresh_pg_database("newsletter_unmigrated") as url:
        for args in (("newsletters", "list"), ("keys", "create", "--name", "x")):
            _refused(
                await _run_cli(tmp_path, *args, secret_keys="k", database_url=url),
                "newsletter migrate",
            )


# ---------------------------------------------------------------- reader pages


def _unsubscribe_path(mail: ReceivedMail) -> str:
    """The https target of a mail's List-Unsubscribe, as a path."""
    header = str(mail.message["List-Unsubscribe"])
    url = next(p.strip(" <>") for p in header.split(",") if "/unsubscribe/" in p)
    return url.removeprefix("http://testserver")


async def test_the_unsubscribe_link_of_an_archived_newsletters_mail_still_works(
    client: httpx.AsyncClient, db: Database, worker: DeliveryWorker, smtp: SMTPServer
) -> None:
    """Mail sent before a newsletter was archived carries `/unsubscribe/{token}?newsletter=`
    for it: the page answered 404 "This link is not valid" (its POST did unsubscribe)."""
    await make_newsletter(db, "weekly", opt_in="single")
    await make_newsletter(db, "daily", opt_in="single")
    admin = await make_key(db)
    for slug in ("weekly", "daily"):
        signup = await client.post(
            "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": [slug]}
        )
        assert signup.status_code == 200, signup.text
    await deliver(worker)
    smtp.sink.received.sort(key=lambda mail: str(mail.message["List-Id"]), reverse=True)
    path = _unsubscribe_path(smtp.sink.received[0])
    assert path.endswith("?newsletter=weekly")
    archived = await client.delete("/v1/admin/newsletters/weekly", headers=admin)
    assert archived.status_code in (200, 204), archived.text

    page = await client.get(path)
    assert page.status_code == 200, page.text
    assert "Weekly" in page.text and "<button" in page.text
    form = {"content-type": "application/x-www-form-urlencoded"}
    clicked = await client.post(path, content=b"List-Unsubscribe=One-Click", headers=form)
    assert clicked.status_code == 200
    assert "Weekly" in clicked.text
    found = await client.get("/v1/admin/subscribers", headers=admin)
    assert found.json()["items"][0]["subscriptions"] == [
        {"newsletter": "daily", "status": "active"},
        {"newsletter": "weekly", "status": "unsubscribed"},
    ]
    # An archived list this reader never had is no link of theirs.
    await make_newsletter(db, "other")
    assert (await client.delete("/v1/admin/newsletters/other", headers=admin)).is_success
    token = path.split("/")[-1].split("?")[0]
    assert (await client.get(f"/unsubscribe/{token}?newsletter=other")).status_code == 404


# ---------------------------------------------------------------- sign-up answers


async def test_a_sign_up_422_names_every_wrong_field_at_once(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: 422 problem+json with per-field errors. An unknown newsletter was only
    reported once every other field was right: a form showed one error, then the next."""
    await make_newsletter(db, "weekly")
    answer = await client.post(
        "/v1/subscriptions", json={"email": "reader@", "newsletters": ["weekly", "nope"]}
    )
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    body = answer.json()
    assert body["title"] == "Please, enter correct email address"
    assert [(e["field"], e["code"]) for e in body["errors"]] == [
        ("email", "invalid_email"),
        ("newsletters", "unknown_newsletter"),
    ]
    assert body["errors"][1]["message"] == "Unknown newsletter: nope"

    long_name = await client.post(
        "/v1/subscriptions",
        json={"email": "reader@example.com", "newsletters": ["nope"], "name": "x" * 500},
    )
    assert [e["field"] for e in long_name.json()["errors"]] == ["newsletters", "name"]

    # A right newsletter next to a wrong address is no error of its own.
    only_email = await client.post(
        "/v1/subscriptions", json={"email": "reader@", "newsletters": ["weekly"]}
    )
    assert [e["field"] for e in only_email.json()["errors"]] == ["email"]

    page = await client.post(
        "/v1/subscriptions",
        data={"email": "reader@", "newsletters": "nope"},
        headers={"accept": "text/html"},
    )
    assert page.status_code == 422
    assert "Please, enter correct email address" in page.text
    assert "Unknown newsletter: nope" in page.text


async def test_the_browser_form_again_keeps_the_name_and_says_what_is_wrong(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md: the form again with the message next to the field and the typed value kept.
    A name was dropped from the form again, and an error on a field the form did not show
    (a too-long name, a bad language) gave the same form back with no message at all."""
    await make_newsletter(db, "weekly")
    html = {"accept": "text/html"}

    wrong_address = await client.post(
        "/v1/subscriptions",
        data={"email": "ada@", "newsletters": "weekly", "name": "Ada <Lovelace>"},
        headers=html,
    )
    assert wrong_address.status_code == 422
    assert 'name="name" value="Ada &lt;Lovelace&gt;"' in wrong_address.text
    assert "Please, enter correct email address" in wrong_address.text

    long_name = await client.post(
        "/v1/subscriptions",
        data={"email": "ada@example.com", "newsletters": "weekly", "name": "x" * 300},
        headers=html,
    )
    assert long_name.status_code == 422
    assert "At most 200 characters." in long_name.text
    assert 'id="name-error"' in long_name.text

    bad_language = await client.post(
        "/v1/subscriptions",
        data={"email": "ada@example.com", "newsletters": "weekly", "language": "not a tag"},
        headers=html,
    )
    assert bad_language.status_code == 422
    assert "Language must be a tag like en or uk." in bad_language.text
    assert 'name="language"' not in bad_language.text  # sending the form again must work
    good_language = await client.post(
        "/v1/subscriptions",
        data={"email": "ada@", "newsletters": "weekly", "language": "en"},
        headers=html,
    )
    assert '<input type="hidden" name="language" value="en">' in good_language.text

    # Without a name, the form stays the one-field form it was.
    plain = await client.post(
        "/v1/subscriptions", data={"email": "ada@", "newsletters": "weekly"}, headers=html
    )
    assert 'name="name"' not in plain.text


async def test_admin_queries_with_empty_parameters_as_design_md_writes_them(
    client: httpx.AsyncClient, db: Database
) -> None:
    """design.md writes the search as `GET /v1/admin/subscribers?email=&newsletter=&status=
    &limit=&cursor=`, as a search form sends it: an empty `status`, `limit` or date was a 422
    while an empty `email` or `cursor` meant "any". Empty is now "not given" everywhere."""
    await make_newsletter(db, "weekly", opt_in="single")
    admin = await make_key(db)
    signup = await client.post(
        "/v1/subscriptions", json={"email": "reader@example.com", "newsletters": ["weekly"]}
    )
    assert signup.status_code == 200
    search = await client.get(
        "/v1/admin/subscribers?email=&newsletter=&status=&limit=&cursor=&created_after=",
        headers=admin,
    )
    assert search.status_code == 200, search.text
    assert [item["email"] for item in search.json()["items"]] == ["reader@example.com"]
    feed = await client.get("/v1/admin/events?cursor=&type=&limit=", headers=admin)
    assert feed.status_code == 200, feed.text
    assert feed.json()["items"]
    export = await client.get("/v1/admin/newsletters/weekly/subscribers.csv?status=", headers=admin)
    assert export.status_code == 200, export.text
    assert "reader@example.com" in export.text
    stats = await client.get("/v1/admin/newsletters/weekly/stats?days=", headers=admin)
    assert stats.status_code == 200, stats.text
    # A value that is there is still checked.
    wrong = await client.get("/v1/admin/subscribers?status=gone&limit=", headers=admin)
    assert wrong.status_code == 422
    assert [e["field"] for e in wrong.json()["errors"]] == ["status"]
