"""Multi-row inserts through the driver, for the sign-up hot path.

SQLAlchemy's executemany runs every value of every row through its chain of type processors
and builds the statement's parameters row by row; for a batch of sign-ups that was most of the
batch's CPU. Here each column's processor is looked up once, values go to the driver as
plain lists, and one statement writes all rows: on PostgreSQL `INSERT ... SELECT * FROM
unnest($1::type[], ...)` (the same SQL text, hence one prepared statement, whatever the batch
size), on SQLite the driver's own executemany (one C loop). On PostgreSQL the statements go
through SQLAlchemy's connection (`exec_driver_sql`), so echo and execution events apply. On
SQLite they go to aiosqlite itself, still in the caller's transaction: through SQLAlchemy each
statement is three hand-offs to aiosqlite's thread (cursor, execute, close), here one, and
those hand-offs, not CPU, were what a sign-up batch on SQLite waited for. Its errors are
raised as SQLAlchemy's, as through the connection.
`insert_many` writes rows of several tables: on PostgreSQL in one statement (each table's
insert a data-modifying CTE), so a sign-up batch pays one round trip for them all.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from service.models import Base

SQLITE_MAX_PARAMETERS = 32_766


@dataclass(frozen=True)
class _Plan:
    sql: str
    processors: tuple[Callable[[Any], Any] | None, ...]


def _quoted(dialect: Dialect, names: Sequence[str]) -> str:
    quote = dialect.identifier_preparer.quote
    return ", ".join(quote(name) for name in names)


@functools.lru_cache(maxsize=1024)
def _plan(
    dialect: Dialect,
    table_name: str,
    columns: tuple[str, ...],
    conflict: str | None,
    returning: tuple[str, ...],
    rows: int,
    first: int = 1,
) -> _Plan:
    """`first`: the number of the plan's first parameter ($n) on PostgreSQL."""
    table: Table = Base.metadata.tables[table_name]
    for column in table.columns:
        # A Python-side default would be skipped here: the caller must give the value.
        skipped = column.name not in columns and not column.primary_key
        if skipped and column.default is not None and column.server_default is None:
            raise ValueError(f"{table_name}.{column.name} needs a value")
    processors = tuple(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    )
    target = f"INSERT INTO {dialect.identifier_preparer.quote(table_name)} "
    target += f"({_quoted(dialect, columns)}) "
    if dialect.name == "postgresql":
        arrays = ", ".join(
            f"${i}::{table.c[name].type.compile(dialect=dialect)}[]"
            for i, name in enumerate(columns, first)
        )
        # Names and types come from the schema, values travel as parameters.
        source = f"SELECT * FROM unnest({arrays})"  # noqa: S608
    else:
        one = "(" + ", ".join("?" for _ in columns) + ")"
        source = "VALUES " + ", ".join(one for _ in range(rows))
    tail = f" ON CONFLICT ({conflict}) DO NOTHING" if conflict else ""
    tail += f" RETURNING {_quoted(dialect, returning)}" if returning else ""
    return _Plan(target + source + tail, processors)


def _columns(
    plan: _Plan, names: tuple[str, ...], rows: Sequence[dict[str, Any]]
) -> list[list[Any]]:
    out: list[list[Any]] = []
    for name, process in zip(names, plan.processors, strict=True):
        values = [row[name] for row in rows]
        out.append(values if process is None else [process(v) for v in values])
    return out


async def insert_rows(
    conn: AsyncConnection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    *,
    on_conflict_do_nothing: str | None = None,
    returning: tuple[str, ...] = (),
) -> list[tuple[Any, ...]]:
    """Insert rows that all have the same keys; the RETURNING columns of the rows written.

    On SQLite, RETURNING needs one multi-row statement (its SQL depends on the row count);
    without it, executemany runs one prepared statement over all rows.
    """
    if not rows:
        return []
    names = tuple(rows[0])
    dialect = conn.dialect
    if dialect.name == "postgresql":
        plan = _plan(dialect, table.name, names, on_conflict_do_nothing, returning, 0)
        result = await conn.exec_driver_sql(plan.sql, tuple(_columns(plan, names, rows)))
        return [tuple(row) for row in result.all()] if returning else []
    if returning:
        # SQLite takes at most 32,766 parameters in one statement.
        per_statement = max(1, SQLITE_MAX_PARAMETERS // len(names))
        if len(rows) > per_statement:
            found: list[tuple[Any, ...]] = []
            for start in range(0, len(rows), per_statement):
                found += await insert_rows(
                    conn,
                    table,
                    rows[start : start + per_statement],
                    on_conflict_do_nothing=on_conflict_do_nothing,
                    returning=returning,
                )
            return found
        plan = _plan(dialect, table.name, names, on_conflict_do_nothing, returning, len(rows))
        flat = [value for row in zip(*_columns(plan, names, rows), strict=True) for value in row]
        async with _sqlite_errors(plan.sql, flat):
            written = await (await _aiosqlite(conn)).execute_fetchall(plan.sql, flat)
        return [tuple(row) for row in written]
    plan = _plan(dialect, table.name, names, on_conflict_do_nothing, (), 1)
    params = list(zip(*_columns(plan, names, rows), strict=True))
    async with _sqlite_errors(plan.sql, params):
        await (await _aiosqlite(conn)).executemany(plan.sql, params)
    return []


async def _aiosqlite(conn: AsyncConnection) -> Any:
    """The aiosqlite connection under `conn`, in the transaction SQLAlchemy has begun."""
    if not conn.in_transaction():
        # Outside one, the driver would commit each statement alone (isolation_level=None).
        raise RuntimeError("bulk inserts on SQLite must run in a transaction")
    return (await conn.get_raw_connection()).driver_connection


@contextlib.asynccontextmanager
async def _sqlite_errors(sql: str, params: Any) -> AsyncIterator[None]:
    """sqlite3's errors as SQLAlchemy raises them (IntegrityError, OperationalError, ...)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc


@functools.lru_cache(maxsize=256)
def _combined(
    dialect: Dialect, parts: tuple[tuple[str, tuple[str, ...]], ...]
) -> tuple[str, tuple[_Plan, ...]]:
    """One PostgreSQL statement inserting into each (table, columns) of `parts`: its SQL,
    and each part's plan (for its values' processors)."""
    plans: list[_Plan] = []
    first = 1
    for table_name, columns in parts:
        plans.append(_plan(dialect, table_name, columns, None, (), 0, first))
        first += len(columns)
    ctes = ", ".join(f"w{i} AS ({plan.sql})" for i, plan in enumerate(plans[:-1]))
    return f"WITH {ctes} {plans[-1].sql}", tuple(plans)


async def insert_many(
    conn: AsyncConnection, parts: Sequence[tuple[Table, Sequence[dict[str, Any]]]]
) -> None:
    """Insert the rows of several tables (each table's rows with the same keys).

    PostgreSQL runs every part in one statement, where no part sees another's rows: no part
    may refer by foreign key to rows written by another part of the same call.
    """
    parts = [(table, rows) for table, rows in parts if rows]
    if conn.dialect.name != "postgresql" or len(parts) < 2:
        for table, rows in parts:
            await insert_rows(conn, table, rows)
        return
    names = [tuple(rows[0]) for _, rows in parts]
    sql, plans = _combined(
        conn.dialect,
        tuple((table.name, columns) for (table, _), columns in zip(parts, names, strict=True)),
    )
    values = [
        column
        for plan, columns, (_, rows) in zip(plans, names, parts, strict=True)
        for column in _columns(plan, columns, rows)
    ]
    await conn.exec_driver_sql(sql, tuple(values))
