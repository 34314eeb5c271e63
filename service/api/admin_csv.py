"""Admin API, CSV: streaming export of a newsletter's subscribers, and imports as jobs."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from python_multipart.multipart import MultipartParser, parse_options_header

from service import csv_export, csv_import
from service.api.admin_common import ADMIN_RESPONSES, INVALID, NOT_FOUND, RowId, actor
from service.api.bodies import MalformedBody, media_type
from service.api.deps import AdminKey, DbDep, ReadKey, SettingsDep
from service.api.schemas import problem_response
from service.config import Settings
from service.csv_import import StoredUpload
from service.db import Database
from service.errors import (
    DomainError,
    FieldError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.models import Status

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin: CSV"], responses=ADMIN_RESPONSES)

CSV_TYPES = ("text/csv", "application/csv")
# The small text fields of a multipart upload (newsletter, status, consent_note).
MAX_FORM_FIELD_BYTES = 4096
MAX_FORM_PARTS = 20
# What a multipart body may carry besides the file: boundaries, part headers, the fields.
MULTIPART_OVERHEAD = 64 * 1024 + MAX_FORM_PARTS * MAX_FORM_FIELD_BYTES


class ImportQueued(BaseModel):
    id: int = Field(examples=[7])
    status: Literal["queued"] = "queued"
    url: str = Field(examples=["/v1/admin/imports/7"])


class ImportLine(BaseModel):
    line: int = Field(examples=[12], description="Line of the file where the row starts.")
    reason: str = Field(examples=["invalid email: An email address must have an @-sign."])


class ImportOut(BaseModel):
    id: int = Field(examples=[7])
    status: Literal["queued", "running", "done", "failed"] = Field(examples=["done"])
    newsletter: str = Field(examples=["weekly"])
    target_status: Literal["pending", "active"] = Field(examples=["active"])
    filename: str = Field(examples=["members.csv"])
    actor: str = Field(examples=["key:ops"])
    rows_total: int = Field(examples=[1003])
    rows_imported: int = Field(examples=[1000])
    rows_skipped: int = Field(examples=[2])
    rows_rejected: int = Field(examples=[1])
    rejected: list[ImportLine] = Field(description="The first 1000 rejected rows.")
    skipped: list[ImportLine] = Field(
        description="The first 1000 skipped rows (duplicate, suppressed, blocked, ...)."
    )
    error: str | None = Field(default=None, examples=[None])
    created_at: datetime
    finished_at: datetime | None = None
    url: str = Field(examples=["/v1/admin/imports/7"])


IMPORT_BODY: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": description + " (for a text/csv body; multipart sends it as a field)",
        }
        for name, description in (
            ("newsletter", "Slug of the newsletter to import into"),
            ("status", "pending (a confirmation mail each) or active (default)"),
            ("consent_note", "Where consent came from; required for active"),
        )
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "newsletter"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "newsletter": {"type": "string"},
                        "status": {"type": "string", "enum": ["pending", "active"]},
                        "consent_note": {"type": "string", "maxLength": 500},
                    },
                }
            },
            "text/csv": {
                "schema": {"type": "string"},
                "example": "email,name,company\nada@example.com,Ada,Analytical Engines\n",
            },
        },
    },
}


@router.get(
    "/newsletters/{slug}/subscribers.csv",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The subscribers as CSV, streamed.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        **NOT_FOUND,
    },
    summary="Export a newsletter's subscribers as CSV",
)
async def export_subscribers(
    slug: str,
    db: DbDep,
    settings: SettingsDep,
    key: ReadKey,
    status: Annotated[Status | None, Query(description="Only subscriptions in this status")] = None,
) -> StreamingResponse:
    """One row per subscription, with its unsubscribe and manage URLs; cells that a
    spreadsheet would run as formulas start with a quote."""
    export = await csv_export.prepare_export(
        db, settings, slug, status.value if status else None, actor(key)
    )
    return StreamingResponse(
        export.chunks(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{export.filename}"',
            # The rows hold links that act for each reader: no cache may keep them.
            "Cache-Control": "no-store",
        },
    )


@router.post(
    "/imports",
    status_code=202,
    response_model=ImportQueued,
    openapi_extra=IMPORT_BODY,
    responses={
        **INVALID,
        413: problem_response(
            "File too large",
            {
                "type": "about:blank#payload_too_large",
                "title": "Request body too large",
                "status": 413,
            },
        ),
        415: problem_response(
            "Not CSV or multipart",
            {
                "type": "about:blank#unsupported_media_type",
                "title": "Unsupported content type",
                "status": 415,
            },
        ),
    },
    summary="Upload a CSV file to import",
)
async def create_import(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    key: AdminKey,
    newsletter: Annotated[str | None, Query(max_length=64, include_in_schema=False)] = None,
    status: Annotated[str | None, Query(max_length=16, include_in_schema=False)] = None,
    consent_note: Annotated[str | None, Query(max_length=500, include_in_schema=False)] = None,
) -> JSONResponse:
    """The file is stored, then imported in the background: poll the `url` for progress and
    the report. Columns: `email` (required), `name`, `language`; others become attributes."""
    kind = media_type(request)
    if kind not in (*CSV_TYPES, "multipart/form-data"):
        raise UnsupportedMediaType("Send text/csv, or multipart/form-data with a file field.")
    _check_declared_size(request, kind)
    upload = StoredUpload(settings)
    try:
        if kind == "multipart/form-data":
            fields, filename = await _receive_multipart(request, upload)
            newsletter, status = fields.get("newsletter"), fields.get("status")
            consent_note = fields.get("consent_note")
        else:
            # Everything is known before the body: refuse a wrong request before reading it.
            async with db.transaction() as session:
                await csv_import.check_import(session, newsletter, status, consent_note)
            async for chunk in request.stream():
                upload.write(chunk)
            filename = "upload.csv"
        upload.close()
        async with db.transaction() as session:
            job = await csv_import.create_import(
                session,
                newsletter_slug=newsletter,
                status=status,
                consent_note=consent_note,
                path=upload.path,
                filename=filename,
                actor=actor(key),
            )
    except BaseException:
        upload.discard()
        raise
    _start(request.app, db, settings, job.id)
    url = f"/v1/admin/imports/{job.id}"
    return JSONResponse(
        ImportQueued(id=job.id, url=url).model_dump(), status_code=202, headers={"Location": url}
    )


@router.get(
    "/imports/{import_id}",
    response_model=ImportOut,
    responses=NOT_FOUND,
    summary="An import's progress and report",
)
async def get_import(import_id: RowId, db: DbDep, _key: ReadKey) -> ImportOut:
    async with db.transaction() as session:
        report = await csv_import.import_report(session, import_id)
    job = report.job
    return ImportOut(
        id=job.id,
        status=job.status,
        newsletter=report.newsletter,
        target_status=job.target_status,
        filename=job.filename,
        actor=job.actor,
        rows_total=job.rows_total,
        rows_imported=job.rows_imported,
        rows_skipped=job.rows_skipped,
        rows_rejected=job.rows_rejected,
        rejected=[ImportLine(**e) for e in report.rejected],
        skipped=[ImportLine(**e) for e in report.skipped],
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
        url=f"/v1/admin/imports/{job.id}",
    )


def _check_declared_size(request: Request, kind: str) -> None:
    limit = csv_import.MAX_UPLOAD_BYTES
    if kind == "multipart/form-data":
        limit += MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Refused before a byte is read; a body without a length is capped as it streams.
        raise PayloadTooLarge(
            f"An import file may have at most {csv_import.MAX_UPLOAD_BYTES} bytes."
        )


async def _receive_multipart(request: Request, upload: StoredUpload) -> tuple[dict[str, str], str]:
    """Stream a multipart body: the `file` part to disk, the small fields into memory."""
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedBody("A multipart body needs a boundary.")
    parts = _Parts(upload)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except DomainError:
        raise
    except Exception as exc:  # the parser raises several types of its own
        raise MalformedBody("Malformed multipart body.") from exc
    if not parts.got_file:
        raise InvalidInput([FieldError("file", "required", "This field is required.")])
    return parts.fields, parts.filename


class _Parts:
    """Callbacks of the streaming multipart parser: where each part's bytes go."""

    def __init__(self, upload: StoredUpload) -> None:
        self.upload = upload
        self.fields: dict[str, str] = {}
        self.filename = "upload.csv"
        self.got_file = False
        self._count = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._target: str | None = None  # "file", a field name, or None to ignore
        self._buffer = bytearray()

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_val,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._count += 1
        if self._count > MAX_FORM_PARTS:
            raise MalformedBody(f"At most {MAX_FORM_PARTS} parts.")
        self._disposition = b""
        self._target = None
        self._buffer.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file" and not self.got_file:
            self._target = "file"
            self.got_file = True
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.filename = filename.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload.csv"
        elif name in ("newsletter", "status", "consent_note"):
            self._target = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "file":
            self.upload.write(data[start:end])
        elif self._target is not None:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_FORM_FIELD_BYTES:
                raise MalformedBody(f"The field {self._target} is too long.")

    def _part_end(self) -> None:
        if self._target not in (None, "file"):
            assert self._target is not None
            self.fields[self._target] = self._buffer.decode("utf-8", "replace").strip()
        self._target = None


def _start(app: FastAPI, db: Database, settings: Settings, job_id: int) -> None:
    """Run the import in this process; keep the task referenced until it ends."""
    tasks: set[asyncio.Task[Any]] | None = getattr(app.state, "import_tasks", None)
    if tasks is None:
        tasks = app.state.import_tasks = set()
    worker = getattr(app.state, "worker", None)

    def wake(_progress: csv_import.ImportProgress) -> None:
        # A pending import queues confirmation mail: tell an in-process worker at once.
        if worker is not None:
            worker.wakeup.set()

    task = asyncio.create_task(_run(db, settings, job_id, wake))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _run(
    db: Database, settings: Settings, job_id: int, wake: csv_import.ProgressCallback
) -> None:
    try:
        await csv_import.run_import(db, settings, job_id, on_progress=wake)
    except Exception:
        log.exception("import %s stopped", job_id)
