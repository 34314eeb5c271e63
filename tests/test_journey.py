"""The whole double opt-in journey, through the HTTP app and the real SMTP server."""

from __future__ import annotations

import re

import httpx

from service.db import Database
from service.mail.worker import DeliveryWorker
from tests.conftest import SMTPServer, deliver, make_newsletter

THANKS = "Thank you for signing up for this newsletter. We've sent you a confirmation email."


def link(text: str, path: str) -> str:
    found = re.search(rf"http://testserver(/{path}/[^\s\"<>]+)", text)
    assert found, f"no /{path}/ link in {text!r}"
    return found.group(1)


async def test_double_opt_in_journey(
    client: httpx.AsyncClient, db: Database, smtp: SMTPServer, worker: DeliveryWorker
) -> None:
    await make_newsletter(db, "weekly", name="The Weekly")

    answer = await client.post(
        "/v1/subscriptions", json={"email": "Reader@Example.COM", "newsletters": ["weekly"]}
    )
    assert answer.status_code == 202
    assert answer.json() == {"status": "pending", "message": THANKS}

    assert await deliver(worker) == 1
    [mail] = smtp.sink.received
    assert mail.rcpt_tos == ["Reader@example.com"]
    assert mail.message.get_content_type() == "multipart/alternative"
    assert "The Weekly" in mail.message["Subject"]
    assert mail.message["Message-ID"] and mail.message["Date"] and mail.message["List-Id"]
    assert mail.message["List-Unsubscribe"] is None  # not on the confirmation itself
    confirm_path = link(mail.text(), "confirm")
    assert confirm_path == link(mail.html(), "confirm")

    # The GET shows a button and changes nothing.
    page = await client.get(confirm_path)
    assert page.status_code == 200
    assert "Confirm" in page.text
    listed = await _admin_statuses(client, db)
    assert listed == [("weekly", "pending")]

    confirmed = await client.post(confirm_path)
    assert confirmed.status_code == 200
    assert "Your subscription is confirmed" in confirmed.text
    assert await _admin_statuses(client, db) == [("weekly", "active")]

    # Confirming again is a harmless no-op with the same success.
    again = await client.post(confirm_path)
    assert again.status_code == 200
    assert "Your subscription is confirmed" in again.text

    assert await deliver(worker) == 1
    welcome = smtp.sink.received[1]
    assert "Welcome" in welcome.message["Subject"]
    assert welcome.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https, mailto = [part.strip(" <>") for part in welcome.message["List-Unsubscribe"].split(",")]
    assert mailto.startswith("mailto:")
    one_click = await client.post(
        https.removeprefix("http://testserver"),
        content="List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert one_click.status_code == 200
    assert await _admin_statuses(client, db) == [("weekly", "unsubscribed")]


async def _admin_statuses(client: httpx.AsyncClient, db: Database) -> list[tuple[str, str]]:
    from service.keys import create_key

    async with db.transaction() as session:
        key = (await create_key(session, "test", "read")).key
    answer = await client.get(
        "/v1/admin/subscribers",
        params={"email": "reader@example.com"},
        headers={"authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["items"]
    return [(s["newsletter"], s["status"]) for s in item["subscriptions"]]
