"""What every `newsletter` command shares: its settings, and errors as one line, not a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable

import typer
from alembic.util import CommandError
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from service import migrate
from service.config import Settings, load_settings
from service.errors import first_line, schema_missing
from service.observability import configure_logging

# What a command may meet that is the setup's fault rather than a bug: a database that cannot
# be reached, is not there or has no schema, and a migration target that does not exist.
SETUP_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, OSError, CommandError)


def command_settings(*, migrate_embedded: bool = True) -> Settings:
    """The server's settings; on the embedded SQLite default, the schema brought to head first
    (as `newsletter serve` does), so no command meets a database without tables."""
    try:
        settings = load_settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "NEWSLETTER_" + "_".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            typer.echo(f"error: {name}: {message}", err=True)
        raise typer.Exit(2) from exc
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, settings.json_logs)
    if migrate_embedded and settings.is_sqlite:
        # Quietly: the command's own output is what its user reads.
        alembic_log = logging.getLogger("alembic")
        level = alembic_log.level
        alembic_log.setLevel(logging.WARNING)
        try:
            migrate.upgrade(settings.resolved_database_url)
        finally:
            alembic_log.setLevel(level)
    return settings


def describe_setup_error(exc: Exception) -> str:
    """One line for ops: what is wrong and, where we know, what to do."""
    if isinstance(exc, CommandError):
        return f"migration: {exc}"
    if isinstance(exc, OSError) and exc.filename is not None:  # a file the command was given
        return f"{exc.strerror}: {exc.filename}"
    if schema_missing(exc):
        return "the database has no schema yet; run `newsletter migrate` first"
    return f"database: {first_line(exc)}"


def run_command(app: Callable[[], object]) -> None:
    """Run the typer app; a setup error becomes one line on stderr and exit status 1."""
    try:
        app()
    except SETUP_ERRORS as exc:
        typer.echo(f"error: {describe_setup_error(exc)}", err=True)
        raise SystemExit(1) from None
