"""Dependencies shared by the routers: the database, settings, auth and request metadata."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import keys
from service.config import Settings
from service.db import Database
from service.models import ApiKey
from service.ratelimit import SignupLimiter
from service.signup import Consent
from service.signup_batcher import SignupBatcher

bearer = HTTPBearer(auto_error=False, description="An API key made by `newsletter keys create`.")


# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a thread pool, a
# thread hop per request that cost the sign-up path a fifth of its CPU.
async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_signups(request: Request) -> SignupBatcher:
    batcher: SignupBatcher = request.app.state.signups
    return batcher


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SignupsDep = Annotated[SignupBatcher, Depends(get_signups)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def _read_key(db: DbDep, credentials: Credentials) -> ApiKey:
    async with db.transaction() as session:
        return await keys.authenticate(
            session, credentials.credentials if credentials else None, need_write=False
        )


async def _write_key(db: DbDep, credentials: Credentials) -> ApiKey:
    async with db.transaction() as session:
        return await keys.authenticate(
            session, credentials.credentials if credentials else None, need_write=True
        )


ReadKey = Annotated[ApiKey, Depends(_read_key)]
AdminKey = Annotated[ApiKey, Depends(_write_key)]


def client_ip(request: Request) -> str | None:
    """The client's address: X-Forwarded-For is believed only from trusted proxies."""
    limiter: SignupLimiter = request.app.state.limiter
    return limiter.client_ip(
        request.client.host if request.client else None,
        # Read only when someone may have written it whom we believe.
        request.headers.getlist("x-forwarded-for") if limiter.trusted else (),
    )


def consent_from(
    request: Request, source: str, page: str | None = None, ip: str | None = None
) -> Consent:
    return Consent(
        source=source,
        ip=ip or client_ip(request),
        user_agent=request.headers.get("user-agent"),
        page=page or request.headers.get("referer"),
    )


def wake_worker(request: Request) -> None:
    """Tell an in-process delivery worker that mail is waiting (no-op without one)."""
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.wakeup.set()
