"""Group commit for sign-ups: concurrent requests share one transaction.

Each request is answered only after the transaction holding its rows has committed. Under
load a batch waits a few milliseconds for its share of the sign-ups in flight (all of them
with one consumer, half with two): without that wait, batches alternate between one sign-up
and all the others, and the one-sign-up batches cost as much as full ones (measured: 16
connections gave batches of 1 and 15 in turn). If a batch fails as a whole (a race on a
unique key with another process, a dropped connection), every request in it is retried alone
(through SQLAlchemy's session), so one bad apple never fails its neighbours.

On PostgreSQL the batch's new addresses go first, in one statement outside a transaction
(signup.subscribe_new: one round trip where BEGIN, the newsletters' look-up, the insert and
COMMIT made four); what that statement leaves (known addresses and the like) follows in a
transaction, and only that part is retried if it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from service.config import Settings
from service.db import Database, HeldConnection
from service.errors import InvalidInput
from service.signup import (
    Consent,
    NewsletterCache,
    SignupResult,
    subscribe,
    subscribe_many,
    subscribe_new,
    subscribe_on,
)
from service.signup_input import SignupInput

log = logging.getLogger(__name__)

RETRYABLE = (IntegrityError, OperationalError, DBAPIError)


@dataclass
class _Pending:
    data: SignupInput
    consent: Consent
    future: asyncio.Future[SignupResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SignupBatcher:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.newsletters = NewsletterCache()
        self.collecting = asyncio.Lock()  # one consumer gathers a batch at a time
        self.in_flight = 0  # sign-ups submitted and not yet answered
        self.peak = 1  # the load level: the most in flight since the last batch was begun
        self.target = 1  # how many sign-ups the batch being gathered waits for
        self.filled = asyncio.Event()  # the target is in: the queue and the held one
        self.held = 0  # the sign-up taken by the gathering consumer, no longer in the queue
        self.connections: list[HeldConnection] = []  # each consumer's (PostgreSQL)

    async def submit(self, data: SignupInput, consent: Consent) -> SignupResult:
        """Queue one sign-up and wait until its transaction has committed."""
        if not self.settings.signup_batching:
            async with self.db.transaction() as session:
                return await subscribe(session, self.settings, data, consent)
        if not self.tasks:
            self.tasks = [
                asyncio.create_task(self._consume())
                for _ in range(
                    self.settings.signup_batch_consumers or (1 if self.db.is_sqlite else 2)
                )
            ]
        item = _Pending(data, consent)
        self.queue.put_nowait(item)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.queue.qsize() + self.held >= self.target:
            self.filled.set()
        try:
            return await item.future
        finally:
            self.in_flight -= 1

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks, self.connections = [], []

    async def _consume(self) -> None:
        # On PostgreSQL each consumer keeps its connection from one batch to the next while
        # sign-ups keep coming; all go back to the pool when none is left in flight.
        connection = None if self.db.is_sqlite else HeldConnection()
        if connection is not None:
            self.connections.append(connection)
        try:
            while True:
                async with self.collecting:
                    batch = await self._gather()
                await self._process(batch, connection)
                if connection is not None and self.in_flight <= len(batch):
                    # Only the sign-ups just answered were in flight: the load is over.
                    await self._release_connections()
        finally:
            await self._release_connections()

    async def _release_connections(self) -> None:
        for connection in self.connections:
            await self.db.release(connection)  # one in use is not held meanwhile: left alone

    async def _gather(self) -> list[_Pending]:
        """The next batch: under load, a fair share of what is in flight (all of it with one
        consumer, half with two), waited for up to signup_batch_wait_ms."""
        consumers = len(self.tasks)
        first = await self.queue.get()
        self.target = -(-self.peak // consumers)
        self.peak = self.in_flight
        wait = self.settings.signup_batch_wait_ms / 1000
        if wait and self.queue.qsize() + 1 < self.target:
            self.filled.clear()
            self.held = 1
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.filled.wait()
            finally:
                self.held = 0
        # More than the share when more came: the load grew.
        share = max(self.target, -(-(self.queue.qsize() + 1) // consumers))
        batch = [first]
        while len(batch) < min(share, self.settings.signup_batch_size) and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    async def _process(self, batch: list[_Pending], connection: HeldConnection | None) -> None:
        if not self.db.is_sqlite:
            batch = await self._process_new(batch, connection)
        if batch:
            await self._process_together(batch, connection)

    async def _process_new(
        self, batch: list[_Pending], connection: HeldConnection | None
    ) -> list[_Pending]:
        """PostgreSQL: the new addresses' sign-ups in one statement, outside a transaction
        (signup.subscribe_new); returns the rest, to apply in a transaction."""
        requests = [(p.data, p.consent) for p in batch]
        try:
            outcomes = await self.db.run_on_driver(
                lambda runner: subscribe_new(runner, self.settings, requests, self.newsletters),
                transaction=False,
                held=connection,
            )
        except RETRYABLE:
            return batch  # its one write failed whole: nothing of the batch was written
        except Exception as exc:
            for item in batch:
                _settle(item, exc)
            return []
        rest = []
        for item, outcome in zip(batch, outcomes, strict=True):
            if outcome is None:
                rest.append(item)
            else:
                _settle(item, outcome)
        return rest

    async def _process_together(
        self, batch: list[_Pending], connection: HeldConnection | None
    ) -> None:
        try:
            # On the driver itself: see service.driver for what SQLAlchemy's layer cost here.
            requests = [(p.data, p.consent) for p in batch]
            outcomes = await self.db.run_on_driver(
                lambda runner: subscribe_on(runner, self.settings, requests), held=connection
            )
        except RETRYABLE:
            log.warning("sign-up batch of %d failed; retrying one by one", len(batch))
            for item in batch:
                await self._process_alone(item)
            return
        except Exception as exc:
            for item in batch:
                _settle(item, exc)
            return
        for item, outcome in zip(batch, outcomes, strict=True):
            _settle(item, outcome)

    async def _process_alone(self, item: _Pending) -> None:
        outcome: SignupResult | InvalidInput | Exception
        for attempt in range(2):  # a second try survives one dropped connection
            try:
                async with self.db.transaction() as session:
                    [outcome] = await subscribe_many(
                        session, self.settings, [(item.data, item.consent)]
                    )
                break
            except RETRYABLE as exc:
                outcome = exc
                if attempt == 0:
                    continue
            except Exception as exc:
                outcome = exc
                break
        _settle(item, outcome)


def _settle(item: _Pending, outcome: SignupResult | Exception) -> None:
    if item.future.done():  # the client went away and the request was cancelled
        return
    if isinstance(outcome, Exception):
        item.future.set_exception(outcome)
    else:
        item.future.set_result(outcome)
