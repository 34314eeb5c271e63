"""Webhooks: signed calls from the outbox to a real receiver on loopback, retried, logged."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import select

from service import events, webhooks
from service.db import Database
from service.events import event_row
from service.mail.worker import DeliveryWorker
from service.models import Event, OutboxMessage, table, utcnow
from service.signup import outbox_row
from tests.conftest import SMTPServer, deliver, make_newsletter
from tests.test_admin import make_key


@dataclass
class Receiver:
    url: str
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)  # status codes to give, then 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            state.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(state.answers.pop(0) if state.answers else 200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


async def test_events_reach_the_receiver_signed_and_retried(
    client: httpx.AsyncClient,
    db: Database,
    worker: DeliveryWorker,
    smtp: SMTPServer,
    receiver: Receiver,
) -> None:
    headers = await make_key(db)
    await make_newsletter(db, "weekly", opt_in="single")
    created = await client.post(
        "/v1/admin/webhooks",
        json={
            "url": receiver.url,
            "event_types": ["subscription.confirmed", "subscription.unsubscribed"],
        },
        headers=headers,
    )
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["secret"].startswith("whsec_")
    listed = (await client.get("/v1/admin/webhooks", headers=headers)).json()["items"]
    assert "secret" not in listed[0]
    bad = await client.post(
        "/v1/admin/webhooks", json={"url": "ftp://x", "event_types": ["nope"]}, headers=headers
    )
    assert bad.status_code == 422

    receiver.answers = [500]  # the first call fails and is retried
    await client.post(
        "/v1/subscriptions", json={"email": "hook@example.com", "newsletters": ["weekly"]}
    )
    await deliver(worker)

    assert len(receiver.calls) == 2
    (first_headers, _), (call_headers, body) = receiver.calls
    assert first_headers["webhook-id"] == call_headers["webhook-id"]  # same message, retried
    assert webhooks.verify(hook["secret"], call_headers, body)
    assert not webhooks.verify("whsec_wrong", call_headers, body)
    assert not webhooks.verify(hook["secret"], call_headers, body + b" ")
    # A captured call replayed later is refused by its timestamp.
    assert not webhooks.verify(hook["secret"], call_headers, body, now=time.time() + 600)
    event = json.loads(body)
    assert event["type"] == "subscription.confirmed"
    assert event["subscriber"]["email"] == "hook@example.com"
    assert event["newsletter"] == "weekly"

    log = (await client.get(f"/v1/admin/webhooks/{hook['id']}/deliveries", headers=headers)).json()[
        "items"
    ]
    assert [entry["status_code"] for entry in log] == [200, 500]

    # Events of other types are not sent; switching the hook off stops calls.
    off = await client.patch(
        f"/v1/admin/webhooks/{hook['id']}", json={"active": False}, headers=headers
    )
    assert off.json()["active"] is False
    welcome = next(m for m in smtp.sink.received if m.message["List-Unsubscribe"])
    one_click = welcome.message["List-Unsubscribe"].split(",")[0].strip(" <>")
    await client.post(
        one_click.removeprefix("http://testserver"),
        content="List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    await deliver(worker)
    assert len(receiver.calls) == 2
    assert (
        await client.delete(f"/v1/admin/webhooks/{hook['id']}", headers=headers)
    ).status_code == 204
    assert (
        await client.get(f"/v1/admin/webhooks/{hook['id']}", headers=headers)
    ).status_code == 404


async def test_each_webhook_gets_one_call_per_event_it_wants(db: Database) -> None:
    """Written with other rows in one call (on PostgreSQL one statement, which joins the
    events it writes with the webhooks): inactive hooks and unwanted types get no call."""
    async with db.transaction() as session:
        hooks = [
            await webhooks.create_webhook(session, f"https://{name}.example/hook", types)
            for name, types in (
                ("pending", ["subscription.pending"]),
                ("both", ["subscription.pending", "subscription.confirmed"]),
                ("off", ["subscription.pending"]),
            )
        ]
        hooks[2].active = False
        pending, both = hooks[0].id, hooks[1].id
    now = utcnow()
    kinds = ["subscription.pending", "subscription.confirmed", "subscription.bounced"]
    rows = [event_row(kind, None, None, "test", None, now, n=n) for n, kind in enumerate(kinds)]
    mail = outbox_row("welcome", "reader@example.com", 1, {"subscriber": "p"}, now)
    async with db.transaction() as session:
        await events.record(session, rows, along=[(table(OutboxMessage), [mail])])
    async with db.transaction() as session:
        written = await session.scalars(select(Event).where(Event.actor == "test"))
        event_ids = {event.data["n"]: event.id for event in written}
        queued = (await session.scalars(select(OutboxMessage))).all()
    calls = [m for m in queued if m.kind == "webhook"]
    assert sorted((c.payload["webhook_id"], c.payload["event_id"]) for c in calls) == sorted(
        [(pending, event_ids[0]), (both, event_ids[0]), (both, event_ids[1])]
    )
    assert {(c.template, c.recipient, c.status, c.attempts) for c in calls} == {
        ("webhook", None, "queued", 0)
    }
    assert all(c.next_attempt_at <= utcnow() for c in calls)
    assert [(m.template, m.recipient) for m in queued if m.kind == "email"] == [
        ("welcome", "reader@example.com")
    ]
