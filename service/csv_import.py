"""CSV in at millions of rows: uploads stored, and imports run as jobs in chunks.

Import reads the uploaded file in chunks; each chunk is one transaction that writes
subscribers, subscriptions and events together and advances the job's counters, so a row is
never half-imported and the job always reports exactly what is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from service import events, i18n, suppression, tokens
from service.addresses import Address, normalise
from service.config import Settings
from service.csv_export import EXPORT_COLUMNS, _is_pg, _unneutralise
from service.db import Database
from service.errors import FieldError, InvalidInput, NotFound, PayloadTooLarge
from service.models import (
    ImportJob,
    Newsletter,
    OptIn,
    Status,
    Subscriber,
    Subscription,
    UTCDateTime,
    utcnow,
)
from service.newsletters import SLUG
from service.signup import Consent, subscribe_many
from service.signup_input import MAX_NAME, SignupInput

log = logging.getLogger(__name__)

# An upload larger than this is refused with 413 while it streams in.
MAX_UPLOAD_BYTES = 2 * 1024**3
MAX_FIELD_CHARS = 1000
MAX_COLUMNS = 50
MAX_HEADER_CHARS = 100
# A physical line longer than this is not read into memory; its row is rejected.
MAX_LINE_CHARS = 64 * 1024
# How many rejected and how many skipped rows a report lists (all are counted).
MAX_REPORTED = 1000
# Rows per transaction: an active import writes with a few set-based statements per chunk;
# a pending one goes through the sign-up path, whose multi-row statements bind 8 values a row.
ACTIVE_CHUNK_ROWS = 5000
PENDING_CHUNK_ROWS = 1000
# An import this large refreshes PostgreSQL's planner statistics when it ends.
ANALYZE_AFTER_ROWS = 10_000
# A running job renews its lease after every chunk; a lease long past means the process died.
LEASE = timedelta(minutes=10)

# Columns an import understands; the export's own columns are ignored, so that an exported
# file imports as it is; any other column becomes a custom attribute.
IMPORT_COLUMNS = ("email", "name", "language")
IGNORED_COLUMNS = frozenset(EXPORT_COLUMNS) - set(IMPORT_COLUMNS) | {"created_at", "id"}

_LONG_LINE = "\x00line too long\x00"
# Entries in each of the reader's caches (custom values' JSON, an address domain's parents).
CACHE_ENTRIES = 10_000


class ImportFailed(Exception):
    """The file cannot be imported at all (no header, no email column, ...)."""


# ---------------------------------------------------------------- uploads


class StoredUpload:
    """An upload being written to its own file under data_dir/imports, size-capped."""

    def __init__(self, settings: Settings, limit: int | None = None) -> None:
        folder = settings.data_dir / "imports"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = (folder / f"{uuid.uuid4().hex}.csv").resolve()
        self.limit = MAX_UPLOAD_BYTES if limit is None else limit
        self.size = 0
        # Only the service reads it: the file holds personal data.
        self._file = os.fdopen(
            os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb"
        )

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise PayloadTooLarge(f"An import file may have at most {self.limit} bytes.")
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- import jobs


def _invalid(field_name: str, code: str, message: str) -> InvalidInput:
    return InvalidInput([FieldError(field_name, code, message)])


async def check_import(
    session: AsyncSession, slug: str | None, status: str | None, consent_note: str | None
) -> tuple[Newsletter, str, str]:
    """Validate what an import asks for; return the newsletter, the status and the note.

    Importing people as active needs a note saying where their consent came from; importing
    them as pending sends each a confirmation mail, which a single opt-in list does not have.
    """
    status = status or Status.active.value
    note = _clean_text(consent_note or "")
    if not slug:
        raise _invalid("newsletter", "required", "This field is required.")
    if status not in (Status.pending.value, Status.active.value):
        raise _invalid("status", "invalid", "status is pending or active.")
    if len(note) > 500:
        raise _invalid("consent_note", "too_long", "At most 500 characters.")
    newsletter = None
    # A slug no newsletter can have (a NUL byte breaks PostgreSQL) never reaches a query.
    if SLUG.match(slug):
        newsletter = await session.scalar(
            select(Newsletter).where(Newsletter.slug == slug, Newsletter.archived_at.is_(None))
        )
    if newsletter is None:
        raise _invalid("newsletter", "unknown_newsletter", f"Unknown newsletter: {slug[:64]}")
    if status == Status.active.value and not note:
        raise _invalid(
            "consent_note",
            "required",
            "Importing people as active needs a consent note: say where their consent came from.",
        )
    if status == Status.pending.value and newsletter.opt_in == OptIn.single.value:
        raise _invalid(
            "status",
            "invalid",
            "This newsletter is single opt-in: import as active, with a consent note.",
        )
    return newsletter, status, note


async def create_import(
    session: AsyncSession,
    *,
    newsletter_slug: str | None,
    status: str | None,
    consent_note: str | None,
    path: Path,
    filename: str,
    actor: str,
) -> ImportJob:
    """Queue an import of a stored file; the upload itself is an event naming who did it."""
    newsletter, status, note = await check_import(session, newsletter_slug, status, consent_note)
    now = utcnow()
    job = ImportJob(
        newsletter_id=newsletter.id,
        target_status=status,
        consent_note=note,
        filename=filename[:255],
        path=str(path),
        status="queued",
        actor=actor[:100],
        rejected=[],
        created_at=now,
    )
    session.add(job)
    await session.flush()
    await events.record(
        session,
        [
            events.event_row(
                "import.created",
                None,
                newsletter.id,
                job.actor,
                None,
                now,
                import_id=job.id,
                status=status,
                filename=job.filename,
            )
        ],
    )
    return job


@dataclass
class ImportReport:
    job: ImportJob
    newsletter: str

    @property
    def rejected(self) -> list[dict[str, Any]]:
        return [_entry(e) for e in self.job.rejected if e.get("outcome") != "skipped"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [_entry(e) for e in self.job.rejected if e.get("outcome") == "skipped"]


def _entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {"line": entry["line"], "reason": entry["reason"]}


async def import_report(session: AsyncSession, job_id: int) -> ImportReport:
    """An import job's progress and the rows it did not import, with line numbers."""
    found = (
        await session.execute(
            select(ImportJob, Newsletter.slug)
            .join(Newsletter, Newsletter.id == ImportJob.newsletter_id)
            .where(ImportJob.id == job_id)
        )
    ).one_or_none()
    if found is None:
        raise NotFound("No such import.")
    return ImportReport(found[0], found[1])


