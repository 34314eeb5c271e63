"""Inbound mail: an SMTP (or LMTP) listener for the service's own addresses.

Two kinds of recipient are taken, both signed, and everything else is refused at RCPT time:

- `<local>+u-<subscriber id>-<signature>@<domain>`, the `mailto:` of List-Unsubscribe (and
  `<local>+unsubscribe-<manage token>@<domain>`, its longer form in earlier mail): any mail
  to it unsubscribes its reader from every newsletter;
- `<local>+bounce-<outbox id>-<signature>@<domain>`, the VERP envelope sender of one message:
  a delivery status notification (RFC 3464) or abuse report (RFC 5965) sent back to it is
  a bounce or a complaint about that message's recipient.

Point the MX of MAIL_FROM's domain here (`newsletter inbound`), or have the MTA that holds it
hand these addresses over by LMTP (`--lmtp`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from service import bounces, subscriptions, tokens
from service.config import Settings
from service.db import Database
from service.errors import TokenNotFound
from service.signup import Consent

log = logging.getLogger(__name__)

# A DSN carries at most the returned message's headers or a copy of it; nothing bigger is useful.
MAX_MESSAGE_BYTES = 10 * 1024 * 1024
MAX_RECIPIENTS = 50
REFUSED = "550 5.1.1 No such recipient here"
ACCEPTED = "250 2.0.0 OK"
TRY_LATER = "451 4.3.0 Temporary failure, try again later"


@dataclass(frozen=True)
class Recipient:
    """A recipient this listener takes: an unsubscribe token or the outbox id of a VERP."""

    kind: str  # unsubscribe or bounce
    token: str = ""
    outbox_id: int = 0


def recipient_for(settings: Settings, address: str) -> Recipient | None:
    """What a recipient address asks for, if its signature holds under any secret key."""
    tag = tokens.address_tag(address)
    if tag is None:
        return None
    kind, rest = tag
    if kind == "u":
        public_id = tokens.verify_unsubscribe_tag(settings.secret_keys, rest)
        if public_id is None:
            return None
        return Recipient("unsubscribe", token=tokens.manage_token(settings.secret_keys, public_id))
    if kind == "unsubscribe":  # the longer form, in mail sent before the short one
        if tokens.verify_manage_token(settings.secret_keys, rest) is None:
            return None
        return Recipient("unsubscribe", token=rest)
    outbox_id = tokens.verify_bounce_tag(settings.secret_keys, rest)
    return None if outbox_id is None else Recipient("bounce", outbox_id=outbox_id)


class InboundHandler:
    """aiosmtpd hooks: check recipients at RCPT, act on each at DATA, one transaction each."""

    def __init__(self, db: Database, settings: Settings, lmtp: bool = False) -> None:
        self.db = db
        self.settings = settings
        self.lmtp = lmtp

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        if recipient_for(self.settings, address) is None:
            return REFUSED
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        message = message_from_bytes(
            raw if isinstance(raw, bytes) else raw.encode(), policy=policy.default
        )
        peer = session.peer[0] if isinstance(session.peer, tuple) else None
        replies = []
        for address in envelope.rcpt_tos:
            recipient = recipient_for(self.settings, address)
            try:
                if recipient is not None:
                    await self.take(recipient, message, peer)
                replies.append(ACCEPTED)
            except Exception:
                # The sender keeps the mail and tries again: nothing is lost to a database blip.
                log.exception("inbound mail for a %s address failed", recipient and recipient.kind)
                replies.append(TRY_LATER)
        if self.lmtp:  # LMTP answers DATA once per recipient (RFC 2033)
            return "\r\n".join(replies)
        return TRY_LATER if TRY_LATER in replies else ACCEPTED

    async def take(self, recipient: Recipient, message: Message, peer: str | None) -> None:
        """Act on one accepted recipient of a message."""
        if recipient.kind == "unsubscribe":
            await self._unsubscribe(recipient.token, peer)
            return
        verdict = bounces.read_returned_mail(message)
        if verdict is None:
            log.info(
                "mail to the VERP address of outbox %s is no failure report", recipient.outbox_id
            )
            return
        async with self.db.transaction() as session:
            report = await bounces.returned_mail_report(session, recipient.outbox_id, verdict)
            if report is not None:
                await bounces.apply_reports(session, self.settings, [report])

    async def _unsubscribe(self, token: str, peer: str | None) -> None:
        async with self.db.transaction() as session:
            try:
                subscriber = await subscriptions.subscriber_by_token(
                    session, self.settings.secret_keys, token
                )
            except TokenNotFound:  # a signed token of someone erased since: nothing to do
                return
            await subscriptions.unsubscribe(
                session, subscriber, None, Consent(source="mailto", ip=peer)
            )


async def start(
    db: Database, settings: Settings, host: str, port: int, lmtp: bool = False
) -> asyncio.Server:
    """Listen on host:port in the running event loop; close the returned server to stop."""
    # aiosmtpd logs every command, addresses and their tokens too, at INFO: debugging only.
    smtp_log = logging.getLogger("mail.log")
    if not smtp_log.isEnabledFor(logging.DEBUG):
        smtp_log.setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    handler = InboundHandler(db, settings, lmtp)
    protocol = LMTP if lmtp else SMTP

    def connection() -> SMTP:
        return protocol(
            handler,
            hostname=settings.site_domain,
            data_size_limit=MAX_MESSAGE_BYTES,
            loop=loop,
        )

    return await loop.create_server(connection, host=host, port=port)
