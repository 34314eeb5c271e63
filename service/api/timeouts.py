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
        body = _Body(asyncio.get_running_loop(), self.timeout, self.min_rate)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, body.receiving(receive), tracking_send)
        except RequestBodyTimeout as exc:
            # Normally the app's error handler has answered already; this covers code that
            # read the body outside of it.
            if started:
                raise
            response = problem(
                408, "Request Timeout", detail=TIMED_OUT, headers=dict(exc.headers or {})
            )
            await response(scope, receive, send)
        finally:
            body.done()


class _Body:
    """One request body's deadline: one timer a request, where `asyncio.timeout` around each
    `receive` cost a timer and its bookkeeping per call (measured: 6% of a sign-up request's
    CPU). The timer cancels the request's task only while it waits in `receive`; a request
    that reads nothing, or has read its whole body, is never touched."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, min_rate: float) -> None:
        self.loop = loop
        self.min_rate = min_rate
        self.deadline = loop.time() + timeout
        self.complete = False
        self.expired = False
        self.waiting: asyncio.Task[object] | None = None  # the task inside `receive`
        self.timer: asyncio.TimerHandle | None = loop.call_at(self.deadline, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.complete:
            return
        if self.loop.time() < self.deadline:  # the chunks since have earned more time
            self.timer = self.loop.call_at(self.deadline, self._expire)
            return
        self.expired = True
        if self.waiting is not None:
            self.waiting.cancel()

    def done(self) -> None:
        self.complete = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def receiving(self, receive: Receive) -> Receive:
        async def timed_receive() -> Message:
            if self.complete:  # after the body only a disconnect can come: no deadline for that
                return await receive()
            if self.expired:
                raise RequestBodyTimeout()
            task = asyncio.current_task()
            assert task is not None
            cancelling = task.cancelling()
            self.waiting = task
            try:
                message = await receive()
            except asyncio.CancelledError:
                # Ours only if nothing else cancelled the task too (as asyncio.timeout decides).
                if self.expired and task.uncancel() <= cancelling:
                    raise RequestBodyTimeout() from None
                raise
            finally:
                self.waiting = None
            if message["type"] == "http.request":
                self.deadline += len(message.get("body", b"")) / self.min_rate
                if not message.get("more_body", False):
                    self.done()
            else:
                self.done()
            return message

        return timed_receive