class _Row(NamedTuple):
    """A row that passed its checks, with what writing it needs worked out in the reader's
    thread (the event loop's own thread has the database statements to run)."""

    line: int
    address: Address
    name: str | None
    language: str | None
    attributes: dict[str, str]
    attributes_json: str
    public_id: str
    email_hash: str
    domains: list[str]
    # The same, space-separated (a domain has no space), as PostgreSQL's staging table takes
    # it: binary COPY of a text[] costs the client ~1 µs a row more than of a text.
    domains_text: str


@dataclass
class _Chunk:
    rows: list[_Row] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    seen: int = 0


def _capped_lines(source: TextIO) -> Iterator[str]:
    """The file's lines, but a monstrous one is drained, never held, and read as a marker."""
    while line := source.readline(MAX_LINE_CHARS):
        if len(line) == MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            while (rest := source.readline(MAX_LINE_CHARS)) and not rest.endswith(("\n", "\r")):
                pass
            yield _LONG_LINE + "\n"
        else:
            yield line


def _clean_text(value: str) -> str:
    # As on the public form: control characters (CR/LF above all) never reach headers or pages.
    if not value.isprintable():
        value = "".join(ch for ch in value if ch.isprintable())
    return value.strip()


class _Reader:
    """Parses and checks rows of the import file; runs in a worker thread, one chunk a call.

    The file is decoded as UTF-8 (a BOM is skipped); bytes that are not UTF-8 are kept as
    escapes so that only the rows holding them are rejected, not the whole file.
    """

    def __init__(self, path: Path, max_attributes_bytes: int) -> None:
        self._file = open(  # noqa: SIM115 - closed by close(), after the last chunk
            path, encoding="utf-8-sig", errors="surrogateescape", newline=""
        )
        self._records = csv.reader(_capped_lines(self._file), strict=True)
        self._line = 0
        self._max_attributes = max_attributes_bytes
        self.width = 0
        self.email = self.name = self.language = -1
        self.attributes: list[tuple[int, str]] = []
        # Per-row work that repeats across rows is done once: most files hold few distinct
        # sets of custom values and few domains. Both caches are bounded.
        self._public_ids: list[str] = []
        self._attributes_json: dict[tuple[tuple[str, str], ...], str] = {}
        self._domains: dict[str, tuple[list[str], str]] = {}

    def close(self) -> None:
        self._file.close()

    def read_header(self) -> None:
        header: list[str] | None = []
        try:
            while header == [] or header == [""]:  # blank lines before the header
                header = next(self._records, None)
        except csv.Error as exc:
            raise ImportFailed(f"The header row cannot be read: {exc}.") from exc
        self._line = self._records.line_num
        if not header:
            raise ImportFailed("The file is empty: a header row naming an email column is needed.")
        joined = "".join(header)
        if not joined.isascii():
            try:
                joined.encode()
            except UnicodeEncodeError as exc:
                raise ImportFailed(
                    "The file is not UTF-8 text: save it as CSV UTF-8 and upload it again."
                ) from exc
        if len(header) > MAX_COLUMNS:
            raise ImportFailed(f"Too many columns: at most {MAX_COLUMNS}.")
        names = [_clean_text(cell).lower() for cell in header]
        if any(len(n) > MAX_HEADER_CHARS for n in names):
            raise ImportFailed(f"A column name is longer than {MAX_HEADER_CHARS} characters.")
        named = [n for n in names if n]
        if len(set(named)) != len(named):
            raise ImportFailed("Two columns have the same name.")
        if "email" not in names:
            raise ImportFailed("The header row has no email column.")
        self.width = len(names)
        self.email = names.index("email")
        self.name = names.index("name") if "name" in names else -1
        self.language = names.index("language") if "language" in names else -1
        self.attributes = [
            (i, _clean_text(header[i]))
            for i, n in enumerate(names)
            if n and n not in IMPORT_COLUMNS and n not in IGNORED_COLUMNS
        ]

    def read_chunk(self, size: int) -> _Chunk | None:
        """The next `size` rows, checked and normalised; None at the end of the file."""
        chunk = _Chunk()
        in_chunk: set[str] = set()
        records = self._records
        self._public_ids = tokens.new_public_ids(size)
        while chunk.seen < size:
            line = self._line + 1
            try:
                record = next(records)
            except StopIteration:
                break
            except csv.Error as exc:
                self._line = records.line_num
                chunk.seen += 1
                chunk.rejected.append((line, f"malformed CSV: {exc}"))
                continue
            self._line = records.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line is not a row
            chunk.seen += 1
            checked = self._check(line, record)
            if isinstance(checked, str):
                chunk.rejected.append((line, checked))
            elif checked.address.key in in_chunk:
                chunk.skipped.append((line, "duplicate"))
            else:
                in_chunk.add(checked.address.key)
                chunk.rows.append(checked)
        return chunk if chunk.seen else None

    def _check(self, line: int, record: list[str]) -> _Row | str:
        """The row, or the reason it is rejected."""
        if len(record) > self.width:
            return "too many columns"
        joined = "\x1f".join(record)
        if len(joined) > MAX_FIELD_CHARS and any(len(c) > MAX_FIELD_CHARS for c in record):
            return f"field too long (more than {MAX_FIELD_CHARS} characters)"
        if "\x00" in joined:
            return "line too long" if _LONG_LINE in joined else "NUL character"
        if not joined.isascii():
            try:
                joined.encode()
            except UnicodeEncodeError:
                return "invalid UTF-8"
        width = len(record)
        raw_email = _unneutralise(record[self.email].strip()) if self.email < width else ""
        if not raw_email:
            return "email missing"
        address = normalise(raw_email)
        if isinstance(address, FieldError):
            return f"invalid email: {address.detail or address.message}"
        name = None
        if 0 <= self.name < width and record[self.name]:
            name = _clean_text(_unneutralise(record[self.name])) or None
            if name and len(name) > MAX_NAME:
                return f"name too long (more than {MAX_NAME} characters)"
        language = None
        if 0 <= self.language < width and record[self.language]:
            language = record[self.language].strip() or None
            if language and not i18n.is_tag(language):
                return "invalid language"
        attributes: dict[str, str] = {}
        for index, key in self.attributes:
            if index < width and (value := _clean_text(_unneutralise(record[index]))):
                attributes[key] = value
        if attributes:
            items = tuple(attributes.items())
            encoded = self._attributes_json.get(items)
            if encoded is None:
                encoded = json.dumps(attributes)
                if len(self._attributes_json) >= CACHE_ENTRIES:
                    self._attributes_json.clear()
                self._attributes_json[items] = encoded
        else:
            encoded = "{}"
        if len(encoded) > self._max_attributes:
            return f"attributes too large (more than {self._max_attributes} bytes of JSON)"
        key = address.key
        domain = key.rpartition("@")[2]
        domains = self._domains.get(domain)
        if domains is None:
            parents = suppression.domains_of(key)
            domains = (parents, " ".join(parents))
            if len(self._domains) >= CACHE_ENTRIES:
                self._domains.clear()
            self._domains[domain] = domains
        return _Row(
            line,
            address,
            name,
            language,
            attributes,
            encoded,
            self._public_ids.pop() if self._public_ids else tokens.new_public_id(),
            suppression.address_hash(key),
            domains[0],
            domains[1],
        )


