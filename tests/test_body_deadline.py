"""BodyDeadline at the ASGI level: what it cuts off, and what it must leave alone.

The slow-loris test in test_hostile_input.py drives it through a real server; these drive the
middleware with an ASGI receive of their own, to time each case exactly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from service.api.timeouts import BodyDeadline, RequestBodyTimeout

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/", "headers": []}


def reading_app(after_body: Callable[[], Awaitable[None]] | None = None) -> Any:
    """Reads the whole body, then (optionally) does more work, then answers its size."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if after_body is not None:
            await after_body()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})

    return app


def chunks(parts: list[bytes], pause: float) -> Receive:
    queue = list(parts)

    async def receive() -> Message:
        await asyncio.sleep(pause)
        body = queue.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    return receive


async def run(app: Any, receive: Receive, timeout: float, min_rate: float = 500.0) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await BodyDeadline(app, timeout=timeout, min_rate=min_rate)(dict(SCOPE), receive, send)
    return sent


async def test_a_stalled_body_is_answered_408_as_problem_json() -> None:
    sent = await run(reading_app(), chunks([b"a", b"b"], pause=0.3), timeout=0.1)
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["status"] == 408


async def test_a_large_body_at_a_sane_rate_earns_more_time() -> None:
    # 5 chunks of 100 bytes, 0.06 s apart: 0.3 s in all against a 0.1 s deadline, but each
    # chunk earns 100 / 500 = 0.2 s more.
    sent = await run(reading_app(), chunks([b"x" * 100] * 5, pause=0.06), timeout=0.1)
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"500"


async def test_the_same_pace_with_tiny_chunks_is_cut_off() -> None:
    sent = await run(reading_app(), chunks([b"x"] * 5, pause=0.06), timeout=0.1)
    assert sent[0]["status"] == 408


async def test_work_after_the_whole_body_is_never_cut_off() -> None:
    async def slow_work() -> None:
        await asyncio.sleep(0.3)

    sent = await run(reading_app(slow_work), chunks([b"{}"], pause=0), timeout=0.1)
    assert sent[0]["status"] == 200


async def test_a_deadline_passed_before_reading_is_refused_at_the_first_read() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.2)  # e.g. waiting on a limiter before reading
        with pytest.raises(RequestBodyTimeout):
            await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = await run(app, chunks([b"{}"], pause=0), timeout=0.1)
    assert sent[0]["status"] == 204


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def never(*_: Any) -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    task = asyncio.create_task(run(reading_app(), never, timeout=5))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_no_timer_outlives_the_request() -> None:
    loop = asyncio.get_running_loop()
    if not hasattr(loop, "_scheduled"):
        pytest.skip("needs asyncio's own event loop, which lists its timers")

    def live() -> int:
        return sum(1 for handle in loop._scheduled if not handle.cancelled())

    before = live()
    await run(reading_app(), chunks([b"{}"], pause=0), timeout=30)
    assert live() == before
