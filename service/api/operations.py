"""Liveness, readiness and metrics for whoever runs the service."""

from __future__ import annotations

import logging
import os

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text

from service import migrate
from service.api.deps import DbDep
from service.mail import outbox
from service.observability import REGISTRY

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database reachable and migrations at head",
    responses={
        503: {
            "description": "Not ready",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "database": "ok",
                        "migration": "0001",
                        "head": "0002",
                    }
                }
            },
        }
    },
)
async def readyz(db: DbDep) -> JSONResponse:
    head = migrate.head_revision()
    try:
        async with db.transaction() as session:
            await session.execute(text("SELECT 1"))
            current = await migrate.current_revision(session)
    except Exception as exc:
        log.warning("readiness check failed: %s", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, 503)
    ready = current == head
    return JSONResponse(
        {
            "status": "ok" if ready else "unavailable",
            "database": "ok",
            "migration": current,
            "head": head,
        },
        status_code=200 if ready else 503,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(db: DbDep) -> Response:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        # Several API processes: add up what each wrote to the shared directory.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    # Queue depth is read from the database at scrape time: it is the same for every process.
    queue = CollectorRegistry()
    depth = Gauge(
        "newsletter_outbox_messages", "Outbox rows by status.", ["status"], registry=queue
    )
    oldest = Gauge(
        "newsletter_outbox_oldest_queued_seconds",
        "Age of the oldest queued outbox row.",
        registry=queue,
    )
    try:
        async with db.transaction() as session:
            for status, count in (await outbox.status_counts(session)).items():
                depth.labels(status).set(count)
            oldest.set(await outbox.oldest_queued_age(session))
    except Exception as exc:
        log.warning("outbox metrics unavailable: %s", type(exc).__name__)
    return Response(body + generate_latest(queue), media_type=CONTENT_TYPE_LATEST)
