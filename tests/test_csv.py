"""CSV export and import: through the admin API, the domain jobs and the installed command."""

from __future__ import annotations

import asyncio
import csv
import io
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select

from service import csv_export, csv_import, suppression, tokens, webhooks
from service.addresses import normalise
from service.config import Settings
from service.db import Database
from service.keys import create_key
from service.mail.render import Links
from service.mail.worker import DeliveryWorker
from service.models import (
    BlockedEntry,
    Event,
    ImportJob,
    Newsletter,
    OutboxMessage,
    Subscriber,
    Subscription,
    utcnow,
)
from service.subscribers import add_subscriber
from tests.conftest import (
    SMTPServer,
    active_import_job,
    child_env,
    deliver,
    make_newsletter,
    truncate_all,
)

NEWSLETTER_CMD = str(Path(sys.executable).with_name("newsletter"))
HEADER = (
    "email,name,status,subscribed_at,confirmed_at,unsubscribe_url,manage_url,"
    "language,unsubscribed_at,consent_source,subscriber_id"
)


# ---------------------------------------------------------------- helpers


async def make_key(db: Database, scope: str = "admin", name: str = "ops") -> str:
    async with db.transaction() as session:
        return (await create_key(session, name, scope)).key


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def upload(
    client: httpx.AsyncClient,
    key: str,
    content: bytes,
    newsletter: str = "weekly",
    status: str = "active",
    consent_note: str = "Signed up at the 2024 conference",
) -> httpx.Response:
    return await client.post(
        "/v1/admin/imports",
        files={"file": ("members.csv", content, "text/csv")},
        data={"newsletter": newsletter, "status": status, "consent_note": consent_note},
        headers=bearer(key),
    )


async def finished(client: httpx.AsyncClient, key: str, url: str) -> dict[str, Any]:
    """Poll an import until it is done or failed (bounded)."""
    for _ in range(400):
        answer = await client.get(url, headers=bearer(key))
        assert answer.status_code == 200, answer.text
        report: dict[str, Any] = answer.json()
        if report["status"] in ("done", "failed"):
            return report
        await asyncio.sleep(0.025)
    raise AssertionError(f"import at {url} did not finish: {report}")


async def imported(
    client: httpx.AsyncClient, key: str, content: bytes, **kw: str
) -> dict[str, Any]:
    answer = await upload(client, key, content, **kw)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body == {"id": body["id"], "status": "queued", "url": f"/v1/admin/imports/{body['id']}"}
    return await finished(client, key, body["url"])


