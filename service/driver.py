"""Statements of the sign-up batch, run on the database driver below SQLAlchemy.

The batch's statements are SQLAlchemy Core constructs (`Query`), so each is written once and
reads as SQL. A `Runner` executes them: `SessionRunner` through SQLAlchemy's connection (any
use case's transaction: imports, the admin API, tests); `AsyncpgRunner` and
`SqliteThreadRunner` on the driver's own connection, in the transaction
`Database.run_on_driver()` opens, where each statement is compiled once per dialect and run
straight on asyncpg, or as a plain sqlite3 call in aiosqlite's thread.

Why: through SQLAlchemy's asyncio layer every statement, begin and commit runs in a new
greenlet, and each greenlet maps (and later unmaps) a fresh 16 KiB Python frame stack and
faults its pages in; with its execution context and result wrapping, that layer was the
largest single cost of a PostgreSQL batch (measured: a sixth of the server's samples under
load, and kernel work besides, see docs/benchmarks.md, "Fifth pass"). Lists are bound as
one parameter (`any_of`), never as an expanding IN, so a statement's SQL does not depend on
how many values it is given.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import JSON, Boolean, TypeDecorator
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql import ColumnElement, bindparam
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.selectable import Select
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeEngine

Row = tuple[Any, ...]


class ValueList(TypeDecorator[list[Any]]):
    """A list bound as one parameter: an array on PostgreSQL, JSON text on SQLite."""

    impl = JSON
    cache_ok = True

    def __init__(self, item: TypeEngine[Any]) -> None:
        super().__init__()
        self.item = item

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(self.item))
        return dialect.type_descriptor(JSON())


class _AnyOf(ColumnElement[bool]):
    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a comparison: SQLite must not get "= 1" after it
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("values", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any], values: BindParameter[Any]) -> None:
        self.column = column
        self.values = values


def any_of(column: ColumnElement[Any] | QueryableAttribute[Any], name: str) -> ColumnElement[bool]:
    """`column` is one of the list bound as `name`."""
    element = column.expression if isinstance(column, QueryableAttribute) else column
    return _AnyOf(element, bindparam(name, type_=ValueList(element.type)))


@compiles(_AnyOf, "postgresql")
def _any_of_postgresql(element: _AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} = ANY({values})"


@compiles(_AnyOf)
def _any_of_sqlite(element: _AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    column, values = compiler.process(element.column, **kw), compiler.process(element.values, **kw)
    return f"{column} IN (SELECT value FROM json_each({values}))"  # noqa: S608 (SQL of ours)


Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the positional parameters, in order
    defaults: tuple[Any, ...]  # the values of parameters a statement carries itself
    binds: tuple[Processor, ...]
    results: tuple[Processor, ...]


@dataclass(eq=False)
class Query:
    """A Core statement with named parameters, compiled once per dialect for the driver."""

    statement: Any
    _compiled: dict[str, _Compiled] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def columns(self) -> tuple[str, ...]:
        """The names of the columns a select gives, in order."""
        return tuple(c.key for c in self.statement.selected_columns)

    def compiled(self, dialect: Dialect) -> _Compiled:
        found = self._compiled.get(dialect.name)
        if found is None:
            found = self._compiled[dialect.name] = self._compile(dialect)
        return found

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self.statement.compile(dialect=dialect)
        if "POSTCOMPILE" in compiled.string:
            raise ValueError("a driver statement binds lists with any_of, not IN")
        names = tuple(compiled.positiontup or ())
        binds = tuple(compiled.binds[n].type._cached_bind_processor(dialect) for n in names)
        results: tuple[Processor, ...] = ()
        if isinstance(self.statement, Select):
            results = tuple(
                c.type._cached_result_processor(dialect, None)
                for c in self.statement.selected_columns
            )
        return _Compiled(
            compiled.string,
            names,
            tuple(compiled.binds[n].effective_value for n in names),
            binds,
            results,
        )


def _arguments(compiled: _Compiled, params: Mapping[str, Any]) -> list[Any]:
    values = []
    for name, default, process in zip(
        compiled.names, compiled.defaults, compiled.binds, strict=True
    ):
        value = params.get(name, default)
        values.append(value if process is None else process(value))
    return values


def _processed(compiled: _Compiled, rows: Sequence[Sequence[Any]]) -> list[Row]:
    if not any(compiled.results):
        return [tuple(row) for row in rows]
    return [
        tuple(
            value if process is None else process(value)
            for value, process in zip(row, compiled.results, strict=True)
        )
        for row in rows
    ]


class Runner(Protocol):
    """Where the sign-up batch's statements run."""

    @property
    def dialect(self) -> Dialect: ...

    async def rows(self, query: Query, params: Mapping[str, Any]) -> list[Row]:
        """The rows of a query, values processed as SQLAlchemy's types would."""

    async def many(self, query: Query, params: Sequence[Mapping[str, Any]]) -> None:
        """One statement for each set of parameters."""

    async def rows_sql(self, sql: str, args: Sequence[Any]) -> list[Row]:
        """Rows of a statement in the driver's own SQL and parameter style (values raw)."""

    async def many_sql(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        """executemany of a statement in the driver's own SQL and parameter style."""


class SessionRunner:
    """Through SQLAlchemy's connection, in the transaction the caller has begun: echo and
    execution events apply, except to rows_sql/many_sql on SQLite, which go to aiosqlite
    itself (SqliteRunner: one hand-off to its thread a statement, not three)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.dialect = conn.dialect

    async def rows(self, query: Query, params: Mapping[str, Any]) -> list[Row]:
        return [tuple(row) for row in await self.conn.execute(query.statement, dict(params))]

    async def many(self, query: Query, params: Sequence[Mapping[str, Any]]) -> None:
        if params:
            await self.conn.execute(query.statement, [dict(p) for p in params])

    async def rows_sql(self, sql: str, args: Sequence[Any]) -> list[Row]:
        if self.dialect.name == "sqlite":
            return await SqliteRunner(await self._aiosqlite(), self.dialect).rows_sql(sql, args)
        result = await self.conn.exec_driver_sql(sql, tuple(args))
        return [tuple(row) for row in result.all()] if result.returns_rows else []

    async def many_sql(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        if self.dialect.name == "sqlite":
            await SqliteRunner(await self._aiosqlite(), self.dialect).many_sql(sql, args)
            return
        await self.conn.exec_driver_sql(sql, [tuple(a) for a in args])

    async def _aiosqlite(self) -> Any:
        """The aiosqlite connection under the session's, in the transaction it has begun:
        through SQLAlchemy each statement is three hand-offs to aiosqlite's thread, here one."""
        if not self.conn.in_transaction():
            # Outside one, the driver would commit each statement alone (isolation_level=None).
            raise RuntimeError("driver statements on SQLite must run in a transaction")
        return (await self.conn.get_raw_connection()).driver_connection


# PostgreSQL's SQLSTATE classes, as SQLAlchemy's asyncpg adapter names them: connection
# exceptions, data exceptions, integrity violations, transaction rollbacks (deadlocks).
_SQLSTATE_ERRORS: dict[str, type[DBAPIError]] = {
    "08": OperationalError,
    "22": DataError,
    "23": IntegrityError,
    "40": OperationalError,
}


def wrapped_error(sql: str, args: Any, exc: Exception) -> StatementError:
    """A driver's error as SQLAlchemy raises it: IntegrityError for sqlite3's IntegrityError
    and for PostgreSQL's class 23, OperationalError for a lost connection, ..."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in _SQLSTATE_ERRORS:
        return _SQLSTATE_ERRORS[sqlstate[:2]](sql, args, exc)
    # asyncpg's InterfaceError (and its ConnectionDoesNotExistError): a connection gone or busy.
    if isinstance(exc, OSError) or any(t.__name__ == "InterfaceError" for t in type(exc).__mro__):
        return OperationalError(sql, args, exc)
    return DBAPIError.instance(sql, args, exc, Exception)


class _DriverRunner:
    """rows() and many() on top of a driver's own fetch and executemany, whose errors (those
    of `errors`) are raised as SQLAlchemy's."""

    errors: type[Exception] | tuple[type[Exception], ...] = Exception

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect

    async def rows(self, query: Query, params: Mapping[str, Any]) -> list[Row]:
        compiled = query.compiled(self.dialect)
        return _processed(compiled, await self.rows_sql(compiled.sql, _arguments(compiled, params)))

    async def many(self, query: Query, params: Sequence[Mapping[str, Any]]) -> None:
        compiled = query.compiled(self.dialect)
        await self.many_sql(compiled.sql, [_arguments(compiled, p) for p in params])

    async def rows_sql(self, sql: str, args: Sequence[Any]) -> list[Row]:
        try:
            return [tuple(row) for row in await self._fetch(sql, args)]
        except self.errors as exc:
            raise wrapped_error(sql, args, exc) from exc

    async def many_sql(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        if not args:
            return
        try:
            await self._executemany(sql, args)
        except self.errors as exc:
            raise wrapped_error(sql, args, exc) from exc

    async def _fetch(self, sql: str, args: Sequence[Any]) -> Sequence[Sequence[Any]]:
        raise NotImplementedError

    async def _executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError


class AsyncpgRunner(_DriverRunner):
    """Straight on an asyncpg connection (any error of its is the database's or the
    connection's: asyncpg has no common base class for them)."""

    async def _fetch(self, sql: str, args: Sequence[Any]) -> Sequence[Sequence[Any]]:
        rows: Sequence[Sequence[Any]] = await self.conn.fetch(sql, *args)
        return rows

    async def _executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, args)


class SqliteRunner(_DriverRunner):
    """Straight on an aiosqlite connection: one hand-off to its thread per statement."""

    errors = sqlite3.Error

    async def _fetch(self, sql: str, args: Sequence[Any]) -> Sequence[Sequence[Any]]:
        return list(await self.conn.execute_fetchall(sql, args))

    async def _executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self.conn.executemany(sql, args)


class SqliteThreadRunner(_DriverRunner):
    """Plain sqlite3 calls, made from the connection's own thread (aiosqlite's): the awaits of
    the code using it never suspend, so that code runs there to its end in one hand-off."""

    errors = sqlite3.Error

    async def _fetch(self, sql: str, args: Sequence[Any]) -> Sequence[Sequence[Any]]:
        rows: Sequence[Sequence[Any]] = self.conn.execute(sql, args).fetchall()
        return rows

    async def _executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, args)
