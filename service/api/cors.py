"""CORS for the public API, per newsletter: an origin is allowed when a newsletter lists it.

The allow-list is cached in-process for a few seconds, so a sign-up from a browser costs no
extra query. Origins nobody listed get no CORS headers at all (the browser then hides the answer
from the page); the request itself is still served, as a plain form post from any site is.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import origins
from service.db import Database

log = logging.getLogger(__name__)

CORS_PATHS = frozenset({"/v1/subscriptions", "/v1/newsletters"})
CORS_PREFIXES = ("/v1/confirmations/",)


class AllowedOrigins:
    """The origins any non-archived newsletter allows, reloaded at most every `ttl` seconds."""

    def __init__(self, db: Database, ttl: float = 5.0) -> None:
        self.db = db
        self.ttl = ttl
        self._origins: frozenset[str] = frozenset()
        self._loaded_at: float | None = None
        self._lock: asyncio.Lock | None = None

    def invalidate(self) -> None:
        self._loaded_at = None

    def _fresh(self) -> bool:
        return self._loaded_at is not None and time.monotonic() - self._loaded_at < self.ttl

    async def contains(self, origin: str) -> bool:
        if not self._fresh():
            await self._reload()
        if origin in self._origins:
            return True  # browsers send origins already in normal form
        normalised = origins.origin_of(origin)
        return normalised is not None and normalised in self._origins

    async def _reload(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._fresh():
                return  # another request reloaded while this one waited
            try:
                async with self.db.transaction() as session:
                    self._origins = await origins.allowed_by_any_newsletter(session)
            except Exception:
                # Keep the last known list: CORS must not fail the sign-up it guards.
                log.exception("loading the CORS allow-list failed")
                return
            self._loaded_at = time.monotonic()


def covered(path: str) -> bool:
    return path in CORS_PATHS or path.startswith(CORS_PREFIXES)


class NewsletterCORS:
    """Pure ASGI middleware: answers preflights and marks answers for allowed origins."""

    def __init__(self, app: ASGIApp, allowed: AllowedOrigins, max_age: int = 600) -> None:
        self.app = app
        self.allowed = allowed
        self.max_age = max_age

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not covered(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = await self.allowed.contains(origin)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            methods = "GET" if scope["path"] == "/v1/newsletters" else "POST"
            await self._preflight(origin, allowed, methods)(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out.add_vary_header("Origin")
                if allowed:
                    out["Access-Control-Allow-Origin"] = origin
                    out["Access-Control-Expose-Headers"] = "Retry-After"
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _preflight(self, origin: str, allowed: bool, methods: str) -> PlainTextResponse:
        if not allowed:
            return PlainTextResponse("Origin not allowed", 403, headers={"Vary": "Origin"})
        return PlainTextResponse(
            "",
            204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": methods,
                "Access-Control-Allow-Headers": "content-type",
                "Access-Control-Max-Age": str(self.max_age),
                "Vary": "Origin",
            },
        )