async def export(
    client: httpx.AsyncClient, key: str, slug: str = "weekly", **params: str
) -> list[dict[str, str]]:
    answer = await client.get(
        f"/v1/admin/newsletters/{slug}/subscribers.csv", params=params, headers=bearer(key)
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.headers["content-disposition"].startswith("attachment")
    assert answer.text.splitlines()[0] == HEADER
    return list(csv.DictReader(io.StringIO(answer.text)))


def lines(entries: list[dict[str, Any]]) -> dict[int, str]:
    return {e["line"]: e["reason"] for e in entries}


# ---------------------------------------------------------------- the address fast path

TRICKY_ADDRESSES = [
    "plain@example.com",
    "Mixed.Case@Example.COM",
    "  spaced@example.com  ",
    "tag+filter@sub.example.co.uk",
    "o'brien@example.ie",
    "=cmd@example.com",
    "-lead@example.com",
    "{braces}|pipe~@example.org",
    "a@b.c",
    "a@b.cd",
    "x@xn--bcher-kva.example",
    "x@ab--cd.example.com",
    "x@a-b.example.com",
    "x@-ab.example.com",
    "x@ab-.example.com",
    "Info@example.com",
    "POSTMASTER@example.com",
    "x@example.test",
    "x@foo.localhost",
    "x@example.invalid",
    "x@host.local",
    "x@example.onion",
    "x@1.2.3.4",
    "x@[127.0.0.1]",
    "x@example.123",
    "x@example",
    "x@example.com.",
    "x@.example.com",
    "x..y@example.com",
    ".x@example.com",
    "x.@example.com",
    '"quoted"@example.com',
    "Name <x@example.com>",
    "x@exam_ple.com",
    "x@@example.com",
    "@example.com",
    "x@",
    "ünïcode@example.com",
    "x@bücher.example",
    "x@EXAMPLE.\uff23\uff2f\uff2d",  # full-width COM
    "x\uff20example.com",  # full-width at-sign
    "a" * 64 + "@example.com",
    "a" * 65 + "@example.com",
    "a" * 240 + "@example.com",
    "a" * 250 + "@example.com",
    "x@" + "a" * 63 + ".com",
    "x@" + "a" * 64 + ".com",
    "x@" + ".".join(["abcdefghi"] * 25) + ".com",
    "x@" + ".".join(["abcdefghi"] * 26) + ".com",
    "x@example.c" + "o" * 70,
    "x\n@example.com",
    "x@example.com\n",
    "tab\t@example.com",
]


def expected(raw: str) -> tuple[str, str] | None:
    """What email-validator alone makes of an address (normalised, key), or None if invalid."""
    try:
        result = validate_email(raw.strip(), check_deliverability=False)
    except EmailNotValidError:
        return None
    return result.normalized, result.normalized.lower()


def actual(raw: str) -> tuple[str, str] | None:
    found = normalise(raw)
    return (found.email, found.key) if not hasattr(found, "code") else None  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", TRICKY_ADDRESSES)
def test_fast_path_agrees_with_email_validator(raw: str) -> None:
    assert actual(raw) == expected(raw)


def test_fast_path_agrees_on_random_addresses() -> None:
    pieces = [*"abcXYZ09._-+=!#'~@", "--", "..", "xn--", "@", ".com", ".test", "é", " "]
    rng = random.Random(20240501)
    for _ in range(5000):
        raw = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        if "@" not in raw:
            raw += "@" + rng.choice(["example.com", "Example.ORG", "a-b.io", "x.y", "q.local"])
        assert actual(raw) == expected(raw), raw


# ---------------------------------------------------------------- export


async def test_export_lists_subscribers_with_links_that_work(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    key = await make_key(db, "read")
    for email in ("ada@example.com", "Bob@Example.com"):
        answer = await client.post(
            "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"], "name": "R"}
        )
        assert answer.status_code == 200, answer.text

    rows = await export(client, key, status="active")
    assert [r["email"] for r in rows] == ["ada@example.com", "Bob@example.com"]
    ada = rows[0]
    assert ada["status"] == "active" and ada["consent_source"] == "api"
    assert ada["subscribed_at"].endswith("Z") and ada["confirmed_at"].endswith("Z")
    assert ada["unsubscribe_url"].startswith("http://testserver/unsubscribe/")
    assert ada["unsubscribe_url"].endswith("?newsletter=weekly")

    manage = await client.get(ada["manage_url"].removeprefix("http://testserver"))
    assert manage.status_code == 200
    unsubscribe = ada["unsubscribe_url"].removeprefix("http://testserver")
    assert (await client.get(unsubscribe)).status_code == 200
    assert (await client.post(unsubscribe)).status_code == 200

    assert [r["email"] for r in await export(client, key, status="active")] == ["Bob@example.com"]
    [gone] = await export(client, key, status="unsubscribed")
    assert gone["email"] == "ada@example.com" and gone["unsubscribed_at"].endswith("Z")
    assert len(await export(client, key)) == 2
    assert await export(client, key, status="pending") == []


