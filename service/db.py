"""Engine, sessions and the one place that opens transactions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from service.config import Settings
from service.driver import AsyncpgRunner, Runner, SqliteThreadRunner, wrapped_error


def async_url(url: str) -> str:
    """Map the plain URLs of the settings onto the async drivers the service uses."""
    parsed = make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database URL scheme: {parsed.drivername}")


# The WAL is checkpointed by WalCheckpointer, off the writers' path, where it runs; SQLite's
# own checkpoint, in the commit of the writer that crosses this many pages, is the safety net.
WAL_AUTOCHECKPOINT_PAGES = 10_000
WAL_CHECKPOINT_INTERVAL = 0.25  # seconds


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the single writer; NORMAL is durable in WAL mode except
    # for the last transactions on power loss, the usual trade for an embedded default.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    # Keys are stored lower-cased; a case-sensitive LIKE lets prefix search use their index.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()
    # Transactions are begun by hand below; the driver must not begin its own.
    dbapi_connection.isolation_level = None


def _sqlite_begin_immediate(connection: Any) -> None:
    # A deferred transaction that reads and then writes can fail with SQLITE_BUSY when another
    # writer committed in between; taking the write lock up front makes writers queue instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine(settings: Settings) -> AsyncEngine:
    url = async_url(settings.resolved_database_url)
    if url.startswith("sqlite"):
        db_path = make_url(url).database
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        # SQLite has one writer; queueing in the pool (FIFO) beats polling on the file lock.
        engine = create_async_engine(
            url, echo=settings.db_echo, pool_size=settings.sqlite_pool_size, max_overflow=0
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
        return engine
    engine = create_async_engine(
        url,
        echo=settings.db_echo,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    event.listen(engine.sync_engine.pool, "connect", _note_use)
    event.listen(engine.sync_engine.pool, "checkout", _ping_if_idle)
    event.listen(engine.sync_engine.pool, "checkin", _note_use)
    return engine


# A connection that sat idle in the pool may have been closed by the server (a restart, an
# idle timeout): ping it before use. A busy connection is not pinged: the ping is a round trip
# per transaction, and under sign-up load it was about 6% of the process's samples. A busy
# connection that dies mid-use fails its statement, SQLAlchemy then invalidates the pool, and
# the caller's retry (the sign-up batcher's) or a 503 covers that one request.
IDLE_PING_AFTER = 5.0


def _note_use(_dbapi_connection: Any, record: Any) -> None:
    record.info["used_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    if time.monotonic() - record.info.get("used_at", 0.0) < IDLE_PING_AFTER:
        return
    try:
        dbapi_connection.ping()
    except Exception as exc:
        # The pool discards this connection and checks out (or opens) another.
        raise DisconnectionError() from exc


T = TypeVar("T")
log = logging.getLogger(__name__)


class HeldConnection:
    """A pooled PostgreSQL connection kept from one run_on_driver call to the next by one
    caller (a sign-up consumer): the pool's checkout and return, with their greenlet
    hand-offs, cost about 22 µs of CPU a batch (measured here). One that failed is dropped;
    one idle for IDLE_PING_AFTER goes back to the pool to be pinged."""

    def __init__(self) -> None:
        self.fairy: PoolProxiedConnection | None = None
        self.used_at = 0.0

    def take(self) -> PoolProxiedConnection | None:
        fairy, self.fairy = self.fairy, None
        return fairy

    def take_fresh(self, within: float) -> PoolProxiedConnection | None:
        """The connection, if it was last used less than `within` seconds ago."""
        return self.take() if time.monotonic() - self.used_at < within else None

    def keep(self, fairy: PoolProxiedConnection) -> None:
        self.fairy, self.used_at = fairy, time.monotonic()


class Database:
    """Owns the engine; `transaction()` is the only way a use case gets a session, and
    `run_on_driver()` the sign-up batch's way to the driver."""

    def __init__(self, settings: Settings) -> None:
        self.engine = create_engine(settings)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session, session.begin():
            yield session

    async def run_on_driver(
        self,
        work: Callable[[Runner], Coroutine[Any, Any, T]],
        transaction: bool = True,
        held: HeldConnection | None = None,
    ) -> T:
        """Run `work` in one transaction on a pooled connection's driver itself (asyncpg,
        aiosqlite), with the statements of service.driver: committed when it returns, rolled
        back if it raises. A connection that fails to begin, commit or roll back is dropped.
        `transaction=False` (PostgreSQL only): no transaction, each statement commits alone.
        `held` (PostgreSQL only): the connection is taken from there and kept there after.

        On SQLite all of `work` runs in aiosqlite's thread, in one hand-off: each statement
        handed to that thread on its own cost about 50 µs of CPU and 70 µs of waiting (measured
        here), ten of them a sign-up batch. `work` must then only await the runner.
        """
        if held is not None and self.is_sqlite:
            raise ValueError("SQLite's one connection is not held: the API shares it")
        fairy = await self._checkout(held)
        conn = fairy.driver_connection
        assert conn is not None  # a checked-out connection has its driver's
        healthy = False
        try:
            if self.is_sqlite:
                if not transaction:
                    raise ValueError("SQLite's driver statements run in a transaction")
                # aiosqlite's queue to its thread and its sqlite3 connection, as SQLAlchemy's
                # own aiosqlite adapter uses them.
                outcome: _Outcome[T] = await conn._execute(
                    _sqlite_transaction, conn._conn, self.engine.dialect, work
                )
                healthy = outcome.healthy
                return outcome.value()
            runner = AsyncpgRunner(conn, self.engine.dialect)
            if not transaction:
                try:
                    result = await work(runner)
                except DBAPIError as exc:
                    # A statement refused (a constraint, bad data) leaves the connection as
                    # it was: no transaction to roll back.
                    healthy = not isinstance(exc, OperationalError)
                    raise
                healthy = True
                return result
            started = await _driver_step("BEGIN", _begin_asyncpg(conn))
            try:
                result = await work(runner)
            except BaseException:
                with contextlib.suppress(Exception):
                    await started.rollback()
                    healthy = True
                raise
            await _driver_step("COMMIT", started.commit())
            healthy = True
            return result
        finally:
            if not healthy:
                await greenlet_spawn(fairy.invalidate)
            if healthy and held is not None:
                held.keep(fairy)
            else:
                await greenlet_spawn(fairy.close)

    async def _checkout(self, held: HeldConnection | None) -> PoolProxiedConnection:
        if held is not None:
            fairy = held.take_fresh(IDLE_PING_AFTER)
            if fairy is not None:
                return fairy
            # Any one left has been idle long enough to have been closed by the server: back
            # to the pool, which pings such a connection before handing one out.
            await self.release(held)
        return await self.engine.raw_connection()

    async def release(self, held: HeldConnection) -> None:
        """Give a held connection back to the pool."""
        fairy = held.take()
        if fairy is not None:
            await greenlet_spawn(fairy.close)

    def wal_checkpointer(self) -> WalCheckpointer | None:
        """A checkpointer for a SQLite database file (none for PostgreSQL or in memory)."""
        path = self.engine.url.database
        if not self.is_sqlite or not path or path == ":memory:":
            return None
        return WalCheckpointer(path, WAL_CHECKPOINT_INTERVAL)

    async def dispose(self) -> None:
        await self.engine.dispose()


