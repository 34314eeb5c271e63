#!/usr/bin/env python
"""What one hand-off to aiosqlite's thread costs: CPU (user, system) and waiting, per call.

    .venv/bin/python bench/aiosqlite_handoff.py [--calls 5000]

Each statement sent through aiosqlite is queued to the connection's own thread and its answer
is handed back to the event loop: two thread wake-ups, whatever the statement. This times
`SELECT 1` that way, against the same statement run in that thread as one hand-off for all
the calls (how the sign-up batch runs on SQLite, see service/db.py `run_on_driver`).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

import aiosqlite


def _usage() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _report(label: str, calls: int, wall: float, before: tuple[float, float]) -> None:
    user, system = (after - start for after, start in zip(_usage(), before, strict=True))
    print(
        f"{label:<34} per call: {1e6 * wall / calls:6.1f} µs wall, "
        f"{1e6 * user / calls:5.1f} µs user, {1e6 * system / calls:5.1f} µs system CPU"
    )


def _all_in_thread(conn: sqlite3.Connection, calls: int) -> None:
    for _ in range(calls):
        conn.execute("SELECT 1").fetchall()


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        async with aiosqlite.connect(Path(workdir) / "handoff.db") as conn:
            for _ in range(200):  # warm-up
                await conn.execute_fetchall("SELECT 1")
            before, started = _usage(), time.perf_counter()
            for _ in range(calls):
                await conn.execute_fetchall("SELECT 1")
            _report("one hand-off per statement", calls, time.perf_counter() - started, before)
            before, started = _usage(), time.perf_counter()
            # aiosqlite's queue to its thread, as SQLAlchemy's aiosqlite adapter uses it.
            await conn._execute(_all_in_thread, conn._conn, calls)
            _report("all statements in one hand-off", calls, time.perf_counter() - started, before)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    import uvloop

    uvloop.install()
    asyncio.run(main(parser.parse_args().calls))
