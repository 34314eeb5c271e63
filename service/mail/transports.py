"""Where mail goes: SMTP (reused connection, STARTTLS/TLS, auth) or a local Maildir."""

from __future__ import annotations

import asyncio
import contextlib
import mailbox
import re
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import aiosmtplib.email

from service.mail.render import OutgoingMail

# A message and its MAIL FROM (None: the message's sender).
Envelope = tuple[OutgoingMail, str | None]


NEEDS_SMTPUTF8 = (
    "address not sent: its part before the @ is not ASCII, which needs SMTPUTF8, and the "
    "mail server does not offer it"
)


class DeliveryError(Exception):
    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Transport(Protocol):
    async def __aenter__(self) -> Transport: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def send(
        self, mail: OutgoingMail, envelope_from: str | None = None, then: Envelope | None = None
    ) -> None:
        """Deliver; `envelope_from` is the MAIL FROM (return path), else the From address.

        `then` is the message the caller sends next, if it knows: a transport may announce
        it to the server along with this one (never its content)."""
        ...


class MaildirTransport:
    """The embedded default: each message becomes a file a developer page can list."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def __aenter__(self) -> MaildirTransport:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def send(
        self, mail: OutgoingMail, envelope_from: str | None = None, then: Envelope | None = None
    ) -> None:
        # What the delivering MTA would have recorded as the return path.
        data = b"Return-Path: <" + (envelope_from or mail.sender).encode() + b">\r\n" + mail.data

        def write() -> None:
            mailbox.Maildir(self.path, create=True).add(data)

        await asyncio.to_thread(write)


_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
# An address that can go between <> on a command line as it is (what parseaddr would keep).
_PLAIN_ADDRESS = re.compile(r"[!#-'*+\-./0-9=?A-Z^_`a-z{|}~]+@[A-Za-z0-9.\-\[\]:]+")


def wire_data(data: bytes) -> bytes:
    """A message as SMTP DATA carries it: CRLF line ends, a dot at a line's start doubled,
    and the end-of-data line."""
    data = _LINE_ENDS.sub(b"\r\n", data) if b"\r" in data else data.replace(b"\n", b"\r\n")
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _mailbox(address: str, utf8: bool = False) -> bytes:
    if _PLAIN_ADDRESS.fullmatch(address):
        return b"<" + address.encode() + b">"
    try:
        return aiosmtplib.email.quote_address(address).encode("utf-8" if utf8 else "ascii")
    except (ValueError, UnicodeEncodeError) as exc:
        raise DeliveryError(f"address cannot be sent: {address!r}", permanent=True) from exc


def needs_smtputf8(mail: OutgoingMail) -> bool:
    """A recipient with a non-ASCII part before the @ (an internationalised domain is sent in
    its ASCII form) goes out only over SMTPUTF8 (RFC 6531)."""
    return not mail.recipient.isascii()


class _Replies(asyncio.Protocol):
    """SMTP replies in order, for a connection aiosmtplib opened (greeting, EHLO, TLS and
    AUTH done): aiosmtplib waits for each reply before the next command, which costs a
    round trip and a wake-up of both ends per command."""

    def __init__(self, transport: asyncio.WriteTransport, timeout: float) -> None:
        self.transport = transport
        self.timeout = timeout
        self.buffer = bytearray()
        self.ready: deque[tuple[int, str]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = position = 0  # where the reply being read begins; where its next line does
        while (end := self.buffer.find(b"\n", position)) != -1:
            line, position = self.buffer[position : end + 1], end + 1
            if line[3:4] == b"-":
                continue  # a multi-line reply goes on; its last line has a space there
            try:
                code = int(line[:3])
            except ValueError:
                code = 0  # not SMTP: fails the message as a transient error
            lines = bytes(self.buffer[start:position]).splitlines()
            self.ready.append(
                (code, "\n".join(x[4:].strip().decode("utf-8", "replace") for x in lines))
            )
            start = position
        del self.buffer[:start]
        if len(self.buffer) > 65536:  # no line end in sight: not a mail server
            self.transport.abort()
        if self.ready and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc or 'closed'}")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    async def replies(self, count: int) -> list[tuple[int, str]]:
        got: list[tuple[int, str]] = []
        while True:
            while self.ready and len(got) < count:
                got.append(self.ready.popleft())
            if len(got) == count:
                return got
            if self.lost is not None:
                raise self.lost
            loop = asyncio.get_running_loop()
            self.waiter = waiter = loop.create_future()
            # A timer, not asyncio.wait_for: that costs twice as much, twice a message.
            timer = loop.call_later(self.timeout, self._expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None

    @staticmethod
    def _expire(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(
                aiosmtplib.SMTPReadTimeoutError("timed out waiting for the server")
            )

    def write(self, data: bytes) -> None:
        if self.lost is not None or self.transport.is_closing():
            raise self.lost or aiosmtplib.SMTPServerDisconnected("connection closed")
        self.transport.write(data)

    async def quit(self) -> None:
        try:
            self.write(b"QUIT\r\n")
            await self.replies(1)
        finally:
            self.transport.close()


class SMTPTransport:
    """One connection, reconnected after a failure; 5xx answers are permanent.

    aiosmtplib connects (greeting, EHLO, STARTTLS, AUTH). When the server offers PIPELINING
    (RFC 2920), the transport then reads the replies itself: a message's MAIL, RCPT and DATA
    go out in one write, and its content in one write with the next message's commands when
    the caller names the next message. Otherwise aiosmtplib sends command by command, one
    round trip each.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.implicit_tls = parts.scheme == "smtps"
        self.hostname = parts.hostname or "localhost"
        self.port = parts.port or (465 if self.implicit_tls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        starttls = query.get("starttls", ["auto"])[0]
        # None = STARTTLS when the server offers it; True = refuse to send without it.
        self.start_tls: bool | None = True if starttls == "require" else None
        if starttls == "never":
            self.start_tls = False
        self.timeout = timeout
        self.client: aiosmtplib.SMTP | None = None
        self.pipeline: _Replies | None = None
        # The next message whose commands were sent with the last one's content.
        self.opened: tuple[OutgoingMail, str, bytes] | None = None
        self.size = False  # the server takes SIZE= on MAIL (RFC 1870)
        self.smtputf8 = False  # the server takes UTF-8 addresses and headers (RFC 6531)

    async def __aenter__(self) -> SMTPTransport:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._close()

    def _abort(self) -> None:
        """Drop the connection without QUIT: after a message's commands were sent ahead the
        server may be waiting for its content, and would take anything sent as content."""
        if self.pipeline is not None:
            self.pipeline.transport.abort()
        elif self.client is not None:
            self.client.close()
        self.pipeline = self.client = None
        self.opened = None

    async def _close(self) -> None:
        if self.opened is not None:
            self._abort()
        if self.pipeline is not None:
            pipeline, self.pipeline, self.client = self.pipeline, None, None
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await pipeline.quit()
        if self.client is not None:
            try:
                await self.client.quit()
            except (aiosmtplib.SMTPException, OSError):
                self.client.close()
            self.client = None

    async def _connect(self) -> aiosmtplib.SMTP:
        if self.pipeline is not None and (
            self.pipeline.lost is not None or self.pipeline.transport.is_closing()
        ):
            # Closed by the server while idle between batches: open another.
            self._abort()
        if self.client is None or not self.client.is_connected:
            client = aiosmtplib.SMTP(
                hostname=self.hostname,
                port=self.port,
                use_tls=self.implicit_tls,
                start_tls=None if self.implicit_tls else self.start_tls,
                username=self.username,
                password=self.password,
                timeout=self.timeout,
            )
            await client.connect()
            self.client = client
            if client.is_ehlo_or_helo_needed:
                # After STARTTLS (or without AUTH) aiosmtplib greets again only on the next
                # command; the extensions are needed now, to know about PIPELINING. A server
                # that refuses EHLO gets HELO from aiosmtplib's own sendmail.
                with contextlib.suppress(aiosmtplib.SMTPHeloError):
                    await client.ehlo()
            self.smtputf8 = client.supports_extension("smtputf8")
            transport = client.transport
            if client.supports_extension("pipelining") and isinstance(
                transport, asyncio.WriteTransport
            ):
                self.pipeline = _Replies(transport, self.timeout)
                self.size = client.supports_extension("size")
        return self.client

    async def send(
        self, mail: OutgoingMail, envelope_from: str | None = None, then: Envelope | None = None
    ) -> None:
        sender = envelope_from or mail.sender
        if self.opened is not None and (self.opened[0] is not mail or self.opened[1] != sender):
            self._abort()  # not the message announced: start afresh
        try:
            client = await self._connect()
            utf8 = needs_smtputf8(mail)
            if utf8 and not self.smtputf8:
                raise DeliveryError(NEEDS_SMTPUTF8, permanent=True)
            if then is not None and needs_smtputf8(then[0]) and not self.smtputf8:
                then = None  # not announced: it fails in its own turn, this one goes out
            if self.pipeline is not None:
                await self._send_pipelined(self.pipeline, mail, sender, then)
            else:
                options = ["SMTPUTF8"] if utf8 else []
                await client.sendmail(sender, [mail.recipient], mail.data, mail_options=options)
        except DeliveryError:
            await self._close()
            raise
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await self._close()
            codes = [err.code for err in exc.recipients]
            raise DeliveryError(str(exc), permanent=all(c >= 500 for c in codes)) from exc
        except aiosmtplib.SMTPResponseException as exc:
            # A fresh connection per failure: the session state after an error is unknown.
            await self._close()
            raise DeliveryError(f"{exc.code} {exc.message}", permanent=exc.code >= 500) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._close()
            raise DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False) from exc

    def _envelope(self, mail: OutgoingMail, sender: str) -> tuple[bytes, bytes]:
        """The MAIL, RCPT and DATA commands of a message, and its DATA as sent."""
        data = wire_data(mail.data)
        # SIZE counts the message as sent, without the end-of-data line (RFC 1870).
        options = b" SIZE=%d" % (len(data) - 3) if self.size else b""
        utf8 = needs_smtputf8(mail)
        if utf8:
            options += b" SMTPUTF8"
        commands = b"MAIL FROM:%s%s\r\nRCPT TO:%s\r\nDATA\r\n" % (
            _mailbox(sender),
            options,
            _mailbox(mail.recipient, utf8=utf8),
        )
        return commands, data

    async def _send_pipelined(
        self, pipeline: _Replies, mail: OutgoingMail, sender: str, then: Envelope | None
    ) -> None:
        """MAIL, RCPT and DATA in one write, their three replies, then the message.

        The next message's commands go out in the same write as this one's content (RFC 2920
        lets a group start with message content): one write and one wake-up of each end a
        message. The next message's content waits for its own call, so a caller may still
        record this one as sent first; a connection closed meanwhile delivers nothing more.
        """
        opened, self.opened = self.opened, None
        if opened is not None:
            data = opened[2]  # its commands went out with the previous message (send checked)
        else:
            commands, data = self._envelope(mail, sender)
            pipeline.write(commands)
        (
            (mail_code, mail_text),
            (rcpt_code, rcpt_text),
            (data_code, data_text),
        ) = await pipeline.replies(3)
        if data_code == 354 and (mail_code != 250 or rcpt_code not in (250, 251)):
            # A server should refuse DATA with no recipient; end the empty message if not.
            pipeline.write(b".\r\n")
            await pipeline.replies(1)
        if mail_code != 250:
            raise DeliveryError(f"{mail_code} {mail_text}", permanent=mail_code >= 500)
        if rcpt_code not in (250, 251):
            raise DeliveryError(
                f"{rcpt_code} {rcpt_text} ({mail.recipient})", permanent=rcpt_code >= 500
            )
        if data_code != 354:
            raise DeliveryError(f"{data_code} {data_text}", permanent=data_code >= 500)
        if then is not None:
            next_sender = then[1] or then[0].sender
            next_commands, next_data = self._envelope(then[0], next_sender)
            pipeline.write(data + next_commands)
            self.opened = (then[0], next_sender, next_data)
        else:
            pipeline.write(data)
        ((code, text),) = await pipeline.replies(1)
        if code != 250:
            raise DeliveryError(f"{code} {text}", permanent=code >= 500)


def transport_for(url: str, timeout: float) -> Transport:
    scheme = urlsplit(url).scheme
    if scheme == "maildir":
        return MaildirTransport(Path(url.removeprefix("maildir://")))
    if scheme in ("smtp", "smtps"):
        return SMTPTransport(url, timeout)
    raise ValueError(f"unsupported MAIL_URL scheme: {scheme}")
