"""A deadline for the request body, so a client that dribbles it (slow loris) is answered 408
and its connection closed instead of holding a connection and a task for ever.

uvicorn limits the time between requests on a kept-alive connection, not the time a body takes
to arrive. This pure ASGI middleware gives every body `timeout` seconds, extended by one second
for each `min_rate` bytes received (the rule of Apache's mod_reqtimeout), so a large upload at
a sane speed is never cut off while a byte every few seconds is.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem

MIN_RATE = 500.0  # bytes a second that earn more time (mod_reqtimeout's default MinRate)
TIMED_OUT = "The request body did not arrive in time."


class RequestBodyTimeout(HTTPException):
    """Raised from `receive` when the deadline passes; the error handler answers 408."""

    def __init__(self) -> None:
        super().__init__(408, TIMED_OUT, headers={"Connection": "close"})


class BodyDeadline:
    def __init__(self, app: ASGIApp, timeout: float, min_rate: float = MIN_RATE) -> None:
        self.app = app
        self.timeout = timeout
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.timeout <= 0:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        complete = False
        started = False

        async def timed_receive() -> Message:
            nonlocal deadline, complete
            if complete:  # after the body only a disconnect can come: no deadline for that
                return await receive()
            try:
                # A timer, not a task per chunk: this runs on every request with a body.
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestBodyTimeout() from None
            if message["type"] == "http.request":
                deadline += len(message.get("body", b"")) / self.min_rate
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except RequestBodyTimeout as exc:
            # Normally the app's error handler has answered already; this covers code that
            # read the body outside of it.
            if started:
                raise
            response = problem(
                408, "Request Timeout", detail=TIMED_OUT, headers=dict(exc.headers or {})
            )
            await response(scope, receive, send)
