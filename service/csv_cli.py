"""`newsletter subscribers import|export`: the CSV jobs of the admin API, in the foreground."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from service import csv_export, csv_import
from service.cli_common import command_settings
from service.db import Database
from service.errors import DomainError, InvalidInput

subscribers_app = typer.Typer(help="Import and export subscribers as CSV.", no_args_is_help=True)

# How many rejected and skipped lines the command prints (the API report lists more).
SHOWN_LINES = 20


def _fail(exc: DomainError) -> typer.Exit:
    if isinstance(exc, InvalidInput):
        for error in exc.errors:
            typer.echo(f"error: {error.field}: {error.message}", err=True)
    else:
        typer.echo(f"error: {exc.detail or exc.title}", err=True)
    return typer.Exit(1)


@subscribers_app.command("import")
def import_command(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The CSV file.")
    ],
    newsletter: Annotated[str, typer.Option(help="Slug of the newsletter to import into.")],
    status: Annotated[
        str, typer.Option(help="active, or pending to send each a confirmation mail.")
    ] = "active",
    consent_note: Annotated[
        str,
        typer.Option(
            "--consent-note",
            help="Where consent came from (default for active: this file and command).",
        ),
    ] = "",
) -> None:
    """Import a CSV file (columns: email, name, language; others become attributes)."""
    settings = command_settings()
    path = file.resolve()
    if status == "active" and not consent_note.strip():
        # The contract's command is `import FILE --newsletter S [--status active]`: ops who
        # run it vouch for the file, and the consent record says which file that was.
        consent_note = f"Imported from {file.name} with `newsletter subscribers import`"

    def show(progress: csv_import.ImportProgress) -> None:
        typer.echo(
            f"\r{progress.total} rows read: {progress.imported} imported, "
            f"{progress.skipped} skipped, {progress.rejected} rejected",
            nl=False,
            err=True,
        )

    async def main() -> int:
        db = Database(settings)
        try:
            async with db.transaction() as session:
                job = await csv_import.create_import(
                    session,
                    newsletter_slug=newsletter,
                    status=status,
                    consent_note=consent_note,
                    path=path,
                    filename=file.name,
                    actor="cli",
                )
            await csv_import.run_import(db, settings, job.id, on_progress=show)
            typer.echo("", err=True)
            async with db.transaction() as session:
                report = await csv_import.import_report(session, job.id)
        finally:
            await db.dispose()
        return _print_report(report)

    try:
        code = asyncio.run(main())
    except DomainError as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code)


def _print_report(report: csv_import.ImportReport) -> int:
    job = report.job
    typer.echo(f"Import {job.id} into {report.newsletter} ({job.target_status}): {job.status}")
    if job.error:
        typer.echo(f"error: {job.error}", err=True)
    typer.echo(
        f"{job.rows_imported} imported, {job.rows_skipped} skipped, {job.rows_rejected} rejected"
        f" of {job.rows_total} rows"
    )
    for title, entries, count in (
        ("Rejected", report.rejected, job.rows_rejected),
        ("Skipped", report.skipped, job.rows_skipped),
    ):
        if not entries:
            continue
        typer.echo(f"{title}:")
        for entry in entries[:SHOWN_LINES]:
            typer.echo(f"  line {entry['line']}: {entry['reason']}")
        if count > SHOWN_LINES:
            typer.echo(f"  … and {count - SHOWN_LINES} more (see GET /v1/admin/imports/{job.id})")
    return 0 if job.status == "done" else 1


@subscribers_app.command("export")
def export_command(
    newsletter: Annotated[str, typer.Option(help="Slug of the newsletter.")],
    status: Annotated[
        str | None, typer.Option(help="Only this status: pending, active, unsubscribed, bounced.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write to this file instead of standard output.")
    ] = None,
) -> None:
    """Export a newsletter's subscribers as CSV, with unsubscribe and manage URLs."""
    settings = command_settings()
    if status is not None and status not in ("pending", "active", "unsubscribed", "bounced"):
        typer.echo("error: status is pending, active, unsubscribed or bounced", err=True)
        raise typer.Exit(2)

    async def main() -> None:
        db = Database(settings)
        try:
            # The newsletter is looked up first: a wrong slug leaves no empty file behind.
            export = await csv_export.prepare_export(db, settings, newsletter, status, "cli")
            sink = _open_output(output)
            try:
                async for chunk in export.chunks():
                    sink.write(chunk)
            finally:
                sink.flush()
                if output is not None:
                    sink.close()
        finally:
            await db.dispose()

    try:
        asyncio.run(main())
    except DomainError as exc:
        raise _fail(exc) from exc


def _open_output(output: Path | None) -> BinaryIO:
    return sys.stdout.buffer if output is None else output.open("wb")
