"""The sign-up batch timed in-process: how long each batch's transaction takes, and each
statement in it, with no HTTP server and no load generator beside it.

The app is driven over ASGI as in signup_instructions.py (a warm-up, then N sign-ups at
concurrency 16). Every batch (`SignupBatcher._process`) is timed, and every statement
the driver runs in it (BEGIN and COMMIT are in the batch's time only); CPU is the whole
process's (user + system, all threads) over the measured sign-ups.
A quieter figure than a wrk run for what a change to the batch does, since on a shared 2-core
machine the load generator and PostgreSQL compete with the server there.

    .venv/bin/python bench/signup_batch.py
    .venv/bin/python bench/signup_batch.py --backends postgresql --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
import signup_instructions

from service import driver
from service.app import create_app
from service.signup_batcher import SignupBatcher

WARMUP = 600


class Timings:
    """Wall time of each batch and of each statement, by the start of its SQL."""

    def __init__(self) -> None:
        self.batches: list[float] = []
        self.statements: dict[str, list[float]] = defaultdict(list)

    def install(self) -> None:
        process = SignupBatcher._process
        timings = self

        async def timed_batch(batcher: SignupBatcher, batch: list[Any], connection: Any) -> None:
            started = time.perf_counter()
            try:
                await process(batcher, batch, connection)
            finally:
                timings.batches.append(time.perf_counter() - started)

        SignupBatcher._process = timed_batch  # type: ignore[method-assign]
        for runner in (driver.AsyncpgRunner, driver.SqliteThreadRunner):
            self._time_statements(runner)

    def _time_statements(self, runner: type[driver._DriverRunner]) -> None:
        statements = self.statements
        for name in ("_fetch", "_executemany"):
            call = getattr(runner, name)

            async def timed(self: Any, sql: str, args: Sequence[Any], call: Any = call) -> Any:
                started = time.perf_counter()
                try:
                    return await call(self, sql, args)
                finally:
                    statements[" ".join(sql.split())[:60]].append(time.perf_counter() - started)

            setattr(runner, name, timed)

    def clear(self) -> None:
        self.batches.clear()
        self.statements.clear()


async def _measure(backend: str, url: str, workdir: Path, requests: int, timings: Timings) -> None:
    settings = harness.settings_for(url, workdir, signup_rate_limit=signup_instructions.RATE_LIMIT)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await signup_instructions._drive(app, 0, WARMUP)
        timings.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        await signup_instructions._drive(app, WARMUP, requests)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    batches = sorted(timings.batches)
    print(
        f"{backend}: {requests / wall:,.0f} sign-ups/s in-process, "
        f"{cpu / requests * 1e6:.0f} µs CPU per sign-up; {len(batches)} batches "
        f"({requests / len(batches):.1f} sign-ups each), batch wall median "
        f"{statistics.median(batches) * 1e3:.2f} ms, p90 "
        f"{batches[int(len(batches) * 0.9)] * 1e3:.2f} ms, "
        f"{sum(batches) / wall:.0%} of the time in a batch"
    )
    for sql, times in sorted(timings.statements.items(), key=lambda item: -sum(item[1])):
        if len(times) >= len(batches) // 10:
            print(f"    {len(times):6} x median {statistics.median(times) * 1e3:.2f} ms  {sql}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="Sign-ups measured.")
    parser.add_argument("--backends", default="postgresql,sqlite")
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    timings = Timings()
    timings.install()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    harness.print_machine(harness.machine(need_postgresql="postgresql" in backends))
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
            workdir = Path(tmp)
            with harness.fresh_database(backend, workdir) as url:
                asyncio.run(_measure(backend, url, workdir, args.requests, timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
