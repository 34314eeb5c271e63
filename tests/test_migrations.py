"""Alembic is the only way the schema changes: the migrations must build the models exactly,
and every one of them must downgrade."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service import migrate
from service.db import async_url
from service.models import Base
from tests.conftest import BACKENDS, fresh_pg_database


@pytest.fixture(params=BACKENDS)
async def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own, with no schema yet: not the session's shared one."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    async with fresh_pg_database("newsletter_migrations") as url:
        yield url


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _inspect(url: str) -> tuple[list[Any], set[str]]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(_differences)
            tables = await connection.run_sync(_tables)
    finally:
        await engine.dispose()
    return differences, tables


async def _current(url: str) -> str | None:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            found = await connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            return found.scalar()
    finally:
        await engine.dispose()


async def test_migrations_build_exactly_the_models(empty_database: str) -> None:
    await asyncio.to_thread(migrate.upgrade, empty_database)

    differences, tables = await _inspect(empty_database)
    assert differences == []
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert await _current(empty_database) == migrate.head_revision()


async def test_every_migration_downgrades_and_upgrades_again(empty_database: str) -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config(empty_database))
    revisions = [r.revision for r in script.walk_revisions()]  # head first
    await asyncio.to_thread(migrate.upgrade, empty_database)

    # One step at a time, so a broken downgrade names its revision.
    for revision in revisions:
        assert await _current(empty_database) == revision
        await asyncio.to_thread(migrate.downgrade, empty_database, "-1")
    _, tables = await _inspect(empty_database)
    assert tables == {"alembic_version"}
    assert await _current(empty_database) is None

    await asyncio.to_thread(migrate.upgrade, empty_database)
    differences, tables = await _inspect(empty_database)
    assert differences == []
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert await _current(empty_database) == migrate.head_revision()
