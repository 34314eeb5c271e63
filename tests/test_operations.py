"""Health, readiness, metrics and logs, as an operator sees them."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
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


@pytest.fixture(scope="session")
def otel_spans() -> InMemorySpanExporter:
    """An OpenTelemetry SDK set up as a deployment would, its spans kept in memory (the
    global provider can be set once per process: it stays for the session)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_opentelemetry_setting_turns_fastapi_spans_on(
    settings: Settings, db: Database, otel_spans: InMemorySpanExporter
) -> None:
    seen = {}
    for enabled in (False, True):
        otel_spans.clear()
        app = create_app(settings.model_copy(update={"opentelemetry": enabled}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            assert (await http.get("/healthz")).status_code == 200
        await app.state.db.dispose()
        seen[enabled] = [span.name for span in otel_spans.get_finished_spans()]
    assert seen[False] == []
    assert "GET /healthz" in seen[True]


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
