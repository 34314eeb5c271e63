"""The `newsletter` command: every subcommand reads the same settings as the server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from sqlalchemy.ext.asyncio import AsyncSession

from service import keys, migrate, newsletters, purge
from service.cli_common import command_settings, run_command
from service.config import Settings
from service.csv_cli import subscribers_app
from service.db import Database
from service.errors import DomainError
from service.mail import outbox
from service.mail.worker import DeliveryWorker

T = TypeVar("T")

app = typer.Typer(help="Newsletter subscription service.", no_args_is_help=True)
newsletters_app = typer.Typer(help="Create and list newsletters.", no_args_is_help=True)
keys_app = typer.Typer(help="Admin API keys.", no_args_is_help=True)
outbox_app = typer.Typer(help="The mail outbox.", no_args_is_help=True)
app.add_typer(newsletters_app, name="newsletters")
app.add_typer(keys_app, name="keys")
app.add_typer(outbox_app, name="outbox")
app.add_typer(subscribers_app, name="subscribers")


def _run(work: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(work)
    except DomainError as exc:
        typer.echo(f"error: {exc.detail or exc.title}", err=True)
        raise typer.Exit(1) from exc


async def _in_transaction(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """One use case in one transaction, for a command that needs nothing more."""
    db = Database(settings)
    try:
        async with db.transaction() as session:
            return await work(session)
    finally:
        await db.dispose()


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(help="API processes.")] = 1,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="No delivery worker.")] = False,
    demo: Annotated[bool, typer.Option("--demo", help="Create a sample newsletter.")] = False,
) -> None:
    """Run the HTTP service (and, by default, the delivery worker inside it)."""
    settings = command_settings(migrate_embedded=False)
    if "base_url" not in settings.model_fields_set:
        # Links in mail must point at where this server really listens.
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
        settings = settings.model_copy(update={"base_url": f"http://{shown}:{port}"})
        os.environ["NEWSLETTER_BASE_URL"] = settings.base_url
    if settings.is_sqlite:
        migrate.upgrade(settings.resolved_database_url)
    if demo:
        _run(_ensure_demo(settings))
    if no_worker:
        os.environ["NEWSLETTER_RUN_WORKER"] = "false"
    # Child processes must sign with the same key the embedded setup just generated.
    os.environ["NEWSLETTER_SECRET_KEYS"] = ",".join(settings.secret_keys)
    typer.echo(f"Serving on http://{host}:{port} (API docs at /docs)")
    if settings.show_dev_mailbox:
        typer.echo(
            f"Mail goes to {settings.maildir_path}; read it at {settings.base_url}/dev/mailbox"
        )
    uvicorn.run(
        "service.app:served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level,
        log_config=None,  # served_app sets up JSON logs in every worker process
        access_log=False,  # latency is in /metrics; access lines would carry tokens in paths
        proxy_headers=False,
    )


async def _ensure_demo(settings: Settings) -> None:
    db = Database(settings)
    try:
        async with db.transaction() as session:
            try:
                await newsletters.get_newsletter(session, "demo")
                return
            except DomainError:
                pass
            await newsletters.create_newsletter(
                session, "demo", "Demo newsletter", description="A sample list to sign up to."
            )
        typer.echo(f"Created newsletter 'demo'; sign up at {settings.base_url}/subscribe/demo")
    finally:
        await db.dispose()


@app.command()
def worker() -> None:
    """Run the delivery worker alone (no HTTP)."""
    settings = command_settings()

    async def main() -> None:
        db = Database(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await DeliveryWorker(db, settings).run_forever(stop)
        finally:
            await db.dispose()

    asyncio.run(main())


@app.command()
def inbound(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (default NEWSLETTER_INBOUND_HOST).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind (default NEWSLETTER_INBOUND_PORT).")
    ] = None,
    lmtp: Annotated[bool, typer.Option("--lmtp", help="Speak LMTP instead of SMTP.")] = False,
) -> None:
    """Take inbound mail: List-Unsubscribe mailto requests and bounces to VERP addresses."""
    # Imported here: aiosmtpd is needed by this command only.
    from service import inbound as listener

    settings = command_settings()
    bind_host = host or settings.inbound_host
    bind_port = port or settings.inbound_port

    async def main() -> None:
        db = Database(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await listener.start(db, settings, bind_host, bind_port, lmtp)
        typer.echo(f"Taking {'LMTP' if lmtp else 'SMTP'} mail on {bind_host}:{bind_port}")
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()
            await db.dispose()

    asyncio.run(main())


@app.command("migrate")
def migrate_command(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Bring the database schema to the head revision (or the one named)."""
    settings = command_settings(migrate_embedded=False)
    migrate.upgrade(settings.resolved_database_url, revision)
    typer.echo(f"Database at {revision}")


