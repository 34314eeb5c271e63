"""Where mail goes: SMTP (reused connection, STARTTLS/TLS, auth) or a local Maildir."""

from __future__ import annotations

import asyncio
import mailbox
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from service.mail.render import OutgoingMail


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

    async def send(self, mail: OutgoingMail, envelope_from: str | None = None) -> None:
        """Deliver; `envelope_from` is the MAIL FROM (return path), else the From address."""
        ...


class MaildirTransport:
    """The embedded default: each message becomes a file a developer page can list."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def __aenter__(self) -> MaildirTransport:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def send(self, mail: OutgoingMail, envelope_from: str | None = None) -> None:
        # What the delivering MTA would have recorded as the return path.
        data = b"Return-Path: <" + (envelope_from or mail.sender).encode() + b">\r\n" + mail.data

        def write() -> None:
            mailbox.Maildir(self.path, create=True).add(data)

        await asyncio.to_thread(write)


class SMTPTransport:
    """One connection per batch, reconnected after a failure; 5xx answers are permanent."""

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

    async def __aenter__(self) -> SMTPTransport:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._close()

    async def _close(self) -> None:
        if self.client is not None:
            try:
                await self.client.quit()
            except (aiosmtplib.SMTPException, OSError):
                self.client.close()
            self.client = None

    async def _connect(self) -> aiosmtplib.SMTP:
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
        return self.client

    async def send(self, mail: OutgoingMail, envelope_from: str | None = None) -> None:
        try:
            client = await self._connect()
            await client.sendmail(envelope_from or mail.sender, [mail.recipient], mail.data)
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


def transport_for(url: str, timeout: float) -> Transport:
    scheme = urlsplit(url).scheme
    if scheme == "maildir":
        return MaildirTransport(Path(url.removeprefix("maildir://")))
    if scheme in ("smtp", "smtps"):
        return SMTPTransport(url, timeout)
    raise ValueError(f"unsupported MAIL_URL scheme: {scheme}")
