"""create_app(settings): routers, middleware, error handlers, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import text

from service import migrate
from service.api import admin, admin_ops, admin_subscribers, devmail, pages, public
from service.config import Settings, load_settings
from service.db import Database
from service.errors import install_error_handlers
from service.mail.render import Links
from service.mail.worker import DeliveryWorker
from service.signup_batcher import SignupBatcher

log = logging.getLogger(__name__)

DESCRIPTION = """
Double opt-in newsletter sign-ups: a public API and pages for readers, an admin API for ops.
Errors are `application/problem+json` (RFC 9457).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = (settings or load_settings()).with_secret_keys()
    db = Database(settings)
    worker = DeliveryWorker(db, settings) if settings.run_worker else None
    signups = SignupBatcher(db, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run_forever(stop)) if worker else None
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                # Let the batch in hand finish and be recorded; its lease covers a hard kill.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=settings.mail_timeout + 5)
            await signups.stop()
            await db.dispose()

    app = FastAPI(
        title="Newsletter subscription service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.worker = worker
    app.state.signups = signups
    templates = Jinja2Templates(directory=settings.templates_dir / "pages")
    templates.env.globals["links"] = Links(settings)
    app.state.templates = templates
    install_error_handlers(app)

    app.include_router(public.router)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(admin_subscribers.router)
    app.include_router(admin_ops.router)
    app.include_router(devmail.router)

    @app.get("/healthz", tags=["operations"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Database reachable, migrations at head")
    async def readyz() -> JSONResponse:
        head = migrate.head_revision()
        try:
            async with db.transaction() as session:
                await session.execute(text("SELECT 1"))
                current = await migrate.current_revision(session)
        except Exception as exc:
            log.warning("readiness check failed: %s", exc)
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

    return app
