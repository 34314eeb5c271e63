"""CSV out at millions of rows: the streaming export.

Export reads a newsletter's subscriptions in keyset pages, each page its own short
transaction, so memory stays flat and no connection (SQLite has one) or snapshot is held while
a slow client downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, literal_column, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from service import events, tokens
from service.config import Settings
from service.db import Database
from service.errors import NotFound
from service.mail.render import Links
from service.models import Newsletter, Subscriber, Subscription, utcnow

EXPORT_PAGE_ROWS = 10_000

EXPORT_COLUMNS = (
    "email",
    "name",
    "status",
    "subscribed_at",
    "confirmed_at",
    "unsubscribe_url",
    "manage_url",
    "language",
    "unsubscribed_at",
    "consent_source",
    "subscriber_id",
)

# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_NEEDS_QUOTES = re.compile(r'[",\r\n]')


class _Appender:
    """A file-like sink for csv.writer that appends each written line to a list."""

    def __init__(self, lines: list[str]) -> None:
        self.write = lines.append


def neutralise(cell: str) -> str:
    """Make a cell inert for spreadsheets: a leading formula character gets a quote before it."""
    return "'" + cell if cell.startswith(FORMULA_TRIGGERS) else cell


def _unneutralise(cell: str) -> str:
    # The reverse on import, so that an exported file imports back to the same values.
    return cell[1:] if cell[:1] == "'" and cell[1:2] in FORMULA_TRIGGERS else cell


@dataclass
class CsvExport:
    """One newsletter's subscriptions (optionally of one status), ready to stream as CSV."""

    db: Database
    settings: Settings
    newsletter: Newsletter
    status: str | None

    @property
    def filename(self) -> str:
        suffix = f"-{self.status}" if self.status else ""
        return f"{self.newsletter.slug}-subscribers{suffix}.csv"

    async def chunks(self) -> AsyncIterator[bytes]:
        """The header, then the rows in subscriber order, a page at a time.

        Each page is its own short transaction, and the next one is read while this one is
        formatted in a worker thread: the database and Python work side by side.
        """
        lines: list[str] = []
        csv.writer(_Appender(lines), lineterminator="\r\n").writerow(EXPORT_COLUMNS)
        yield lines[0].encode()
        formatter = _RowFormatter(self.settings, self.newsletter.slug)
        fetch: asyncio.Future[list[Any]] | None = asyncio.ensure_future(self._page(0))
        try:
            while fetch is not None:
                rows = await fetch
                fetch = None
                if len(rows) == EXPORT_PAGE_ROWS:
                    fetch = asyncio.ensure_future(self._page(rows[-1][-1]))
                if rows:
                    yield await asyncio.to_thread(formatter.format, rows)
        finally:
            if fetch is not None and not fetch.done():
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fetch

    async def _page(self, after: int) -> list[Any]:
        async with self.db.transaction() as session:
            if _is_pg(session):
                # Without fresh statistics the planner reads the whole list through the
                # (newsletter_id, status) index and sorts it, for every page: a sort is what
                # that plan needs and the keyset plan does not, so forbid it for this query.
                await session.execute(text("SET LOCAL enable_sort = off"))
            # On the Core connection: plain rows, without the ORM's per-row loading.
            connection = await session.connection()
            return list((await connection.execute(self._page_query(session, after))).all())

    def _page_query(self, session: AsyncSession, after: int) -> Any:
        # Keyset pages on (subscriber_id, newsletter_id), the unique index of subscriptions:
        # each page starts where the last ended, whatever the size of the list.
        newsletter_id: Any = Subscription.newsletter_id
        status: Any = Subscription.status
        if _is_pg(session):
            stamp = _iso_timestamp_pg
        else:
            stamp = _iso_timestamp_sqlite
            # SQLite keeps no statistics unless told to ANALYZE, so it would read the whole
            # list through the (newsletter_id, status) index for every page; "+ 0" and "|| ''"
            # take those columns out of its choice of index.
            newsletter_id = newsletter_id + 0
            status = status + ""
        query = (
            select(
                Subscriber.email,
                Subscriber.name,
                Subscriber.language,
                Subscriber.public_id,
                Subscription.status,
                stamp(Subscription.created_at),
                stamp(Subscription.confirmed_at),
                stamp(Subscription.unsubscribed_at),
                Subscription.consent_source,
                Subscription.subscriber_id,
            )
            .join(Subscriber, Subscriber.id == Subscription.subscriber_id)
            .where(
                newsletter_id == self.newsletter.id,
                Subscription.subscriber_id > after,
                # Implied by the join, but said, so a merge join starts at the page too.
                Subscriber.id > after,
            )
            .order_by(Subscription.subscriber_id)
            .limit(EXPORT_PAGE_ROWS)
        )
        if self.status:
            query = query.where(status == self.status)
        return query


