"""SQLite's write-ahead log is checkpointed by a thread of the server's, not in a writer's
commit; what the log holds reaches the database file all the same."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

from sqlalchemy import func, insert, select, text

from service import migrate
from service.app import create_app
from service.config import Settings
from service.db import WAL_AUTOCHECKPOINT_PAGES, Database, WalCheckpointer
from service.models import Subscriber, table, utcnow


def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'wal.db'}",
        secret_keys=["test-secret-one"],
        run_worker=False,
    )


def rows_in_the_file_alone(path: Path, scratch: Path) -> int:
    """Subscribers in the database file without its log: what a checkpoint has copied."""
    copy = scratch / "copy.db"
    copy.unlink(missing_ok=True)
    shutil.copyfile(path, copy)  # no -wal file beside the copy: only the file's own pages
    with sqlite3.connect(copy) as conn:
        return int(conn.execute("SELECT count(*) FROM subscribers").fetchone()[0])


async def add_subscribers(db: Database, prefix: str, count: int) -> None:
    now = utcnow()
    rows = [
        {
            "public_id": f"{prefix}{i:028d}",
            "email": f"{prefix}{i}@example.com",
            "email_key": f"{prefix}{i}@example.com",
            "attributes": {},
            "created_at": now,
            "updated_at": now,
        }
        for i in range(count)
    ]
    async with db.transaction() as session:
        await session.execute(insert(table(Subscriber)), rows)


async def test_writers_leave_the_log_to_the_checkpointer(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    db = Database(settings)
    try:
        async with db.transaction() as session:
            pages = await session.scalar(text("PRAGMA wal_autocheckpoint"))
        assert pages == WAL_AUTOCHECKPOINT_PAGES
        await add_subscribers(db, "a", 300)
        path = tmp_path / "wal.db"
        assert rows_in_the_file_alone(path, tmp_path) == 0  # committed, still in the log

        checkpointer = db.wal_checkpointer()
        assert isinstance(checkpointer, WalCheckpointer)
        await asyncio.to_thread(checkpointer.checkpoint)
        assert rows_in_the_file_alone(path, tmp_path) == 300
        async with db.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(Subscriber)) == 300
    finally:
        await db.dispose()


async def test_the_server_checkpoints_while_it_runs(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    path = tmp_path / "wal.db"
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await add_subscribers(app.state.db, "b", 50)
        copied = 0
        for _ in range(100):  # checkpoints come every WAL_CHECKPOINT_INTERVAL (0.25 s)
            await asyncio.sleep(0.05)
            try:
                copied = rows_in_the_file_alone(path, tmp_path)
            except sqlite3.DatabaseError:  # copied while a checkpoint was writing the file
                continue
            if copied == 50:
                break
        assert copied == 50
        await add_subscribers(app.state.db, "c", 20)
    assert rows_in_the_file_alone(path, tmp_path) == 70


def test_postgresql_has_no_checkpointer(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path).model_copy(
        update={"database_url": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert Database(settings).wal_checkpointer() is None
