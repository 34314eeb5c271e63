"""What both benchmarks share: fresh databases, the SMTP sink process, the machine's description."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import func, select

from service import migrate
from service.config import Settings
from service.db import Database
from service.mail.outbox import status_counts
from service.models import Subscriber, Subscription
from service.newsletters import create_newsletter

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = PROJECT_ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
PG_ADMIN_URL = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
SECRET_KEY = "bench"  # signs links in mail nobody reads
NEWSLETTER = "bench"
DB_BACKENDS = ("sqlite", "postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        secret_keys=[SECRET_KEY],
        run_worker=False,
        **overrides,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- databases


async def _pg_admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _pg_fetch_one(query: str) -> dict[str, Any]:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        row = await conn.fetchrow(query)
    finally:
        await conn.close()
    return dict(row) if row is not None else {}


WAL_COUNTERS = ("wal_records", "wal_fpi", "wal_bytes", "wal_sync")


def pg_wal_counters() -> dict[str, int]:
    """PostgreSQL's cluster-wide WAL counters (pg_stat_wal, PostgreSQL 14+); empty when
    they cannot be read. Two readings around a run tell how many WAL flushes (each commit
    waits for one) and how many bytes its sign-ups cost."""
    try:
        row = asyncio.run(_pg_fetch_one(f"SELECT {', '.join(WAL_COUNTERS)} FROM pg_stat_wal"))
    except (OSError, asyncpg.PostgresError):
        return {}
    return {name: int(row[name]) for name in WAL_COUNTERS}


@contextlib.contextmanager
def fresh_database(backend: str, workdir: Path) -> Iterator[str]:
    """A new, migrated database holding the double opt-in newsletter `bench`; its URL.

    SQLite: a file in workdir. PostgreSQL: CREATE DATABASE bench_<random>, dropped on exit.
    """
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'bench.db'}"
        _prepare(url, workdir)
        yield url
        return
    if backend != "postgresql":
        raise ValueError(f"unknown database backend {backend!r}")
    name = f"bench_{secrets.token_hex(6)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        url = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
        _prepare(url, workdir)
        yield url
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _prepare(url: str, workdir: Path) -> None:
    migrate.upgrade(url)  # what `newsletter migrate` does

    async def create() -> None:
        db = Database(settings_for(url, workdir))
        try:
            async with db.transaction() as session:
                await create_newsletter(session, NEWSLETTER, "Bench", opt_in="double")
        finally:
            await db.dispose()

    asyncio.run(create())


@dataclass
class RowCounts:
    subscribers: int
    subscriptions: int
    outbox: dict[str, int]


def count_rows(url: str, workdir: Path) -> RowCounts:
    async def count() -> RowCounts:
        db = Database(settings_for(url, workdir))
        try:
            async with db.transaction() as session:
                subscribers = await session.scalar(select(func.count()).select_from(Subscriber))
                subscriptions = await session.scalar(select(func.count()).select_from(Subscription))
                outbox = await status_counts(session)
        finally:
            await db.dispose()
        return RowCounts(int(subscribers or 0), int(subscriptions or 0), outbox)

    return asyncio.run(count())


# ---------------------------------------------------------------- the SMTP sink


class SinkProcess:
    """bench/smtp_sink.py in a child process: accepts, counts and discards mail."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "smtp_sink.py"), "--port", str(self.port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != f"ready {self.port}":
            self.process.kill()
            raise RuntimeError(f"SMTP sink did not start: {line!r}")

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def stop(self) -> int:
        """Stop the sink; return how many messages it received."""
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        for line in out.splitlines():
            if line.startswith("received "):
                return int(line.split()[1])
        raise RuntimeError(f"SMTP sink gave no count: {out!r}")


# ---------------------------------------------------------------- the machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _postgresql_version() -> str:
    async def version() -> str:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    try:
        return asyncio.run(version())
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({exc})"


def _wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "not installed"
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].split(" Copyright")[0].strip()


def _code_version() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    changed = [path for path in changed if path.startswith(("service/", "migrations/"))]
    if not changed:
        return commit
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"{commit} + uncommitted changes to {shown}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine(need_postgresql: bool = True) -> dict[str, str]:
    import sqlite3

    import fastapi
    import sqlalchemy
    import uvicorn

    info = {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "ram": _ram(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "fastapi / uvicorn / sqlalchemy": (
            f"{fastapi.__version__} / {uvicorn.__version__} / {sqlalchemy.__version__}"
        ),
        "wrk": _wrk_version(),
        "code (git)": _code_version(),
    }
    if need_postgresql:
        info["postgresql"] = _postgresql_version()
    info["load average at start"] = load_average()
    return info


def print_machine(info: dict[str, str]) -> None:
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