@newsletters_app.command("create")
def newsletters_create(
    slug: Annotated[str, typer.Option(help="URL-safe identifier.")],
    name: Annotated[str, typer.Option(help="Name readers see.")],
    opt_in: Annotated[str, typer.Option("--opt-in", help="double or single.")] = "double",
    description: Annotated[str, typer.Option(help="Shown on forms.")] = "",
    from_email: Annotated[str | None, typer.Option(help="Sender address.")] = None,
    from_name: Annotated[str, typer.Option(help="Sender name.")] = "",
    language: Annotated[str, typer.Option(help="Language of pages and mail.")] = "en",
) -> None:
    """Create a newsletter."""
    settings = command_settings()

    created = _run(
        _in_transaction(
            settings,
            lambda s: newsletters.create_newsletter(
                s,
                slug,
                name,
                opt_in=opt_in,
                description=description,
                from_email=from_email,
                from_name=from_name,
                language=language,
            ),
        )
    )
    typer.echo(f"Created newsletter {created.slug} ({created.opt_in} opt-in)")


@newsletters_app.command("list")
def newsletters_list() -> None:
    """List newsletters with their subscription counts."""
    settings = command_settings()

    found = _run(
        _in_transaction(settings, lambda s: newsletters.list_with_counts(s, limit=100_000))
    )
    typer.echo(f"{'slug':<24} {'opt-in':<7} {'active':>8} {'pending':>8}  name")
    for item in found:
        n = item.newsletter
        archived = " (archived)" if n.archived_at else ""
        typer.echo(
            f"{n.slug:<24} {n.opt_in:<7} {item.counts.get('active', 0):>8} "
            f"{item.counts.get('pending', 0):>8}  {n.name}{archived}"
        )


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what uses the key.")],
    scope: Annotated[str, typer.Option(help="admin or read.")] = "admin",
) -> None:
    """Create an API key; it is printed once, alone on the last line."""
    settings = command_settings()

    created = _run(_in_transaction(settings, lambda s: keys.create_key(s, name, scope)))
    typer.echo(f"Created {scope} key {name!r}; it is shown only now:")
    typer.echo(created.key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (never the keys themselves)."""
    settings = command_settings()

    for key in _run(_in_transaction(settings, keys.list_keys)):
        state = "revoked" if key.revoked_at else "live"
        used = key.last_used_at.isoformat() if key.last_used_at else "never"
        typer.echo(f"{key.id:>4} {key.prefix}… {key.scope:<6} {state:<8} used {used}  {key.name}")


@outbox_app.command("status")
def outbox_status() -> None:
    """Count outbox rows by state."""
    settings = command_settings()

    for status, count in _run(_in_transaction(settings, outbox.status_counts)).items():
        typer.echo(f"{status:<8} {count}")


@outbox_app.command("retry")
def outbox_retry(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Message ids; all dead ones if none.")
    ] = None,
) -> None:
    """Queue dead messages again with a fresh set of attempts."""
    settings = command_settings()

    count = _run(_in_transaction(settings, lambda s: outbox.retry_dead(s, ids or None)))
    typer.echo(f"{count} messages queued again")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The id `keys list` shows.")]) -> None:
    """Revoke a key: it stops working at once."""
    settings = command_settings()

    _run(_in_transaction(settings, lambda s: keys.revoke_key(s, key_id)))
    typer.echo(f"Key {key_id} revoked")


@app.command("purge-pending")
def purge_pending_command(
    older_than: Annotated[str, typer.Option(help="Age like 30d or 12h.")] = "30d",
) -> None:
    """Delete sign-ups never confirmed, and the people who have nothing else."""
    settings = command_settings()

    result = _run(
        _in_transaction(settings, lambda s: purge.purge_pending(s, purge.parse_age(older_than)))
    )
    if result is None:
        typer.echo("another purge is running; nothing done")
        return
    typer.echo(
        f"purged {result.subscriptions} pending subscriptions, {result.subscribers} subscribers"
    )


def main() -> None:
    run_command(app)