def insert_for(session: AsyncSession) -> Callable[..., Any]:
    """The session's dialect's INSERT, which has ON CONFLICT (PostgreSQL and SQLite alike)."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


@dataclass
class _Outcome(Generic[T]):
    """What a transaction in SQLite's thread came to, and whether its connection is whole."""

    healthy: bool
    result: T | None = None
    error: BaseException | None = None

    def value(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


def _sqlite_transaction(
    conn: sqlite3.Connection, dialect: Dialect, work: Callable[[Runner], Coroutine[Any, Any, T]]
) -> _Outcome[T]:
    """In aiosqlite's thread: BEGIN IMMEDIATE (as _sqlite_begin_immediate), `work`, COMMIT."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        return _Outcome(not conn.in_transaction, error=wrapped_error("BEGIN", (), exc))
    try:
        result = _to_end(work(SqliteThreadRunner(conn, dialect)))
        conn.commit()
    except BaseException as exc:
        error = wrapped_error("COMMIT", (), exc) if isinstance(exc, sqlite3.Error) else exc
        try:
            conn.rollback()
        except sqlite3.Error:
            return _Outcome(False, error=error)
        return _Outcome(True, error=error)
    return _Outcome(True, result)


def _to_end(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its awaits are synchronous calls) to its end."""
    try:
        work.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    work.close()
    raise RuntimeError("work in SQLite's thread may await only its runner")


async def _begin_asyncpg(conn: Any) -> Any:
    started = conn.transaction()  # raises at once on a closed connection
    await started.start()
    return started


async def _driver_step(name: str, step: Awaitable[Any]) -> Any:
    """BEGIN or COMMIT on the driver; its errors as SQLAlchemy's, as the statements' are."""
    try:
        return await step
    except Exception as exc:
        raise wrapped_error(name, (), exc) from exc


class WalCheckpointer:
    """Checkpoints a SQLite database's write-ahead log from a thread of its own.

    SQLite checkpoints in the commit that crosses `wal_autocheckpoint` pages: that writer
    copies the log into the database file and syncs it while holding the write lock (measured:
    a sixth of the sign-up batch's time on SQLite). A PASSIVE checkpoint on another
    connection runs beside the writers instead and never waits for them.
    """

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.conn: sqlite3.Connection | None = None

    def checkpoint(self) -> None:
        if self.conn is None:
            self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA busy_timeout=10000")
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def run(self, stop: asyncio.Event) -> None:
        failing = False
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
                try:
                    await asyncio.to_thread(self.checkpoint)
                    failing = False
                except sqlite3.Error:
                    if not failing:  # once a streak of failures, not four times a second
                        log.warning("WAL checkpoint failed; SQLite's own will run", exc_info=True)
                    failing = True
        finally:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
