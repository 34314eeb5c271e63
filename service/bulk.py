"""Multi-row inserts through the driver, for the sign-up hot path.

SQLAlchemy's executemany runs every value of every row through its chain of type processors
and builds the statement's parameters row by row; for a batch of sign-ups that was most of the
batch's CPU. Here one statement writes all rows of a table.
On PostgreSQL the rows travel as one JSON document: `INSERT ... SELECT ... FROM
json_to_recordset($1::json) AS r(column text, ...)`, each value cast to its column's type
(the same SQL text, hence one prepared statement, whatever the batch size). asyncpg's encoding
of one typed array per column cost one to two microseconds a value, checks on every element
included; orjson writes the document in a fraction of that (a batch of 8 new addresses: 2.3 µs
where the standard library's encoder took 30, most of it calling back for each timestamp).
Timestamps are written in ISO 8601 with their offset (a naive one is refused, as UTCDateTime
refuses it); a None in a JSON column is stored as JSON null, as SQLAlchemy's JSON type does.
On SQLite each column's bind processor is looked up once and the driver's own executemany runs
one C loop. The statements run on a service.driver Runner: through SQLAlchemy's connection or
on the driver itself; either way errors are raised as SQLAlchemy's.
`insert_many` writes rows of several tables: on PostgreSQL in one statement (each table's
insert a data-modifying CTE), so a sign-up batch pays one round trip for them all.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import JSON, DateTime, Table
from sqlalchemy.engine import Dialect

from service.driver import Runner
from service.models import Base

SQLITE_MAX_PARAMETERS = 32_766
PARENTS = "parents"  # insert_family's CTE: each placeholder (ref) with its parent's id


@dataclass(frozen=True)
class _Plan:
    sql: str
    processors: tuple[Callable[[Any], Any] | None, ...]
    json_columns: tuple[str, ...] = ()  # PostgreSQL: sent as their JSON text
    timestamps: tuple[str, ...] = ()  # PostgreSQL: the columns checked for naive datetimes


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
    ref: str | None = None,
) -> _Plan:
    """`first`: the number of the plan's parameter ($n) on PostgreSQL; `ref` (PostgreSQL): the
    column that holds a placeholder of insert_family's, written as its parent's id."""
    table: Table = Base.metadata.tables[table_name]
    for column in table.columns:
        # A Python-side default would be skipped here: the caller must give the value.
        skipped = column.name not in columns and not column.primary_key
        if skipped and column.default is not None and column.server_default is None:
            raise ValueError(f"{table_name}.{column.name} needs a value")
    quote = dialect.identifier_preparer.quote
    target = f"INSERT INTO {quote(table_name)} "
    target += f"({_quoted(dialect, columns)}) "
    if dialect.name == "postgresql":
        record, picked = _recordset(dialect, table, columns, ref)
        # Names and types come from the schema, values travel as one parameter.
        source = f"SELECT {picked} FROM json_to_recordset(${first}::json) AS r({record})"  # noqa: S608
        if ref is not None:
            source += f" JOIN {PARENTS} AS m ON m.ref = r.{quote(ref)}::bigint"
        tail = f" ON CONFLICT ({conflict}) DO NOTHING" if conflict else ""
        tail += f" RETURNING {_quoted(dialect, returning)}" if returning else ""
        return _document_plan(target + source + tail, table, columns)
    one = "(" + ", ".join("?" for _ in columns) + ")"
    source = "VALUES " + ", ".join(one for _ in range(rows))
    processors = tuple(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    )
    tail = f" ON CONFLICT ({conflict}) DO NOTHING" if conflict else ""
    tail += f" RETURNING {_quoted(dialect, returning)}" if returning else ""
    return _Plan(target + source + tail, processors)


def _recordset(
    dialect: Dialect, table: Table, columns: tuple[str, ...], ref: str | None = None
) -> tuple[str, str]:
    """PostgreSQL: the record definition json_to_recordset reads `columns` with (all as text),
    and the values cast to their columns' types."""
    # Every value is read as text and cast to its column's type, as the arrays it replaced
    # were (an explicit cast: a too-long string is cut, not refused). A JSON null would
    # become SQL NULL: SQLAlchemy's JSON type stores it as JSON null.
    quote = dialect.identifier_preparer.quote
    record = ", ".join(f"{quote(name)} text" for name in columns)
    picked = ", ".join(
        "m.id"
        if name == ref
        else f"coalesce(r.{quote(name)}::json, 'null'::json)"
        if isinstance(table.c[name].type, JSON)
        else f"r.{quote(name)}::{table.c[name].type.compile(dialect=dialect)}"
        for name in columns
    )
    return record, picked


