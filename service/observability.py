"""Metrics (Prometheus), JSON logs with a request id, and the middleware that ties them."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import secrets
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

REGISTRY = CollectorRegistry(auto_describe=True)
SIGNUPS = Counter(
    "newsletter_signups_total", "Sign-up requests by outcome.", ["outcome"], registry=REGISTRY
)
CONFIRMATIONS = Counter(
    "newsletter_confirmations_total",
    "Confirmations that activated subscriptions.",
    registry=REGISTRY,
)
UNSUBSCRIBES = Counter(
    "newsletter_unsubscribes_total", "Subscriptions ended by readers.", registry=REGISTRY
)
DELIVERIES = Counter(
    "newsletter_deliveries_total",
    "Outbox deliveries by kind and result.",
    ["kind", "result"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "newsletter_http_request_duration_seconds",
    "HTTP request latency.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)

# Bound children of LATENCY kept by the middleware (routes, methods and statuses in use).
LATENCY_CHILDREN_CACHED = 1000
ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _RequestIds:
    """Request ids: 16 random hex digits per process, then a counter. Unique as a random id
    per request would be, without reading the random source on every request."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_new_request_id = _RequestIds()


class RequestMetrics:
    """Pure ASGI middleware: a request id for every request (kept from X-Request-ID when
    sane), echoed in the answer, put on every log line, and the latency by route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._latency: dict[tuple[str, str, int], Any] = {}  # the histogram's bound children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        text = given.decode("latin-1")
        rid = text if REQUEST_ID.match(text) else _new_request_id()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            # The route template, never the raw path: tokens must not become label values.
            template = getattr(route, "path", "unmatched")
            labels = (scope["method"], template, status)
            child = self._latency.get(labels)
            if child is None:
                child = LATENCY.labels(scope["method"], template, str(status))
                if len(self._latency) < LATENCY_CHILDREN_CACHED:
                    self._latency[labels] = child
            child.observe(time.perf_counter() - started)
            request_id.reset(token)


class JSONFormatter(logging.Formatter):
    """One JSON object per line; addresses are masked unless debug logging is on."""

    def __init__(self, show_addresses: bool = False) -> None:
        super().__init__()
        self.show_addresses = show_addresses

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if not self.show_addresses:
            message = ADDRESS.sub("<address>", message)
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "request_id": request_id.get(),
        }
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "info", json_logs: bool = True) -> None:
    handler = logging.StreamHandler()
    debug = level.lower() == "debug"
    if json_logs:
        handler.setFormatter(JSONFormatter(show_addresses=debug))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # No access log (docs/operations.md): its lines carry confirmation and manage tokens in
    # paths. uvicorn's access_log=False is not enough: it logs whenever the logger has a
    # handler, and propagating to the root's gives it one.
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