class _RowFormatter:
    """Turns a page of rows into CSV text: the signed links, formulas made inert."""

    def __init__(self, settings: Settings, slug: str) -> None:
        links = Links(settings)
        self.keys = settings.secret_keys
        # Both URLs are built by Links itself, split around the token: one HMAC per row.
        probe = "0" * 32
        token = tokens.manage_token(self.keys, probe)
        self.manage = links.manage(probe).split(token)
        self.unsubscribe = links.unsubscribe(probe, slug).split(token)
        self.always_quote = bool(_NEEDS_QUOTES.search("".join(self.manage + self.unsubscribe)))

    def format(self, rows: list[Any]) -> bytes:
        lines: list[str] = []
        # csv.writer copies a character at a time (~17 µs for a row of two URLs); a row with
        # nothing to quote is joined instead, byte for byte what csv.writer writes.
        writer = csv.writer(_Appender(lines), lineterminator="\r\n")
        manage_head, manage_tail = self.manage
        unsub_head, unsub_tail = self.unsubscribe
        keys, always_quote, needs_quotes = self.keys, self.always_quote, _NEEDS_QUOTES
        for (
            email,
            name,
            language,
            public_id,
            status,
            subscribed_at,
            confirmed_at,
            unsubscribed_at,
            consent_source,
            _subscriber_id,
        ) in rows:
            signed = tokens.manage_token(keys, public_id)
            name = name or ""
            language = language or ""
            row = (
                neutralise(email),
                neutralise(name),
                status,
                subscribed_at or "",
                confirmed_at or "",
                unsub_head + signed + unsub_tail,
                manage_head + signed + manage_tail,
                neutralise(language),
                unsubscribed_at or "",
                consent_source,
                public_id,
            )
            # Only the free text can hold a delimiter, a quote or a line break.
            if always_quote or needs_quotes.search(email + name + language):
                writer.writerow(row)
            else:
                lines.append(",".join(row) + "\r\n")
        return "".join(lines).encode()


# The database formats timestamps (ISO 8601, UTC, to the second): cheaper than Python per row.
def _iso_timestamp_pg(column: Any) -> Any:
    return func.to_char(
        column.op("AT TIME ZONE")(literal_column("'UTC'")), 'YYYY-MM-DD"T"HH24:MI:SS"Z"'
    )


def _iso_timestamp_sqlite(column: Any) -> Any:
    return func.strftime("%Y-%m-%dT%H:%M:%SZ", column)


def _is_pg(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def prepare_export(
    db: Database, settings: Settings, slug: str, status: str | None, actor: str
) -> CsvExport:
    """Find the newsletter (NotFound if none) and record who exported what (the audit trail)."""
    async with db.transaction() as session:
        newsletter = await session.scalar(select(Newsletter).where(Newsletter.slug == slug))
        if newsletter is None:
            raise NotFound(f"No newsletter {slug[:64]!r}.")
        await events.record(
            session,
            [
                events.event_row(
                    "subscribers.exported",
                    None,
                    newsletter.id,
                    actor,
                    None,
                    utcnow(),
                    status=status,
                )
            ],
        )
    return CsvExport(db, settings, newsletter, status)