async def test_export_neutralises_spreadsheet_formulas(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    key = await make_key(db, "read")
    for email, name in (
        ("formula@example.com", "=cmd()"),
        ("-minus@example.com", "+1 555"),
        ("plain@example.com", "@home"),
    ):
        answer = await client.post(
            "/v1/subscriptions", json={"email": email, "newsletters": ["weekly"], "name": name}
        )
        assert answer.status_code == 200, answer.text

    rows = {r["email"]: r["name"] for r in await export(client, key)}
    assert rows == {
        "formula@example.com": "'=cmd()",
        "'-minus@example.com": "'+1 555",
        "plain@example.com": "'@home",
    }


async def test_export_pages_through_a_long_list(
    client: httpx.AsyncClient, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    await make_newsletter(db, "daily", opt_in="single")
    key = await make_key(db, "read")
    names = ["Ada", 'Smith, "Jo"', "Zoë Ünïcode", "Bob", "Cy", "Di", "Ed"]
    for i, name in enumerate(names):
        for slug in ("weekly", "daily") if i % 2 else ("daily", "weekly"):
            answer = await client.post(
                "/v1/subscriptions",
                json={"email": f"reader{i}@example.com", "newsletters": [slug], "name": name},
            )
            assert answer.status_code == 200, answer.text
    monkeypatch.setattr(csv_export, "EXPORT_PAGE_ROWS", 2)

    rows = await export(client, key)
    assert [(r["email"], r["name"]) for r in rows] == [
        (f"reader{i}@example.com", name) for i, name in enumerate(names)
    ]
    assert len({r["manage_url"] for r in rows}) == len(names)


async def test_export_of_an_unknown_newsletter_is_404(
    client: httpx.AsyncClient, db: Database
) -> None:
    key = await make_key(db, "read")
    answer = await client.get("/v1/admin/newsletters/nope/subscribers.csv", headers=bearer(key))
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["status"] == 404
    assert (await client.get("/v1/admin/newsletters/nope/subscribers.csv")).status_code == 401


async def test_export_records_who_exported(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")
    key = await make_key(db, "read", name="auditor")
    await export(client, key, status="active")
    async with db.transaction() as session:
        actors = list(
            await session.scalars(select(Event.actor).where(Event.type == "subscribers.exported"))
        )
    assert actors == ["key:auditor"]


# ---------------------------------------------------------------- import


async def test_hostile_import_reports_each_bad_line_and_keeps_only_good_rows(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    key = await make_key(db)
    async with db.transaction() as session:
        session.add(BlockedEntry(kind="domain", value="blocked.example", note="spam trap"))
        session.add(BlockedEntry(kind="address", value="troll@example.com"))
        await suppression.suppress(session, "gone@example.com", "erased")
    answer = await client.post(
        "/v1/subscriptions", json={"email": "left@example.com", "newsletters": ["weekly"]}
    )
    assert answer.status_code == 200
    assert (
        await client.post(
            "/v1/subscriptions", json={"email": "left@example.com", "newsletters": ["weekly"]}
        )
    ).status_code == 200
    async with db.transaction() as session:
        await session.execute(
            Subscription.__table__.update().values(status="unsubscribed", unsubscribed_at=utcnow())
        )

    content = b"".join(
        [
            b"\xef\xbb\xbfEmail,Name,Company\r\n",  # 1: header, with a BOM
            b"good@example.com,Good,ACME\r\n",  # 2
            b"not-an-address,Bad,\r\n",  # 3
            b'formula@example.com,=cmd(),"=HYPERLINK(""x"")"\r\n',  # 4
            b"big@example.com," + b"x" * 2000 + b",\r\n",  # 5
            b"GOOD@Example.com,Again,\r\n",  # 6
            b"someone@mail.blocked.example,Blocked,\r\n",  # 7
            b"Gone@example.com,Erased,\r\n",  # 8
            b"many@example.com,a,b,c\r\n",  # 9
            b"latin@example.com,Ren\xe9,\r\n",  # 10
            b",No address,\r\n",  # 11
            b"left@example.com,Left,\r\n",  # 12
            b'multi@example.com,"Two\r\nLines",\r\n',  # 13-14
            b"nul@example.com,a\x00b,\r\n",  # 15
            b"\r\n",  # 16: blank, not a row
            b"last@example.com,Last,\r\n",  # 17
            b"Troll@Example.com,Troll,\r\n",  # 18
        ]
    )
    report = await imported(client, key, content)

    assert report["status"] == "done", report
    assert report["error"] is None
    assert lines(report["rejected"]) == {
        3: "invalid email: An email address must have an @-sign.",
        5: "field too long (more than 1000 characters)",
        9: "too many columns",
        10: "invalid UTF-8",
        11: "email missing",
        15: "NUL character",
    }
    assert lines(report["skipped"]) == {
        6: "duplicate",
        7: "blocked",
        8: "suppressed",
        12: "unsubscribed",
        18: "blocked",
    }
    assert (report["rows_total"], report["rows_imported"]) == (15, 4)
    assert (report["rows_skipped"], report["rows_rejected"]) == (5, 6)
    assert report["filename"] == "members.csv" and report["actor"] == "key:ops"

    async with db.transaction() as session:
        found = (
            await session.execute(
                select(Subscriber.email, Subscriber.name, Subscriber.attributes, Subscription)
                .join(Subscription, Subscription.subscriber_id == Subscriber.id)
                .order_by(Subscriber.email)
            )
        ).all()
        assert await session.scalar(select(func.count()).select_from(Subscriber)) == 5
        events = list(
            await session.scalars(
                select(Event.actor).where(
                    Event.type == "subscription.confirmed", Event.actor == "key:ops"
                )
            )
        )
    by_email = {email: (name, attrs, sub) for email, name, attrs, sub in found}
    assert sorted(by_email) == [
        "formula@example.com",
        "good@example.com",
        "last@example.com",
        "left@example.com",
        "multi@example.com",
    ]
    assert by_email["good@example.com"][:2] == ("Good", {"Company": "ACME"})
    assert by_email["formula@example.com"][:2] == ("=cmd()", {"Company": '=HYPERLINK("x")'})
    assert by_email["multi@example.com"][0] == "TwoLines"
    assert by_email["left@example.com"][2].status == "unsubscribed"
    good = by_email["good@example.com"][2]
    assert good.status == "active" and good.consent_source == "import"
    assert good.consent_page == "Signed up at the 2024 conference"
    assert len(events) == 4

    # What was imported exports back with its formulas made inert.
    rows = {r["email"]: r for r in await export(client, key, status="active")}
    assert rows["formula@example.com"]["name"] == "'=cmd()"
    assert set(rows) == {
        "good@example.com",
        "formula@example.com",
        "multi@example.com",
        "last@example.com",
    }


async def test_export_imports_back_unchanged(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    await make_newsletter(db, "daily", opt_in="single")
    key = await make_key(db)
    first = await imported(
        client, key, b"email,name,language\n=eq@example.com,=cmd(),en\nb@example.com,B,\n"
    )
    assert first["rows_imported"] == 2, first
    answer = await client.get("/v1/admin/newsletters/weekly/subscribers.csv", headers=bearer(key))

    again = await imported(client, key, answer.content, newsletter="daily")
    assert (again["rows_imported"], again["rejected"]) == (2, [])
    async with db.transaction() as session:
        names = dict((await session.execute(select(Subscriber.email, Subscriber.name))).all())
        attributes = list(await session.scalars(select(Subscriber.attributes)))
    assert names == {"=eq@example.com": "=cmd()", "b@example.com": "B"}
    assert attributes == [{}, {}]  # the export's own columns are not custom attributes


async def test_a_file_that_is_not_utf8_fails_with_a_clear_error(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    key = await make_key(db)
    report = await imported(client, key, "émail,name\nx@example.com,X\n".encode("latin-1"))
    assert report["status"] == "failed"
    assert "not UTF-8" in report["error"]
    assert report["rows_imported"] == 0


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"", "The file is empty"),
        (b"name,company\nAda,ACME\n", "no email column"),
        (b"email,Email\nx@example.com,y@example.com\n", "same name"),
        (",".join(f"c{i}" for i in range(60)).encode() + b",email\n", "Too many columns"),
    ],
)
async def test_a_file_without_a_usable_header_fails(
    client: httpx.AsyncClient, db: Database, content: bytes, error: str
) -> None:
    await make_newsletter(db, "weekly")
    key = await make_key(db)
    report = await imported(client, key, content)
    assert report["status"] == "failed"
    assert error in report["error"]


async def test_pending_import_sends_each_a_confirmation_mail(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")
    key = await make_key(db)
    answer = await client.post(
        "/v1/admin/imports",
        params={"newsletter": "weekly", "status": "pending"},
        content=b"email,name\nada@example.com,Ada\nbob@example.com,=cmd()\nada@example.com,\n",
        headers={**bearer(key), "content-type": "text/csv"},
    )
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == answer.json()["url"]
    report = await finished(client, key, answer.json()["url"])
    assert (report["status"], report["rows_imported"]) == ("done", 2)
    assert lines(report["skipped"]) == {4: "duplicate"}

    assert await deliver(worker) == 2
    assert sorted(r for m in smtp.sink.received for r in m.rcpt_tos) == [
        "ada@example.com",
        "bob@example.com",
    ]
    mail = smtp.sink.received[0]
    assert "The Weekly" in mail.message["Subject"]
    assert "http://testserver/confirm/" in mail.text()
    assert "=cmd()" not in mail.text()  # imported free text never reaches the mail
    async with db.transaction() as session:
        statuses = list(await session.scalars(select(Subscription.status)))
        sources = set(await session.scalars(select(Subscription.consent_source)))
    assert statuses == ["pending", "pending"] and sources == {"import"}

    # Importing the same people again leaves them pending and mails nobody.
    again = await upload(client, key, b"email\nada@example.com\n", status="pending")
    report = await finished(client, key, again.json()["url"])
    assert lines(report["skipped"]) == {2: "already pending"}
    assert await deliver(worker) == 0


async def test_active_import_needs_a_consent_note(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")
    key = await make_key(db)
    answer = await upload(client, key, b"email\nx@example.com\n", consent_note="  ")
    assert answer.status_code == 422
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["errors"][0]["field"] == "consent_note"
    raw = await client.post(
        "/v1/admin/imports",
        params={"newsletter": "weekly"},
        content=b"email\nx@example.com\n",
        headers={**bearer(key), "content-type": "text/csv"},
    )
    assert raw.status_code == 422
    assert raw.json()["errors"][0]["field"] == "consent_note"
    for slug in ("nope", "bad\x00slug"):
        unknown = await upload(client, key, b"email\nx@example.com\n", newsletter=slug)
        assert unknown.status_code == 422
        assert unknown.json()["errors"][0]["code"] == "unknown_newsletter"
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(ImportJob)) == 0


async def test_pending_import_into_a_single_opt_in_newsletter_is_refused(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly", opt_in="single")
    key = await make_key(db)
    answer = await upload(client, key, b"email\nx@example.com\n", status="pending")
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["field"] == "status"


async def test_import_needs_an_admin_key(client: httpx.AsyncClient, db: Database) -> None:
    await make_newsletter(db, "weekly")
    read = await make_key(db, "read")
    admin = await make_key(db, "admin")
    assert (await client.post("/v1/admin/imports", content=b"email\n")).status_code == 401
    forbidden = await upload(client, read, b"email\nx@example.com\n")
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "application/problem+json"

    report = await imported(client, admin, b"email\nx@example.com\n")
    assert report["rows_imported"] == 1
    # A read key may follow the report, and an unknown import is a 404.
    assert (await client.get(f"/v1/admin/imports/{report['id']}", headers=bearer(read))).json()[
        "rows_imported"
    ] == 1
    assert (await client.get("/v1/admin/imports/999999", headers=bearer(read))).status_code == 404
    assert (await client.get(f"/v1/admin/imports/{report['id']}")).status_code == 401


async def test_upload_of_another_type_is_415(client: httpx.AsyncClient, db: Database) -> None:
    key = await make_key(db)
    answer = await client.post("/v1/admin/imports", json={"email": "x"}, headers=bearer(key))
    assert answer.status_code == 415
    missing = await client.post(
        "/v1/admin/imports",
        data={"newsletter": "weekly", "consent_note": "x"},
        files={"other": ("a.csv", b"email\n", "text/csv")},
        headers=bearer(key),
    )
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "file"


async def test_upload_is_stored_on_disk_and_capped(
    client: httpx.AsyncClient, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_newsletter(db, "weekly")
    key = await make_key(db)
    monkeypatch.setattr(csv_import, "MAX_UPLOAD_BYTES", 64)
    big = b"email\n" + b"x@example.com\n" * 10
    assert (await upload(client, key, big)).status_code == 413  # by its Content-Length

    async def streamed() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 16):
            yield big[start : start + 16]

    # Without a length, the body is counted as it streams in and the partial file removed.
    chunked = await client.post(
        "/v1/admin/imports",
        params={"newsletter": "weekly", "consent_note": "x"},
        content=streamed(),
        headers={**bearer(key), "content-type": "text/csv"},
    )
    assert chunked.status_code == 413
    assert list((settings.data_dir / "imports").iterdir()) == []
    monkeypatch.undo()
    report = await imported(client, key, b"email\nx@example.com\n")
    async with db.transaction() as session:
        job = await session.get_one(ImportJob, report["id"])
    stored = Path(job.path)
    assert stored.parent == (settings.data_dir / "imports").resolve()
    assert stored.read_bytes() == b"email\nx@example.com\n"


async def test_rows_repeated_across_chunks_are_duplicates_and_a_rerun_changes_nothing(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    await make_newsletter(db, "weekly")
    path = tmp_path / "list.csv"
    path.write_text("email\na@example.com\nb@example.com\nc@example.com\nA@example.com\n")

    async def run() -> ImportJob:
        job_id = await active_import_job(db, path)
        return await csv_import.run_import(db, settings, job_id, chunk_rows=2)

    first = await run()
    assert (first.status, first.rows_imported, first.rows_skipped) == ("done", 3, 1)
    assert first.rejected == [{"line": 5, "reason": "duplicate", "outcome": "skipped"}]
    second = await run()
    assert (second.rows_imported, second.rows_skipped) == (0, 4)
    assert {e["reason"] for e in second.rejected} == {"already subscribed"}
    async with db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Subscription)) == 3
        kinds = list(await session.scalars(select(Event.type).where(Event.type.like("import.%"))))
    assert sorted(kinds) == ["import.created"] * 2 + ["import.finished"] * 2


# ---------------------------------------------------------------- the command


async def newsletter_cmd(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [NEWSLETTER_CMD, *args],
        env=child_env(settings),
        cwd=settings.data_dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_imports_and_exports(db: Database, settings: Settings, tmp_path: Path) -> None:
    await make_newsletter(db, "weekly")
    source = tmp_path / "members.csv"
    source.write_text("email,name\nada@example.com,Ada\nbroken,X\nbob@example.com,=cmd()\n")

    # Without --consent-note the command records one naming the file (test_contract.py).
    done = await newsletter_cmd(
        settings,
        "subscribers",
        "import",
        str(source),
        "--newsletter",
        "weekly",
        "--consent-note",
        "Paper forms, May 2024",
    )
    assert done.returncode == 0, done.stderr
    assert "2 imported, 0 skipped, 1 rejected of 3 rows" in done.stdout
    assert "line 3: invalid email" in done.stdout
    assert "3 rows read" in done.stderr  # the progress line

    exported = await newsletter_cmd(
        settings, "subscribers", "export", "--newsletter", "weekly", "--status", "active"
    )
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["email"], r["name"]) for r in rows] == [
        ("ada@example.com", "Ada"),
        ("bob@example.com", "'=cmd()"),
    ]
    output = tmp_path / "out.csv"
    to_file = await newsletter_cmd(
        settings, "subscribers", "export", "--newsletter", "weekly", "--output", str(output)
    )
    assert to_file.returncode == 0, to_file.stderr
    assert output.read_text().splitlines()[0] == HEADER
    unknown = await newsletter_cmd(settings, "subscribers", "export", "--newsletter", "nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr


# ---------------------------------------------------------------- the active import's paths


async def _job_and_rows(
    db: Database, settings: Settings, path: Path, content: str
) -> tuple[Any, list[Any]]:
    """The import job for `content` and its rows, read as run_import reads them."""
    path.write_text(content)
    job = await csv_import._claim(db, await active_import_job(db, path, actor="key:ops"))
    reader = csv_import._Reader(path, settings.max_attributes_bytes)
    try:
        reader.read_header()
        chunk = reader.read_chunk(1000)
    finally:
        reader.close()
    assert chunk is not None
    return job, chunk.rows


async def _state(db: Database) -> list[tuple[Any, ...]]:
    """What an import leaves, without ids and times (which differ from run to run)."""
    async with db.transaction() as session:
        subscriptions = (
            await session.execute(
                select(
                    Subscriber.email_key,
                    Subscriber.name,
                    Subscriber.language,
                    Subscriber.attributes,
                    Subscription.status,
                    Subscription.consent_source,
                    Subscription.consent_page,
                ).join(Subscription, Subscription.subscriber_id == Subscriber.id)
            )
        ).all()
        logged = (
            await session.execute(
                select(Subscriber.email_key, Event.type, Event.actor, Event.ip, Event.data)
                .join(Subscriber, Subscriber.id == Event.subscriber_id)
                .where(Event.type == "subscription.confirmed")
            )
        ).all()
        calls = await session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.kind == "webhook")
        )
    return [*sorted(tuple(map(repr, row)) for row in [*subscriptions, *logged]), ("calls", calls)]


@pytest.mark.parametrize("webhook", [False, True], ids=["no-webhook", "webhook"])
async def test_staged_postgresql_import_agrees_with_the_generic_path(
    db: Database, settings: Settings, tmp_path: Path, webhook: bool
) -> None:
    """PostgreSQL's COPY path and the generic one (SQLite's) leave the same rows, events and
    webhook calls and give the same reasons, from the same starting state."""
    if db.is_sqlite:
        pytest.skip("the staged path is PostgreSQL's")
    content = (
        "email,name,language,company\n"
        "new@example.com,New,en,ACME\n"
        "troll@example.com,Blocked,,\n"
        "x@mail.blocked.example,Blocked domain,,\n"
        "gone@example.com,Suppressed,,\n"
        "pending@example.com,Pending,,\n"
        "left@example.com,Unsubscribed,,\n"
        "other@example.com,On another list,de,\n"
        "'=formula@example.com,=1+1,,=2\n"
    )
    outcomes = []
    for write in (csv_import._write_active_pg, csv_import._write_active_generic):
        await truncate_all(db)
        await make_newsletter(db, "weekly")
        await make_newsletter(db, "daily")
        async with db.transaction() as session:
            session.add(BlockedEntry(kind="domain", value="blocked.example", note="trap"))
            session.add(BlockedEntry(kind="address", value="troll@example.com", note="troll"))
            await suppression.suppress(session, "gone@example.com", "erased")
            if webhook:
                await webhooks.create_webhook(
                    session, "https://hooks.example.com/in", ["subscription.confirmed"]
                )
        for email, newsletter, status in (
            ("pending@example.com", "weekly", "pending"),
            ("left@example.com", "weekly", "active"),
            ("other@example.com", "daily", "active"),
        ):
            async with db.transaction() as session:
                await add_subscriber(
                    session,
                    settings,
                    email=email,
                    newsletters=[newsletter],
                    status=status,
                    actor="key:ops",
                    consent_note="phone call",
                )
        async with db.transaction() as session:
            await session.execute(
                Subscription.__table__.update()
                .where(
                    Subscription.subscriber_id
                    == select(Subscriber.id)
                    .where(Subscriber.email_key == "left@example.com")
                    .scalar_subquery()
                )
                .values(status="unsubscribed", unsubscribed_at=utcnow())
            )
        job, rows = await _job_and_rows(db, settings, tmp_path / "list.csv", content)
        async with db.transaction() as session:
            imported, skipped = await write(session, job, rows, utcnow())
        # Again: now every row is a duplicate of this same import, or skipped as before.
        async with db.transaction() as session:
            again = await write(session, job, rows, utcnow())
        outcomes.append((imported, sorted(skipped), again[0], sorted(again[1]), await _state(db)))
    staged, generic = outcomes
    assert staged == generic
    assert staged[:2] == (
        3,  # new, other (already on another list) and formula
        [
            (3, "blocked"),
            (4, "blocked"),
            (5, "suppressed"),
            (6, "already pending"),
            (7, "unsubscribed"),
        ],
    )
    assert staged[2] == 0
    assert [reason for _, reason in staged[3]].count("duplicate") == 3  # new, other, formula
    # Two calls for the setup's active subscriptions, three for the import's.
    assert ("calls", 5 if webhook else 0) in staged[4]


async def test_staged_import_row_written_by_someone_else_meanwhile(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """An address inserted by another transaction while the chunk's statement waits on it is
    neither created by the import nor in the statement's snapshot: the generic path looks
    again and subscribes that subscriber."""
    if db.is_sqlite:
        pytest.skip("PostgreSQL's concurrency")
    await make_newsletter(db, "weekly")
    job, rows = await _job_and_rows(
        db, settings, tmp_path / "list.csv", "email\nfirst@example.com\nrace@example.com\n"
    )
    other = Database(settings)
    try:
        async with other.transaction() as racing:
            await racing.execute(
                Subscriber.__table__.insert().values(
                    public_id=tokens.new_public_ids(1)[0],
                    email="race@example.com",
                    email_key="race@example.com",
                    attributes={},
                    created_at=utcnow(),
                    updated_at=utcnow(),
                )
            )

            async def write() -> tuple[int, list[tuple[int, str]]]:
                async with db.transaction() as session:
                    return await csv_import._write_active_pg(session, job, rows, utcnow())

            writing = asyncio.ensure_future(write())
            await asyncio.sleep(0.5)  # the import now waits on race@example.com's insert
            assert not writing.done()
        imported, skipped = await writing
    finally:
        await other.dispose()
    assert (imported, skipped) == (2, [])
    async with db.transaction() as session:
        emails = await session.scalars(
            select(Subscriber.email_key)
            .join(Subscription, Subscription.subscriber_id == Subscriber.id)
            .where(Subscription.status == "active")
        )
        assert sorted(emails) == ["first@example.com", "race@example.com"]


# ---------------------------------------------------------------- the export's formatter


def _reference_page(settings: Settings, slug: str, rows: list[tuple[Any, ...]]) -> bytes:
    """A page as csv.writer writes it, with tokens.manage_token() and neutralise() per row."""
    links = Links(settings)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for email, name, language, public_id, status, sub_at, conf_at, unsub_at, source, _ in rows:
        writer.writerow(
            (
                csv_export.neutralise(email),
                csv_export.neutralise(name or ""),
                status,
                sub_at or "",
                conf_at or "",
                links.unsubscribe(public_id, slug),
                links.manage(public_id),
                csv_export.neutralise(language or ""),
                unsub_at or "",
                source,
                public_id,
            )
        )
    return out.getvalue().encode()


@pytest.mark.parametrize(
    "key", ["test-secret-one", "k", "ключ-🔑", "x" * 64, "y" * 65, "z" * 200], ids=repr
)
def test_export_formatter_writes_what_csv_writer_and_manage_token_write(
    settings: Settings, key: str
) -> None:
    settings = settings.model_copy(update={"secret_keys": [key, "older"]})
    rng = random.Random(key)
    texts = [
        "",
        None,
        "Ada",
        "=cmd()",
        "+1",
        "-x",
        "@sum",
        "\tTab",
        "a,b",
        'say "hi"',
        "line\nbreak",
        "cr\rhere",
        "Ünïcödé",
        "'=already",
    ]
    emails = ["a@example.com", "=x@example.com", "+tag@example.com", "-a@example.com"]

    def row(i: int, free_text: bool) -> tuple[Any, ...]:
        return (
            rng.choice(emails) if free_text else f"u{i}@example.com",
            rng.choice(texts) if free_text else rng.choice(["Ada", None, "=sum()"]),
            rng.choice(["en", "-en", None]) if free_text else rng.choice(["en", None]),
            tokens.new_public_ids(1)[0],
            rng.choice(["active", "pending", "unsubscribed"]),
            "2026-11-25T10:00:00Z",
            rng.choice(["2026-11-25T10:01:00Z", None]),
            rng.choice(["2026-11-25T10:02:00Z", None]),
            rng.choice(["import", "form", "api"]),
            i,
        )

    formatter = csv_export._RowFormatter(settings, "weekly")
    for hostile in (False, True):  # a page with nothing to quote, and a page with some
        rows = [row(i, hostile and i % 3 == 0) for i in range(300)]
        assert formatter.format(rows) == _reference_page(settings, "weekly", rows)
    for public_id in tokens.new_public_ids(200):
        assert csv_export._Signer(key).tokens([public_id]) == [
            tokens.manage_token([key], public_id)
        ]


async def test_staged_import_keeps_a_subscription_made_meanwhile(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """Someone already a subscriber signs up to this newsletter while the chunk's statement
    runs: theirs is kept, the row is skipped as already subscribed, the others imported."""
    if db.is_sqlite:
        pytest.skip("PostgreSQL's concurrency")
    await make_newsletter(db, "weekly")
    await make_newsletter(db, "daily")
    async with db.transaction() as session:
        await add_subscriber(
            session,
            settings,
            email="known@example.com",
            newsletters=["daily"],
            status="active",
            actor="key:ops",
            consent_note="phone call",
        )
        known = await session.scalar(
            select(Subscriber.id).where(Subscriber.email_key == "known@example.com")
        )
        newsletter_id = await session.scalar(
            select(Newsletter.id).where(Newsletter.slug == "weekly")
        )
    job, rows = await _job_and_rows(
        db, settings, tmp_path / "list.csv", "email\nfirst@example.com\nknown@example.com\n"
    )
    other = Database(settings)
    try:
        async with other.transaction() as racing:
            now = utcnow()
            await racing.execute(
                Subscription.__table__.insert().values(
                    subscriber_id=known,
                    newsletter_id=newsletter_id,
                    status="pending",
                    created_at=now,
                    updated_at=now,
                    pending_at=now,
                    consent_source="form",
                    consent_at=now,
                )
            )

            async def write() -> tuple[int, list[tuple[int, str]]]:
                async with db.transaction() as session:
                    return await csv_import._write_active_pg(session, job, rows, utcnow())

            writing = asyncio.ensure_future(write())
            await asyncio.sleep(0.5)  # the import now waits on that subscription's insert
            assert not writing.done()
        imported, skipped = await writing
    finally:
        await other.dispose()
    assert (imported, skipped) == (1, [(3, "already subscribed")])
    async with db.transaction() as session:
        status = await session.scalar(
            select(Subscription.status).where(
                Subscription.subscriber_id == known, Subscription.newsletter_id == newsletter_id
            )
        )
    assert status == "pending"
