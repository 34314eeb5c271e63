"""Health, readiness, metrics and logs, as an operator sees them."""

from __future__ import annotations

import json
import logging
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.db import Database
from service.observability import JSONFormatter, request_id
from tests.conftest import make_newsletter


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok" and body["migration"] == body["head"]


async def test_metrics_show_latency_by_route_and_outbox_depth(
    client: httpx.AsyncClient, db: Database
) -> None:
    await make_newsletter(db, "weekly")
    for i in range(3):
        answer = await client.post(
            "/v1/subscriptions", json={"email": f"m{i}@example.com", "newsletters": ["weekly"]}
        )
        assert answer.status_code == 202
    bad = await client.post("/v1/subscriptions", json={"email": "no", "newsletters": ["weekly"]})
    assert bad.status_code == 422
    await client.get("/confirm/not-a-real-token")

    scraped = await client.get("/metrics")
    assert scraped.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
    latency = families["newsletter_http_request_duration_seconds"]
    counts = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in latency.samples
        if s.name.endswith("_count")
    }
    assert counts[("/v1/subscriptions", "202")] >= 3
    # Tokens never become label values: the route template stands for them.
    assert ("/confirm/{token}", "404") in counts
    assert not any("not-a-real-token" in route for route, _ in counts)
    depth = {s.labels["status"]: s.value for s in families["newsletter_outbox_messages"].samples}
    assert depth["queued"] == 3
    oldest = families["newsletter_outbox_oldest_queued_seconds"].samples[0].value
    assert oldest >= 0
    signups = {
        s.labels["outcome"]: s.value
        for s in families["newsletter_signups"].samples
        if s.name == "newsletter_signups_total"
    }
    assert signups["accepted"] >= 3
    assert signups["invalid"] >= 1  # a malformed address is counted, not only a bad newsletter


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    given = await client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await client.get("/healthz", headers={"x-request-id": "bad id\n"})
    other = await client.get("/healthz")
    ids = {made.headers["x-request-id"], other.headers["x-request-id"]}
    assert len(ids) == 2 and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)


def test_json_logs_carry_request_id_and_hide_addresses() -> None:
    record = logging.LogRecord(
        "service", logging.WARNING, __file__, 1, "bounce for %s", ("reader@example.com",), None
    )
    token = request_id.set("req-1")
    try:
        line = json.loads(JSONFormatter().format(record))
        shown = json.loads(JSONFormatter(show_addresses=True).format(record))
    finally:
        request_id.reset(token)
    assert line["message"] == "bounce for <address>"
    assert line["request_id"] == "req-1" and line["level"] == "warning"
    assert shown["message"] == "bounce for reader@example.com"
