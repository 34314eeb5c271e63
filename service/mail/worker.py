"""The delivery loop: claim a leased batch, send mail over one connection and call webhooks,
record each outcome as it happens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from service import csv_import, purge, tokens, webhooks
from service.addresses import ascii_form
from service.config import Settings
from service.db import Database
from service.errors import first_line, schema_missing
from service.mail import outbox
from service.mail.outbox import ClaimedMessage
from service.mail.render import MailRenderer, OutgoingMail
from service.mail.transports import DeliveryError, Transport, transport_for
from service.models import Newsletter, WebhookDelivery, table, utcnow
from service.observability import DELIVERIES

log = logging.getLogger(__name__)

# After this many transient failures in a row the server is taken to be down: the rest of
# the batch waits for the next try instead of each message timing out on its own.
OUTAGE_AFTER = 3
PURGE_EVERY = 3600.0
DEFERRED = "deferred: the mail server failed the messages before these"
GROUP_WAIT = 0.002  # seconds a group commit waits for the other lanes
MAIL_SENT = DELIVERIES.labels("email", "sent")  # looked up once, not once a message
NOT_MIGRATED_MAX_WAIT = 60.0  # seconds between looks at a database that has no schema yet


@dataclass
class _Outcome:
    failed: list[tuple[int, str, bool, int]] = field(default_factory=list)
    untried: list[int] = field(default_factory=list)
    deferred: list[ClaimedMessage] = field(default_factory=list)
    # Transient failures in a row across all lanes: the server is down, not one message bad.
    transient_in_a_row: int = 0


class SendPacer:
    """Spaces sends to at most `rate` a second (a provider's quota), across all lanes."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock = clock
        self.next_slot = 0.0

    def reserve(self) -> float:
        """Take the next free slot; return how long to wait for it."""
        if not self.interval:
            return 0.0
        now = self.clock()
        slot = max(now, self.next_slot)
        self.next_slot = slot + self.interval
        return slot - now

    async def wait(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


class _SentMarker:
    """Group commit for delivery records: lanes that finish a send while a commit is running
    share the next one, so marking costs one transaction per group, not per message.

    On PostgreSQL it commits on one connection held for the batch: taking one from the pool
    for each group would cost a ping (pool_pre_ping) on top of the group's statement. SQLite
    has one connection per process by default, which the API shares: it is taken per group
    (without a ping), not held while the lanes wait on the mail server."""

    def __init__(
        self, db: Database, owner: str, lanes: int, conn: AsyncConnection | None = None
    ) -> None:
        self.db = db
        self.conn = conn
        self.owner = owner
        self.lanes = lanes  # still sending
        self.pending: list[tuple[int, str, int, asyncio.Future[None]]] = []
        self.flushing: asyncio.Task[None] | None = None
        self.all_in = asyncio.Event()

    async def mark(self, message_id: int, header_id: str, attempt: int) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((message_id, header_id, attempt, done))
        if len(self.pending) >= self.lanes:
            self.all_in.set()
        if self.flushing is None or self.flushing.done():
            self.flushing = asyncio.create_task(self._flush())
        await done

    def lane_done(self) -> None:
        self.lanes -= 1
        if self.pending and len(self.pending) >= self.lanes:
            self.all_in.set()

    async def _flush(self) -> None:
        while self.pending:
            if len(self.pending) < self.lanes:
                # The other lanes' replies are usually a moment away: a group of every lane
                # halves the commits. A lane whose send failed does not come; wait briefly.
                self.all_in.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.all_in.wait(), GROUP_WAIT)
            group, self.pending = self.pending, []
            sent = [(i, h, n) for i, h, n, _ in group]
            try:
                if self.conn is not None:
                    # One statement, autocommitted: durable when it returns.
                    await outbox.record_sent(self.conn, self.owner, sent)
                else:
                    async with self.db.engine.begin() as conn:
                        await outbox.record_sent(conn, self.owner, sent)
            except Exception as exc:
                for *_, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for *_, done in group:
                if not done.done():
                    done.set_result(None)


class DeliveryWorker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.renderer = MailRenderer(settings)
        self.transport_factory = transport_factory or (
            lambda: transport_for(settings.resolved_mail_url, settings.mail_timeout)
        )
        # lease_owner is 64 characters; a host name alone may be that long.
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wakeup = asyncio.Event()
        self.next_purge = 0.0
        self.pacer = SendPacer(settings.mail_rate_limit)
        # SMTP connections kept from one batch to the next while the queue stays busy.
        self.idle_transports: list[Transport] = []

    async def run_once(self) -> int:
        """Deliver one batch; return how many messages were claimed."""
        lease = self.settings.worker_lease
        # Past the lease another worker may take the rows over: stop starting sends while one
        # could still be running when the lease ends, and hand the rest back untried.
        margin = min(timedelta(seconds=self.settings.mail_timeout), lease / 2)
        send_until = time.monotonic() + (lease - margin).total_seconds()
        async with self.db.transaction() as session:
            batch = await outbox.claim(session, self.owner, self.settings.worker_batch_size, lease)
        if len(batch) < self.settings.worker_batch_size:
            # The queue is drained: the next batch may be a while, so no connection is left
            # open for a server to time out (after this batch's sends).
            try:
                return await self._deliver(batch, send_until)
            finally:
                await self.close_transports()
        return await self._deliver(batch, send_until)

    async def _deliver(self, batch: list[ClaimedMessage], send_until: float) -> int:
        if not batch:
            return 0
        outcome = _Outcome()
        emails = [m for m in batch if m.kind == "email"]
        calls = [m for m in batch if m.kind == "webhook"]
        if emails:
            await self._send_mail(emails, send_until, outcome)
        if calls:
            await self._call_webhooks(calls, send_until, outcome)
        await self._record_failures(outcome)
        return len(batch)

    async def _send_mail(
        self, batch: list[ClaimedMessage], send_until: float, outcome: _Outcome
    ) -> None:
        async with self.db.transaction() as session:
            ids = {nid for m in batch if m.payload for nid in m.payload.get("newsletters", [])}
            rows = await session.scalars(select(Newsletter).where(Newsletter.id.in_(ids)))
            newsletters = {n.id: n for n in rows}
        # Several SMTP connections at once: each exchange waits on the server most of the
        # time, so a few lanes multiply what one worker delivers.
        lanes = max(1, min(self.settings.worker_smtp_connections, len(batch)))
        async with contextlib.AsyncExitStack() as stack:
            held = None
            if not self.db.is_sqlite:
                held = await stack.enter_async_context(self.db.engine.connect())
                held = await held.execution_options(isolation_level="AUTOCOMMIT")
            marker = _SentMarker(self.db, self.owner, lanes, held)
            await asyncio.gather(
                *(
                    self._send_lane(batch[lane::lanes], newsletters, send_until, outcome, marker)
                    for lane in range(lanes)
                )
            )

    async def _send_lane(
        self,
        messages: list[ClaimedMessage],
        newsletters: dict[int, Newsletter],
        send_until: float,
        outcome: _Outcome,
        marker: _SentMarker,
    ) -> None:
        try:
            transport = await self._transport()
            try:
                await self._send_with(transport, messages, newsletters, send_until, outcome, marker)
            except BaseException:
                await transport.__aexit__(None, None, None)
                raise
            self.idle_transports.append(transport)
        finally:
            marker.lane_done()

    async def _transport(self) -> Transport:
        if self.idle_transports:
            return self.idle_transports.pop()
        transport = self.transport_factory()
        return await transport.__aenter__()

    async def close_transports(self) -> None:
        """Close the SMTP connections kept between batches."""
        idle, self.idle_transports = self.idle_transports, []
        for transport in idle:
            try:
                await transport.__aexit__(None, None, None)
            except Exception:
                log.exception("closing an SMTP connection failed")

    def _prepare(
        self, message: ClaimedMessage, newsletters: dict[int, Newsletter]
    ) -> tuple[OutgoingMail, str | None]:
        """The message rendered, and its return path."""
        payload = message.payload or {}
        targets = [newsletters[i] for i in payload.get("newsletters", []) if i in newsletters]
        if not targets or not message.recipient:
            raise DeliveryError("nothing to render: newsletter gone", permanent=True)
        # An internationalised domain in its ASCII form, which every server takes; a non-ASCII
        # part before the @ stays as it is, for a server that offers SMTPUTF8.
        recipient = ascii_form(message.recipient) or message.recipient
        header_id = self.renderer.message_id(message.id, message.created_at.timestamp())
        email = self.renderer.render(message.template, recipient, targets, payload, header_id)
        # With VERP the return path names the message, so a bounce finds its row.
        envelope_from = (
            tokens.verp_address(self.settings.secret_keys, self.settings.mail_from, message.id)
            if self.settings.verp
            else None
        )
        return email, envelope_from

    async def _send_with(
        self,
        transport: Transport,
        messages: list[ClaimedMessage],
        newsletters: dict[int, Newsletter],
        send_until: float,
        outcome: _Outcome,
        marker: _SentMarker,
    ) -> None:
        # The next message, rendered ahead so the transport can announce it with this one.
        ahead: tuple[OutgoingMail, str | None] | None = None
        for index, message in enumerate(messages):
            prepared, ahead = ahead, None
            if time.monotonic() >= send_until:
                outcome.untried.extend(m.id for m in messages[index:])
                log.warning("lease running out: %d messages handed back", len(messages) - index)
                break
            if outcome.transient_in_a_row >= OUTAGE_AFTER:
                outcome.deferred.extend(messages[index:])
                break
            header_id = self.renderer.message_id(message.id, message.created_at.timestamp())
            try:
                email, envelope_from = prepared or self._prepare(message, newsletters)
                if index + 1 < len(messages):
                    try:
                        ahead = self._prepare(messages[index + 1], newsletters)
                    except Exception:
                        ahead = None  # fails again, and is recorded, in its own turn
                await self.pacer.wait()
                await transport.send(email, envelope_from, then=ahead)
            except DeliveryError as exc:
                outcome.transient_in_a_row = 0 if exc.permanent else outcome.transient_in_a_row + 1
                outcome.failed.append((message.id, str(exc), exc.permanent, message.attempts))
                continue
            except Exception as exc:  # a template bug must not stall the queue
                log.exception("rendering outbox message %s failed", message.id)
                outcome.failed.append((message.id, repr(exc), True, message.attempts))
                continue
            outcome.transient_in_a_row = 0
            # Recorded before this lane sends again: a crash later in the batch must not
            # send this one a second time.
            await marker.mark(message.id, header_id, message.attempts)
            MAIL_SENT.inc()

    async def _call_webhooks(
        self, batch: list[ClaimedMessage], send_until: float, outcome: _Outcome
    ) -> None:
        wanted = [
            webhooks.WebhookCall(m.id, int(m.payload["webhook_id"]), int(m.payload["event_id"]))
            for m in batch
            if m.payload
        ]
        async with self.db.transaction() as session:
            bodies = await webhooks.load_calls(session, wanted)
        timeout = httpx.Timeout(self.settings.webhook_timeout)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            for index, message in enumerate(batch):
                if time.monotonic() >= send_until:
                    outcome.untried = [*outcome.untried, *(m.id for m in batch[index:])]
                    break
                found = bodies.get(message.id)
                if found is None:
                    outcome.failed.append((message.id, "webhook or event gone", True, 0))
                    continue
                hook, body = found
                result = await webhooks.call(client, hook, message.id, body)
                event_id = int((message.payload or {}).get("event_id", 0))
                async with self.db.transaction() as session:
                    await session.execute(
                        insert(table(WebhookDelivery)),
                        [webhooks.log_row(hook.id, event_id, message.id, result, utcnow())],
                    )
                    if result.ok:
                        await outbox.mark_sent(
                            session, self.owner, [(message.id, f"msg_{message.id}")]
                        )
                if result.ok:
                    DELIVERIES.labels("webhook", "sent").inc()
                else:
                    error = (
                        f"HTTP {result.status_code}: {result.error}"
                        if result.status_code
                        else (result.error or "failed")
                    )
                    outcome.failed.append((message.id, error, False, message.attempts))

    async def _record_failures(self, outcome: _Outcome) -> None:
        async with self.db.transaction() as session:
            await outbox.release(session, self.owner, outcome.untried)
            if outcome.deferred:
                first = min(outcome.deferred, key=lambda m: m.attempts)
                await outbox.release(
                    session,
                    self.owner,
                    [m.id for m in outcome.deferred],
                    delay=self._retry_in(first.attempts),
                    error=DEFERRED,
                )
                log.warning("mail server unreachable: %d messages deferred", len(outcome.deferred))
            for message_id, error, permanent, attempts in outcome.failed:
                give_up = permanent or attempts >= self.settings.worker_max_attempts
                retry_in = None if give_up else self._retry_in(attempts)
                log.warning("delivery of outbox message %s failed: %s", message_id, error)
                DELIVERIES.labels("any", "dead" if give_up else "retry").inc()
                await outbox.mark_failed(session, self.owner, message_id, error, retry_in)
            await outbox.log_attempts(
                session,
                self.owner,
                [
                    (i, n, "dead" if p or n >= self.settings.worker_max_attempts else "retry", e)
                    for i, e, p, n in outcome.failed
                ]
                + [(m.id, m.attempts, "deferred", DEFERRED) for m in outcome.deferred],
            )

    def _retry_in(self, attempts: int) -> timedelta:
        return outbox.backoff(
            attempts, self.settings.worker_backoff_base, self.settings.worker_backoff_max
        )

    async def housekeeping_if_due(self) -> None:
        """At most once an hour per worker: report imports whose process died as failed, and
        purge stale pending sign-ups (on PostgreSQL by one process at a time)."""
        if time.monotonic() < self.next_purge:
            return
        self.next_purge = time.monotonic() + PURGE_EVERY
        age = self.settings.purge_pending_after
        async with self.db.transaction() as session:
            await csv_import.fail_interrupted(session)
            result = await purge.purge_pending(session, age) if age else None
        if result and (result.subscriptions or result.subscribers):
            log.info(
                "purged %d pending subscriptions and %d subscribers",
                result.subscriptions,
                result.subscribers,
            )

    async def _wait_for_schema(self, stop: asyncio.Event, polls: int, exc: Exception) -> None:
        """A database not migrated yet: say so once, then look again less and less often.

        The worker keeps running rather than exiting, so a worker started before (or beside)
        `newsletter migrate` starts delivering by itself once the schema is there, and the
        server's in-process worker never needs a restart.
        """
        if polls == 1:
            log.error(
                "database not migrated: run `newsletter migrate`; delivery waits until it is (%s)",
                first_line(exc),
            )
        delay = min(NOT_MIGRATED_MAX_WAIT, self.settings.worker_poll_interval * 2 ** min(polls, 16))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; sleep on the wake-up event or the poll interval."""
        try:
            await self._run(stop)
        finally:
            await self.close_transports()

    async def _run(self, stop: asyncio.Event) -> None:
        unmigrated = 0  # polls in a row that found no schema
        while not stop.is_set():
            try:
                await self.housekeeping_if_due()
                claimed = await self.run_once()
            except Exception as exc:
                if not schema_missing(exc):
                    log.exception("delivery batch failed; retrying after the poll interval")
                    claimed = 0
                else:
                    unmigrated += 1
                    await self._wait_for_schema(stop, unmigrated, exc)
                    continue
            if unmigrated:
                log.info("database migrated: delivering")
                unmigrated = 0
            if claimed:
                continue
            self.wakeup.clear()
            waiters = [
                asyncio.ensure_future(self.wakeup.wait()),
                asyncio.ensure_future(stop.wait()),
            ]
            await asyncio.wait(
                waiters,
                timeout=self.settings.worker_poll_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in waiters:
                waiter.cancel()