@dataclass
class ImportProgress:
    """Where a running import is: rows read, and what became of them."""

    total: int = 0
    imported: int = 0
    skipped: int = 0
    rejected: int = 0
    report: list[dict[str, Any]] = field(default_factory=list)

    def after(
        self,
        seen: int,
        imported: int,
        rejected: Sequence[tuple[int, str]],
        skipped: Sequence[tuple[int, str]],
    ) -> tuple[ImportProgress, bool]:
        """This progress with one more chunk counted; True if the listed rows changed.

        Chunks written on several connections commit in any order: the report keeps the
        first MAX_REPORTED rejected and the first MAX_REPORTED skipped rows by line number,
        as one connection committing the chunks in file order does.
        """
        report = self.report
        if rejected or skipped:
            entries = [
                {"line": n, "reason": r, "outcome": outcome}
                for outcome, rows in (("rejected", rejected), ("skipped", skipped))
                for n, r in sorted(rows)[:MAX_REPORTED]
            ]
            room = {"rejected": MAX_REPORTED, "skipped": MAX_REPORTED}
            report = []
            for entry in sorted([*self.report, *entries], key=lambda e: int(e["line"])):
                if room[entry["outcome"]] > 0:
                    room[entry["outcome"]] -= 1
                    report.append(entry)
        progress = ImportProgress(
            self.total + seen,
            self.imported + imported,
            self.skipped + len(skipped),
            self.rejected + len(rejected),
            report,
        )
        return progress, report != self.report


@dataclass
class _Job:
    id: int
    newsletter: Newsletter
    status: str
    note: str
    actor: str
    path: Path
    # Kept in the consent record (no browser, so no user agent): it names the job that gave
    # consent, and lets a later chunk tell a repeated row from someone already subscribed.
    marker: str


ProgressCallback = Callable[[ImportProgress], Awaitable[None] | None]


