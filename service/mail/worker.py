"""The delivery loop: claim a leased batch, render, send over one connection, record."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable

from sqlalchemy import select

from service.config import Settings
from service.db import Database
from service.mail import outbox
from service.mail.render import MailRenderer
from service.mail.transports import DeliveryError, Transport, transport_for
from service.models import Newsletter

log = logging.getLogger(__name__)


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
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wakeup = asyncio.Event()

    async def run_once(self) -> int:
        """Deliver one batch; return how many messages were claimed."""
        async with self.db.transaction() as session:
            batch = await outbox.claim(
                session, self.owner, self.settings.worker_batch_size, self.settings.worker_lease
            )
            if not batch:
                return 0
            ids = {nid for m in batch if m.payload for nid in m.payload.get("newsletters", [])}
            rows = await session.scalars(select(Newsletter).where(Newsletter.id.in_(ids)))
            newsletters = {n.id: n for n in rows}

        sent: list[tuple[int, str]] = []
        failed: list[tuple[int, str, bool, int]] = []
        async with self.transport_factory() as transport:
            for message in batch:
                header_id = self.renderer.message_id(message.id, message.created_at.timestamp())
                try:
                    payload = message.payload or {}
                    targets = [
                        newsletters[i] for i in payload.get("newsletters", []) if i in newsletters
                    ]
                    if not targets or not message.recipient:
                        raise DeliveryError("nothing to render: newsletter gone", permanent=True)
                    email = self.renderer.render(
                        message.template, message.recipient, targets, payload, header_id
                    )
                    await transport.send(email)
                except DeliveryError as exc:
                    failed.append((message.id, str(exc), exc.permanent, message.attempts))
                    continue
                except Exception as exc:  # a template bug must not stall the queue
                    log.exception("rendering outbox message %s failed", message.id)
                    failed.append((message.id, repr(exc), True, message.attempts))
                    continue
                sent.append((message.id, header_id))

        async with self.db.transaction() as session:
            await outbox.mark_sent(session, self.owner, sent)
            for message_id, error, permanent, attempts in failed:
                give_up = permanent or attempts >= self.settings.worker_max_attempts
                retry_in = (
                    None
                    if give_up
                    else outbox.backoff(
                        attempts,
                        self.settings.worker_backoff_base,
                        self.settings.worker_backoff_max,
                    )
                )
                log.warning("delivery of outbox message %s failed: %s", message_id, error)
                await outbox.mark_failed(session, self.owner, message_id, error, retry_in)
        return len(batch)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; sleep on the wake-up event or the poll interval."""
        while not stop.is_set():
            try:
                claimed = await self.run_once()
            except Exception:
                log.exception("delivery batch failed; retrying after the poll interval")
                claimed = 0
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