def _document_plan(sql: str, table: Table, columns: tuple[str, ...]) -> _Plan:
    """A PostgreSQL plan: which of `columns` are JSON, which hold timestamps."""
    types = [(name, table.c[name].type) for name in columns]
    return _Plan(
        sql,
        (),
        tuple(name for name, kind in types if isinstance(kind, JSON)),
        tuple(name for name, kind in types if isinstance(getattr(kind, "impl", kind), DateTime)),
    )


def _json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        # What orjson refuses and the standard encoder writes: an integer past 64 bits or a
        # lone surrogate in a JSON column (PostgreSQL then decides, as it always did).
        return json.dumps(value, default=_timestamp, separators=(",", ":"))


def _timestamp(value: object) -> str:
    if not isinstance(value, datetime):
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    return value.isoformat()


def _document(plan: _Plan, rows: Sequence[dict[str, Any]]) -> str:
    """Rows as the JSON array json_to_recordset reads (PostgreSQL)."""
    for name in plan.timestamps:
        # Written without an offset, PostgreSQL would read it in the session's time zone.
        if any(row[name] is not None and row[name].tzinfo is None for row in rows):
            raise ValueError("naive datetime")
    document = _json(rows)
    if plan.json_columns and "\\u0000" in document:
        # PostgreSQL refuses "\u0000" in a value it parses with the document: JSON columns then
        # travel as their JSON text, a string (rare: the inputs refuse NUL everywhere else).
        document = _json([row | {c: _json(row[c]) for c in plan.json_columns} for row in rows])
    return document


def _columns(
    plan: _Plan, names: tuple[str, ...], rows: Sequence[dict[str, Any]]
) -> list[list[Any]]:
    out: list[list[Any]] = []
    for name, process in zip(names, plan.processors, strict=True):
        values = [row[name] for row in rows]
        out.append(values if process is None else [process(v) for v in values])
    return out