async def run_import(
    db: Database,
    settings: Settings,
    job_id: int,
    *,
    chunk_rows: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> ImportJob:
    """Process a queued import to the end; a file that cannot be read fails the job with why."""
    job = await _claim(db, job_id)
    reader: _Reader | None = None
    try:
        reader = _Reader(job.path, settings.max_attributes_bytes)
        await asyncio.to_thread(reader.read_header)
        await _process(db, settings, job, reader, chunk_rows, on_progress)
    except ImportFailed as exc:
        await _finish(db, job_id, "failed", str(exc))
    except FileNotFoundError:
        await _finish(db, job_id, "failed", "The uploaded file is gone.")
    except Exception:
        log.exception("import %s failed", job_id)
        # The chunks committed so far stay imported; the counters say how far it got.
        with contextlib.suppress(Exception):
            await _finish(db, job_id, "failed", "The import stopped on an internal error.")
        raise
    else:
        await _finish(db, job_id, "done", None)
        await _refresh_statistics(db, job_id)
    finally:
        if reader is not None:
            reader.close()
    async with db.transaction() as session:
        return await session.get_one(ImportJob, job_id)


async def _claim(db: Database, job_id: int) -> _Job:
    async with db.transaction() as session:
        found = (
            await session.execute(
                select(ImportJob, Newsletter)
                .join(Newsletter, Newsletter.id == ImportJob.newsletter_id)
                .where(ImportJob.id == job_id)
            )
        ).one_or_none()
        if found is None:
            raise NotFound("No such import.")
        job, newsletter = found
        if job.status != "queued":
            raise ImportFailed(f"Import {job_id} is {job.status}, not queued.")
        job.status = "running"
        job.leased_until = utcnow() + LEASE
        return _Job(
            job.id,
            newsletter,
            job.target_status,
            job.consent_note,
            job.actor,
            Path(job.path),
            f"import #{job.id}",
        )


async def fail_interrupted(session: AsyncSession, now: datetime | None = None) -> int:
    """Imports whose process stopped mid-way (their lease ran out) are reported as failed,
    so ops see them and upload again; rows already written stay (each chunk is whole)."""
    now = now or utcnow()
    result = await session.execute(
        update(ImportJob)
        .where(ImportJob.status == "running", ImportJob.leased_until < now)
        .values(
            status="failed",
            error="interrupted: the process stopped during the import; upload the file again",
            finished_at=now,
            leased_until=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def _finish(db: Database, job_id: int, status: str, error: str | None) -> None:
    now = utcnow()
    async with db.transaction() as session:
        job = await session.get_one(ImportJob, job_id)
        job.status = status
        job.error = error
        job.finished_at = now
        job.leased_until = None
        await events.record(
            session,
            [
                events.event_row(
                    "import.finished",
                    None,
                    job.newsletter_id,
                    job.actor,
                    None,
                    now,
                    import_id=job.id,
                    status=status,
                    imported=job.rows_imported,
                    skipped=job.rows_skipped,
                    rejected=job.rows_rejected,
                )
            ],
        )


async def _refresh_statistics(db: Database, job_id: int) -> None:
    """After a bulk load PostgreSQL's planner still sees the tables as they were, and would
    read a big list through the wrong index; ANALYZE now, as its manual advises."""
    if db.is_sqlite:
        return
    async with db.transaction() as session:
        imported = await session.scalar(
            select(ImportJob.rows_imported).where(ImportJob.id == job_id)
        )
    if (imported or 0) < ANALYZE_AFTER_ROWS:
        return
    try:
        async with db.transaction() as session:
            await session.execute(text("ANALYZE subscribers, subscriptions"))
    except Exception:  # not owning the tables only costs a slower plan until autovacuum runs
        log.warning("ANALYZE after import %s failed", job_id, exc_info=True)


async def _process(
    db: Database,
    settings: Settings,
    job: _Job,
    reader: _Reader,
    chunk_rows: int | None,
    on_progress: ProgressCallback | None,
) -> None:
    active = job.status == Status.active.value
    size = chunk_rows or (ACTIVE_CHUNK_ROWS if active else PENDING_CHUNK_ROWS)
    # SQLite has one writer; PostgreSQL can write chunks on several connections (and cores).
    connections = 1 if db.is_sqlite else settings.import_connections
    committed = _Committed(ImportProgress(), asyncio.Lock(), on_progress)
    writing: dict[asyncio.Task[None], frozenset[str]] = {}
    # The next chunk is parsed in a thread while the last ones are written: the database
    # and Python work side by side, and the event loop stays free for requests.
    upcoming = asyncio.ensure_future(asyncio.to_thread(reader.read_chunk, size))
    try:
        while (chunk := await upcoming) is not None:
            keys = frozenset(r.address.key for r in chunk.rows)
            # A chunk holding an address of a chunk still being written waits for it: the
            # address's first row in the file decides, as with one connection, and two
            # chunks never wait on each other's rows.
            while len(writing) >= connections or any(
                not keys.isdisjoint(k) for k in writing.values()
            ):
                await _settle(writing)
            task = asyncio.create_task(_write_chunk(db, settings, job, chunk, committed))
            writing[task] = keys
            upcoming = asyncio.ensure_future(asyncio.to_thread(reader.read_chunk, size))
        while writing:
            await _settle(writing)
    except BaseException as exc:
        # No chunk outlives the import: on cancellation those not committed roll back; on
        # an error they end as they would. The job's counters hold the committed ones.
        if isinstance(exc, asyncio.CancelledError):
            for task in writing:
                task.cancel()
        await asyncio.gather(*writing, return_exceptions=True)
        raise
    finally:
        # A thread cannot be cancelled: let the read in flight end before the file closes.
        if not upcoming.done():
            with contextlib.suppress(Exception):
                await upcoming


async def _settle(writing: dict[asyncio.Task[None], frozenset[str]]) -> None:
    """Wait for a chunk being written to end. If one failed, the others in flight still
    end (each commits or rolls back whole), then its error stops the import."""
    done, _ = await asyncio.wait(writing, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        del writing[task]
    failed = [task for task in done if task.exception() is not None]
    if failed:
        await asyncio.gather(*writing, return_exceptions=True)
        writing.clear()
        failed[0].result()  # raises the chunk's error


@dataclass
class _Committed:
    """What the committed chunks add up to; one chunk at a time commits and adds to it."""

    progress: ImportProgress
    turn: asyncio.Lock
    on_progress: ProgressCallback | None


# SQLSTATEs of a transaction PostgreSQL aborted to let another go on: the chunk is written
# again. Concurrent chunks never share an address, but a sign-up can meet an import's row.
RETRY_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock_detected, serialization_failure
CHUNK_ATTEMPTS = 5


def _retryable(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        for candidate in (seen, getattr(seen, "orig", None)):
            if getattr(candidate, "sqlstate", None) in RETRY_SQLSTATES:
                return True
        seen = seen.__cause__
    return False


async def _write_chunk(
    db: Database, settings: Settings, job: _Job, chunk: _Chunk, committed: _Committed
) -> None:
    """One chunk in one transaction, with the job's counters; again if PostgreSQL chose it
    as a deadlock's victim (nothing of it was committed)."""
    for attempt in range(1, CHUNK_ATTEMPTS + 1):
        try:
            await _write_chunk_once(db, settings, job, chunk, committed)
            return
        except Exception as exc:
            if attempt == CHUNK_ATTEMPTS or not _retryable(exc):
                raise
            log.warning("import %s: a chunk was rolled back (%s); writing it again", job.id, exc)


async def _write_chunk_once(
    db: Database, settings: Settings, job: _Job, chunk: _Chunk, committed: _Committed
) -> None:
    has_turn = False
    try:
        async with db.transaction() as session:
            now = utcnow()
            if job.status == Status.active.value:
                imported, skipped = await _write_active(session, job, chunk.rows, now)
            else:
                imported, skipped = await _write_pending(session, settings, job, chunk.rows, now)
            # The job row is updated and committed by one chunk at a time, with the sums of
            # the chunks committed before it: it always says exactly what is committed.
            await committed.turn.acquire()
            has_turn = True
            progress, listed = committed.progress.after(
                chunk.seen, imported, chunk.rejected, chunk.skipped + skipped
            )
            values: dict[str, Any] = {
                "rows_total": progress.total,
                "rows_imported": progress.imported,
                "rows_skipped": progress.skipped,
                "rows_rejected": progress.rejected,
                "leased_until": utcnow() + LEASE,
            }
            if listed:
                values["rejected"] = list(progress.report)
            await session.execute(
                update(ImportJob)
                .where(ImportJob.id == job.id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        committed.progress = progress
        if committed.on_progress is not None:
            result = committed.on_progress(progress)
            if result is not None:
                await result
    finally:
        if has_turn:
            committed.turn.release()


async def _refused(
    session: AsyncSession, rows: list[_Row]
) -> tuple[list[_Row], list[tuple[int, str]]]:
    """Drop blocked and suppressed addresses: they may not be imported.

    The rules of suppression.blocked() and suppressed(), with the chunk's keys bound as one
    array (PostgreSQL) or one JSON document (SQLite) instead of one parameter each, which
    costs SQLAlchemy ~20 µs a key to render.
    """
    keys = [r.address.key for r in rows]
    if not keys:
        return rows, []
    domains = {d for r in rows for d in r.domains}
    hashes = {r.email_hash: r.address.key for r in rows}
    if _is_pg(session):
        blocklist = text(PG_BLOCKED)
        listed = text(PG_SUPPRESSED)
        params: dict[str, Any] = {"keys": keys, "domains": list(domains)}
        hash_param: Any = list(hashes)
    else:
        blocklist = text(SQLITE_BLOCKED)
        listed = text(SQLITE_SUPPRESSED)
        params = {"keys": json.dumps(keys), "domains": json.dumps(list(domains))}
        hash_param = json.dumps(list(hashes))
    entries = (await session.execute(blocklist, params)).all()
    addresses = {value for kind, value in entries if kind == "address"}
    bad_domains = {value for kind, value in entries if kind == "domain"}
    suppressed = {hashes[h] for (h,) in (await session.execute(listed, {"hashes": hash_param}))}
    if not entries and not suppressed:
        return rows, []
    kept: list[_Row] = []
    skipped: list[tuple[int, str]] = []
    for row in rows:
        key = row.address.key
        if key in addresses or any(d in bad_domains for d in row.domains):
            skipped.append((row.line, "blocked"))
        elif key in suppressed:
            skipped.append((row.line, "suppressed"))
        else:
            kept.append(row)
    return kept, skipped


def _skip_reason(job: _Job, status: str, source: str, marker: str | None) -> str:
    """Why someone already on the list is left as they are (an unsubscribe is respected)."""
    if source == "import" and marker == job.marker:
        return "duplicate"  # an earlier row of this same file
    return {
        Status.active.value: "already subscribed",
        Status.pending.value: "already pending",
    }.get(status, status)


async def _known(
    session: AsyncSession, job: _Job, keys: list[str]
) -> tuple[dict[str, int], dict[int, str]]:
    """Existing subscribers among these addresses, and why each one already on this
    newsletter is skipped."""
    if not keys:
        return {}, {}
    ids = {
        key: sid
        for sid, key in (
            await session.execute(
                select(Subscriber.id, Subscriber.email_key).where(Subscriber.email_key.in_(keys))
            )
        ).all()
    }
    if not ids:
        return ids, {}
    states = await session.execute(
        select(
            Subscription.subscriber_id,
            Subscription.status,
            Subscription.consent_source,
            Subscription.consent_user_agent,
        ).where(
            Subscription.newsletter_id == job.newsletter.id,
            Subscription.subscriber_id.in_(list(ids.values())),
        )
    )
    return ids, {sid: _skip_reason(job, st, src, ua) for sid, st, src, ua in states.all()}


async def _write_pending(
    session: AsyncSession, settings: Settings, job: _Job, rows: list[_Row], now: datetime
) -> tuple[int, list[tuple[int, str]]]:
    """Pending: the sign-up path itself, so each new person gets a confirmation mail."""
    rows, skipped = await _refused(session, rows)
    ids, reasons = await _known(session, job, [r.address.key for r in rows])
    consent = Consent(
        source="import", user_agent=job.marker, page=job.note or None, actor=job.actor
    )
    requests: list[tuple[SignupInput, Consent]] = []
    for row in rows:
        reason = reasons.get(ids.get(row.address.key, 0))
        if reason:
            skipped.append((row.line, reason))
            continue
        data = SignupInput(
            address=row.address,
            newsletters=[job.newsletter.slug],
            name=row.name,
            language=row.language,
            attributes=dict(row.attributes),
        )
        requests.append((data, consent))
    if requests:
        outcomes = await subscribe_many(session, settings, requests, now)
        if any(isinstance(o, InvalidInput) for o in outcomes):
            raise ImportFailed("The newsletter was archived or deleted during the import.")
    return len(requests), skipped


async def _write_active(
    session: AsyncSession, job: _Job, rows: list[_Row], now: datetime
) -> tuple[int, list[tuple[int, str]]]:
    """Active: subscribers, subscriptions and `subscription.confirmed` events, a few
    set-based statements for the whole chunk."""
    if _is_pg(session):
        return await _write_active_pg(session, job, rows, now)
    return await _write_active_generic(session, job, rows, now)


async def _write_active_generic(
    session: AsyncSession, job: _Job, rows: list[_Row], now: datetime
) -> tuple[int, list[tuple[int, str]]]:
    """The active import on either database (SQLite's path; the reference for the other)."""
    rows, skipped = await _refused(session, rows)
    if not rows:
        return 0, skipped
    created = await _insert_subscribers(session, rows, now)
    imported, more = await _subscribe_active(session, job, rows, created, now)
    return imported, skipped + more


async def _subscribe_active(
    session: AsyncSession, job: _Job, rows: list[_Row], created: dict[str, int], now: datetime
) -> tuple[int, list[tuple[int, str]]]:
    """Subscribe the rows' subscribers (those just created, by key, and those found) as
    active, with their events; the rows left as they were, with why."""
    skipped: list[tuple[int, str]] = []
    ids, reasons = await _known(
        session, job, [r.address.key for r in rows if r.address.key not in created]
    )
    wanted: list[tuple[int, int]] = []  # (subscriber id, line)
    for row in rows:
        key = row.address.key
        subscriber_id = created.get(key) or ids.get(key)
        if subscriber_id is None:
            skipped.append((row.line, "erased during the import"))
        elif reason := reasons.get(subscriber_id):
            skipped.append((row.line, reason))
        else:
            wanted.append((subscriber_id, row.line))
    inserted = await _insert_subscriptions(session, job, [sid for sid, _ in wanted], now)
    # A sign-up that landed between our read and our write keeps its own subscription.
    skipped.extend((line, "already subscribed") for sid, line in wanted if sid not in inserted)
    confirmed = [sid for sid, _ in wanted if sid in inserted]
    if await _webhooks_want_confirmed(session):
        await events.record(session, _confirmed_events(job, confirmed, now))
    elif confirmed:
        pg = _is_pg(session)
        await session.execute(
            text(PG_INSERT_EVENTS if pg else SQLITE_INSERT_EVENTS).bindparams(_now_param()),
            {
                "now": now,
                "newsletter_id": job.newsletter.id,
                "actor": job.actor,
                "data": _confirmed_data(job),
                "subscriber_ids": confirmed if pg else json.dumps(confirmed),
            },
        )
    return len(inserted), skipped


def _confirmed_data(job: _Job) -> str:
    # The text events.record() stores for event_row(..., source="import", import_id=...).
    return json.dumps({"source": "import", "import_id": job.id})


def _confirmed_events(job: _Job, subscriber_ids: list[int], now: datetime) -> list[dict[str, Any]]:
    return [
        events.event_row(
            "subscription.confirmed",
            sid,
            job.newsletter.id,
            job.actor,
            None,
            now,
            source="import",
            import_id=job.id,
        )
        for sid in subscriber_ids
    ]


async def _webhooks_want_confirmed(session: AsyncSession) -> bool:
    """Whether an active webhook wants `subscription.confirmed`: then the events go through
    events.record(), which queues a call for each; otherwise one set-based INSERT is enough."""
    hooks = (await (await session.connection()).execute(events.ACTIVE_WEBHOOKS.statement)).all()
    return any("subscription.confirmed" in types for _, types in hooks)


async def _driver(session: AsyncSession) -> Any:
    """The asyncpg connection under the session, inside the session's transaction.

    SQLAlchemy's adapter sends BEGIN with its first statement, so one statement is sent
    through it before anything goes to the driver directly.
    """
    connection = await session.connection()
    driver: Any = (await connection.get_raw_connection()).driver_connection
    if not driver.is_in_transaction():
        await connection.execute(text("SELECT 1"))
    if not driver.is_in_transaction():  # pragma: no cover - a changed SQLAlchemy adapter
        raise RuntimeError("the import's statements would run outside its transaction")
    return driver


async def _write_active_pg(
    session: AsyncSession, job: _Job, rows: list[_Row], now: datetime
) -> tuple[int, list[tuple[int, str]]]:
    """Active on PostgreSQL: the chunk is copied (binary COPY) into a temporary table, and
    the checks and the three inserts run there, set-based, in two statements.

    The same rules as the generic path (_refused, then _subscribe_active); only rows that
    are not imported come back to Python, with what decides their reason.
    """
    if not rows:
        return 0, []
    hooks_want = await _webhooks_want_confirmed(session)  # also opens the transaction
    driver = await _driver(session)
    # The temporary table has no statistics, so the planner guesses its size; a guess over
    # jit_above_cost compiles the statement, ~18 ms a chunk for a plan that runs in 20 ms.
    await driver.execute("SET LOCAL jit = off")
    await driver.execute(PG_STAGING)
    await driver.copy_records_to_table(
        "import_chunk",
        records=[
            (
                r.line,
                r.public_id,
                r.address.email,
                r.address.key,
                r.name,
                r.language,
                r.attributes_json,
                r.email_hash,
                r.domains_text,
            )
            for r in rows
        ],
        columns=STAGING_COLUMNS,
    )
    skipped: list[tuple[int, str]] = [
        (line, reason) for line, reason in await driver.fetch(PG_STAGED_REFUSED)
    ]
    if skipped:
        await driver.execute(PG_DROP_STAGED, [line for line, _ in skipped])
    found = await driver.fetchrow(
        PG_STAGED_WRITE,
        now,
        job.newsletter.id,
        job.marker,
        job.note,
        job.actor,
        _confirmed_data(job),
        not hooks_want,
    )
    imported = int(found[0])
    if hooks_want and found[1]:
        await events.record(session, _confirmed_events(job, list(found[1]), now))
    lost: set[int] = set()
    if found[2]:
        for line, sid, status, source, marker in zip(*found[2:], strict=True):
            if sid is None:
                lost.add(line)  # neither created nor seen: the generic path looks again
            else:
                skipped.append((line, _skip_reason(job, status, source, marker)))
    if lost:
        more_imported, more_skipped = await _subscribe_active(
            session, job, [r for r in rows if r.line in lost], {}, now
        )
        imported += more_imported
        skipped.extend(more_skipped)
    return imported, skipped


# Named SQL for the hot path, one statement per table whatever the chunk size: PostgreSQL
# takes each column as one array, SQLite takes the chunk as one JSON document.
PG_BLOCKED = """
SELECT kind, value FROM blocklist
WHERE (kind = 'address' AND value = ANY(CAST(:keys AS text[])))
   OR (kind = 'domain' AND value = ANY(CAST(:domains AS text[])))
"""
SQLITE_BLOCKED = """
SELECT kind, value FROM blocklist
WHERE (kind = 'address' AND value IN (SELECT value FROM json_each(:keys)))
   OR (kind = 'domain' AND value IN (SELECT value FROM json_each(:domains)))
"""
PG_SUPPRESSED = """
SELECT email_hash FROM suppressions WHERE email_hash = ANY(CAST(:hashes AS text[]))
"""
SQLITE_SUPPRESSED = """
SELECT email_hash FROM suppressions WHERE email_hash IN (SELECT value FROM json_each(:hashes))
"""
PG_INSERT_SUBSCRIBERS = """
INSERT INTO subscribers
    (public_id, email, email_key, name, language, attributes, created_at, updated_at)
SELECT r.public_id, r.email, r.email_key, r.name, r.language, CAST(r.attributes AS json),
       :now, :now
FROM unnest(CAST(:public_ids AS text[]), CAST(:emails AS text[]), CAST(:keys AS text[]),
            CAST(:names AS text[]), CAST(:languages AS text[]), CAST(:attributes AS text[]))
     AS r(public_id, email, email_key, name, language, attributes)
ON CONFLICT (email_key) DO NOTHING
RETURNING id, email_key
"""
SQLITE_INSERT_SUBSCRIBERS = """
INSERT INTO subscribers
    (public_id, email, email_key, name, language, attributes, created_at, updated_at)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, :now, :now
FROM json_each(:rows) WHERE true
ON CONFLICT (email_key) DO NOTHING
RETURNING id, email_key
"""
PG_INSERT_SUBSCRIPTIONS = """
INSERT INTO subscriptions
    (subscriber_id, newsletter_id, status, created_at, updated_at, confirmed_at,
     consent_source, consent_user_agent, consent_page, consent_at)
SELECT r.subscriber_id, :newsletter_id, 'active', :now, :now, :now,
       'import', :marker, :note, :now
FROM unnest(CAST(:subscriber_ids AS bigint[])) AS r(subscriber_id)
ON CONFLICT (subscriber_id, newsletter_id) DO NOTHING
RETURNING subscriber_id
"""
SQLITE_INSERT_SUBSCRIPTIONS = """
INSERT INTO subscriptions
    (subscriber_id, newsletter_id, status, created_at, updated_at, confirmed_at,
     consent_source, consent_user_agent, consent_page, consent_at)
SELECT value, :newsletter_id, 'active', :now, :now, :now, 'import', :marker, :note, :now
FROM json_each(:subscriber_ids) WHERE true
ON CONFLICT (subscriber_id, newsletter_id) DO NOTHING
RETURNING subscriber_id
"""


PG_INSERT_EVENTS = """
INSERT INTO events (type, subscriber_id, newsletter_id, actor, ip, data, created_at)
SELECT 'subscription.confirmed', r, :newsletter_id, :actor, NULL, CAST(:data AS json), :now
FROM unnest(CAST(:subscriber_ids AS bigint[])) AS r
"""
SQLITE_INSERT_EVENTS = """
INSERT INTO events (type, subscriber_id, newsletter_id, actor, ip, data, created_at)
SELECT 'subscription.confirmed', value, :newsletter_id, :actor, NULL, :data, :now
FROM json_each(:subscriber_ids)
"""
# PostgreSQL's active import: a temporary table per connection, emptied by every commit.
# (Named import_chunk since its domains column became text: a session that made the older
# import_rows, with domains text[], never meets this definition.)
STAGING_COLUMNS = [
    "line",
    "public_id",
    "email",
    "email_key",
    "name",
    "language",
    "attributes",
    "email_hash",
    "domains",
]
PG_STAGING = """
CREATE TEMPORARY TABLE IF NOT EXISTS import_chunk (
    line integer NOT NULL, public_id text NOT NULL, email text NOT NULL,
    email_key text NOT NULL, name text, language text, attributes text NOT NULL,
    email_hash text NOT NULL, domains text NOT NULL
) ON COMMIT DELETE ROWS
"""
# The rules of _refused(): a blocked address or domain first, then a suppressed address.
PG_STAGED_REFUSED = """
SELECT r.line,
       CASE WHEN EXISTS (SELECT 1 FROM blocklist b
                         WHERE b.kind = 'address' AND b.value = r.email_key)
              OR EXISTS (SELECT 1 FROM blocklist b
                         WHERE b.kind = 'domain'
                           AND b.value = ANY(string_to_array(r.domains, ' ')))
            THEN 'blocked' ELSE 'suppressed' END
FROM import_chunk r
WHERE EXISTS (SELECT 1 FROM blocklist b WHERE b.kind = 'address' AND b.value = r.email_key)
   OR EXISTS (SELECT 1 FROM blocklist b
              WHERE b.kind = 'domain' AND b.value = ANY(string_to_array(r.domains, ' ')))
   OR EXISTS (SELECT 1 FROM suppressions s WHERE s.email_hash = r.email_hash)
"""
PG_DROP_STAGED = "DELETE FROM import_chunk WHERE line = ANY($1::integer[])"
# _insert_subscribers() and _subscribe_active() in one statement. Its parts share one
# snapshot: `existing` sees the subscribers from before the statement, `created` the new
# ones; a row in neither (an address written or erased by someone else meanwhile) comes
# back with no subscriber id, for the generic path to look at again. $7: write the events
# here (no webhook wants them), else return the subscribed ids for events.record().
PG_STAGED_WRITE = """
WITH created AS (
    INSERT INTO subscribers
        (public_id, email, email_key, name, language, attributes, created_at, updated_at)
    SELECT public_id, email, email_key, name, language, CAST(attributes AS json), $1, $1
    FROM import_chunk ORDER BY line
    ON CONFLICT (email_key) DO NOTHING
    RETURNING id, email_key
), existing AS (
    SELECT r.line, s.id AS subscriber_id, sub.status, sub.consent_source,
           sub.consent_user_agent
    FROM import_chunk r
    LEFT JOIN subscribers s ON s.email_key = r.email_key
    LEFT JOIN subscriptions sub ON sub.subscriber_id = s.id AND sub.newsletter_id = $2
    WHERE NOT EXISTS (SELECT 1 FROM created c WHERE c.email_key = r.email_key)
), wanted AS (
    SELECT id AS subscriber_id, email_key FROM created
    UNION ALL
    SELECT subscriber_id, NULL FROM existing
    WHERE subscriber_id IS NOT NULL AND status IS NULL
), added AS (
    INSERT INTO subscriptions
        (subscriber_id, newsletter_id, status, created_at, updated_at, confirmed_at,
         consent_source, consent_user_agent, consent_page, consent_at)
    SELECT subscriber_id, $2, 'active', $1, $1, $1, 'import', $3, $4, $1 FROM wanted
    ON CONFLICT (subscriber_id, newsletter_id) DO NOTHING
    RETURNING subscriber_id
), logged AS (
    INSERT INTO events (type, subscriber_id, newsletter_id, actor, ip, data, created_at)
    SELECT 'subscription.confirmed', subscriber_id, $2, $5, NULL, CAST($6 AS json), $1
    FROM added WHERE $7
), skipped AS (
    SELECT line, subscriber_id, status, consent_source, consent_user_agent FROM existing
    WHERE subscriber_id IS NULL OR status IS NOT NULL
    UNION ALL
    -- A sign-up that landed between the read and the write keeps its own subscription.
    SELECT coalesce(r.line, e.line), w.subscriber_id, 'active', NULL, NULL
    FROM wanted w
    LEFT JOIN import_chunk r ON r.email_key = w.email_key
    LEFT JOIN existing e ON w.email_key IS NULL AND e.subscriber_id = w.subscriber_id
    WHERE NOT EXISTS (SELECT 1 FROM added a WHERE a.subscriber_id = w.subscriber_id)
)
SELECT (SELECT count(*) FROM added),
       CASE WHEN $7 THEN NULL ELSE (SELECT array_agg(subscriber_id) FROM added) END,
       array_agg(line), array_agg(subscriber_id), array_agg(status),
       array_agg(consent_source), array_agg(consent_user_agent)
FROM skipped
"""


def _now_param() -> Any:
    # Through the model's own type, so SQLite gets the same text form the ORM writes.
    return bindparam("now", type_=UTCDateTime())


async def _insert_subscribers(
    session: AsyncSession, rows: list[_Row], now: datetime
) -> dict[str, int]:
    """Create the subscribers that do not exist yet; return their ids by address key."""
    if _is_pg(session):
        stmt = text(PG_INSERT_SUBSCRIBERS).bindparams(_now_param())
        params: dict[str, Any] = {
            "now": now,
            "public_ids": [r.public_id for r in rows],
            "emails": [r.address.email for r in rows],
            "keys": [r.address.key for r in rows],
            "names": [r.name for r in rows],
            "languages": [r.language for r in rows],
            "attributes": [r.attributes_json for r in rows],
        }
    else:
        stmt = text(SQLITE_INSERT_SUBSCRIBERS).bindparams(_now_param())
        columns = [
            (r.public_id, r.address.email, r.address.key, r.name, r.language, r.attributes_json)
            for r in rows
        ]
        params = {"now": now, "rows": json.dumps(columns)}
    result = await session.execute(stmt, params)
    return {key: subscriber_id for subscriber_id, key in result.all()}


async def _insert_subscriptions(
    session: AsyncSession, job: _Job, subscriber_ids: list[int], now: datetime
) -> set[int]:
    if not subscriber_ids:
        return set()
    if _is_pg(session):
        stmt = text(PG_INSERT_SUBSCRIPTIONS).bindparams(_now_param())
        ids: Any = subscriber_ids
    else:
        stmt = text(SQLITE_INSERT_SUBSCRIPTIONS).bindparams(_now_param())
        ids = json.dumps(subscriber_ids)
    result = await session.execute(
        stmt,
        {
            "now": now,
            "newsletter_id": job.newsletter.id,
            "marker": job.marker,
            "note": job.note,
            "subscriber_ids": ids,
        },
    )
    return {int(sid) for (sid,) in result.all()}