async def insert_rows(
    runner: Runner,
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
    dialect = runner.dialect
    if dialect.name == "postgresql":
        plan = _plan(dialect, table.name, names, on_conflict_do_nothing, returning, 0)
        written = await runner.rows_sql(plan.sql, (_document(plan, rows),))
        return written if returning else []
    if returning:
        # SQLite takes at most 32,766 parameters in one statement.
        per_statement = max(1, SQLITE_MAX_PARAMETERS // len(names))
        if len(rows) > per_statement:
            found: list[tuple[Any, ...]] = []
            for start in range(0, len(rows), per_statement):
                found += await insert_rows(
                    runner,
                    table,
                    rows[start : start + per_statement],
                    on_conflict_do_nothing=on_conflict_do_nothing,
                    returning=returning,
                )
            return found
        plan = _plan(dialect, table.name, names, on_conflict_do_nothing, returning, len(rows))
        flat = [value for row in zip(*_columns(plan, names, rows), strict=True) for value in row]
        return await runner.rows_sql(plan.sql, flat)
    plan = _plan(dialect, table.name, names, on_conflict_do_nothing, (), 1)
    await runner.many_sql(plan.sql, list(zip(*_columns(plan, names, rows), strict=True)))
    return []


@dataclass(frozen=True)
class FanOut:
    """The last statement of an insert_many on PostgreSQL: it reads the rows the first part
    wrote as the CTE `w0`, with the `returning` columns (for example to queue a call for each
    of them in the same round trip)."""

    returning: tuple[str, ...]
    sql: str


@functools.lru_cache(maxsize=256)
def _combined(
    dialect: Dialect, parts: tuple[tuple[str, tuple[str, ...]], ...], then: FanOut | None
) -> tuple[str, tuple[_Plan, ...]]:
    """One PostgreSQL statement inserting into each (table, columns) of `parts`, and each
    part's plan."""
    plans = [
        _plan(
            dialect, table_name, columns, None, then.returning if then and i == 0 else (), 0, i + 1
        )
        for i, (table_name, columns) in enumerate(parts)
    ]
    inserts = [plan.sql for plan in plans]
    last = then.sql if then is not None else inserts.pop()
    ctes = ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(inserts))
    return f"WITH {ctes} {last}", tuple(plans)


async def insert_many(
    runner: Runner,
    parts: Sequence[tuple[Table, Sequence[dict[str, Any]]]],
    then: FanOut | None = None,
) -> None:
    """Insert the rows of several tables (each table's rows with the same keys).

    PostgreSQL runs every part in one statement, where no part sees another's rows: no part
    may refer by foreign key to rows written by another part of the same call. `then`
    (PostgreSQL only) runs in that statement too, after the first part's rows are written.
    """
    if then is not None and runner.dialect.name != "postgresql":
        raise ValueError("a fan-out statement needs PostgreSQL")
    if then is not None and not parts[0][1]:
        then = None  # nothing written for it to read
    parts = [(table, rows) for table, rows in parts if rows]
    if runner.dialect.name != "postgresql" or (len(parts) < 2 and then is None):
        for table, rows in parts:
            await insert_rows(runner, table, rows)
        return
    sql, plans = _combined(
        runner.dialect, tuple((table.name, tuple(rows[0])) for table, rows in parts), then
    )
    documents = tuple(_document(plan, rows) for plan, (_, rows) in zip(plans, parts, strict=True))
    await runner.rows_sql(sql, documents)


@dataclass(frozen=True)
class Only:
    """insert_family: write only the parents for which `sql` holds, an SQL condition on the
    parent's row `r` that may read `extra`: values each parent row carries besides its
    table's, as (name, PostgreSQL type) pairs."""

    extra: tuple[tuple[str, str], ...]
    sql: str


@functools.lru_cache(maxsize=64)
def _family(
    dialect: Dialect,
    parent: tuple[str, tuple[str, ...]],
    key: str,
    children: tuple[tuple[str, tuple[str, ...]], ...],
    ref: str,
    then: FanOut | None,
    only: Only | None = None,
) -> tuple[str, tuple[_Plan, ...]]:
    """insert_family's statement and the plan of each of its documents (the parents' first)."""
    quote = dialect.identifier_preparer.quote
    table_name, columns = parent
    table: Table = Base.metadata.tables[table_name]
    record, picked = _recordset(dialect, table, columns)
    plans = [_document_plan("", table, columns)]
    extra = "".join(f", {quote(name)} {kind}" for name, kind in only.extra) if only else ""
    where = f" WHERE {only.sql}" if only else ""
    ctes = [
        f"given AS (SELECT * FROM json_to_recordset($1::json) AS r(ref bigint, {record}{extra})"  # noqa: S608
        f"{where})",
        f"written AS (INSERT INTO {quote(table_name)} ({_quoted(dialect, columns)}) "  # noqa: S608
        f"SELECT {picked} FROM given AS r ON CONFLICT ({quote(key)}) DO NOTHING "
        f"RETURNING id, {quote(key)})",
        f"{PARENTS} AS (SELECT given.ref, written.id FROM given "  # noqa: S608
        f"JOIN written ON written.{quote(key)} = given.{quote(key)})",
    ]
    for i, (child, child_columns) in enumerate(children):
        returning = then.returning if then is not None and i == 0 else ()
        plan = _plan(dialect, child, child_columns, None, returning, 0, i + 2, ref)
        plans.append(plan)
        ctes.append(f"w{i} AS ({plan.sql})")
    if then is not None:
        ctes.append(f"fan_out AS ({then.sql})")
    return f"WITH {', '.join(ctes)} SELECT ref, id FROM {PARENTS}", tuple(plans)  # noqa: S608


async def insert_family(
    runner: Runner,
    parents: tuple[Table, Sequence[dict[str, Any]], Sequence[int]],
    key: str,
    children: Sequence[tuple[Table, Sequence[dict[str, Any]]]],
    ref: str,
    then: FanOut | None = None,
    only: Only | None = None,
) -> dict[int, int]:
    """PostgreSQL, one statement: insert the parent rows whose `key` is new (ON CONFLICT DO
    NOTHING) and the children of those only. `parents` holds the table, its rows and a
    placeholder for each row (a number no real id has, such as a negative one); a child
    names its parent by that placeholder in its `ref` column, written as the parent's id.
    Children of a parent that was not written are not written either. Returns the id of
    each parent written, by placeholder.

    `then` runs in the statement after the first child's rows are written (see FanOut);
    `only`, when given, is a further condition a parent row must meet to be written.
    """
    if runner.dialect.name != "postgresql":
        raise ValueError("insert_family needs PostgreSQL")
    table, rows, refs = parents
    if not rows:
        return {}
    if then is not None and not (children and children[0][1]):
        then = None  # nothing written for it to read
    children = [(child, child_rows) for child, child_rows in children if child_rows]
    shape = tuple((child.name, tuple(child_rows[0])) for child, child_rows in children)
    extra = {name for name, _ in only.extra} if only else set()
    columns = tuple(name for name in rows[0] if name not in extra)
    sql, plans = _family(runner.dialect, (table.name, columns), key, shape, ref, then, only)
    given = [{"ref": number} | row for number, row in zip(refs, rows, strict=True)]
    documents = [
        _document(plan, docs)
        for plan, docs in zip(plans, [given, *(r for _, r in children)], strict=True)
    ]
    return dict(await runner.rows_sql(sql, documents))
