#!/usr/bin/env python
"""CSV import and export at a million rows, and email-prefix search over what was imported.

    python bench/import_export.py [--rows 1000000] [--backends postgresql,sqlite] [--json FILE]

Generates a CSV file of --rows new addresses (email, name, language and one custom column),
then for each backend: a fresh migrated database (PostgreSQL: CREATE DATABASE bench_<random>,
dropped after; SQLite: a new file), an `active` import of the file, an export of the
newsletter's active subscribers, and 200 email-prefix searches (limit 50) through
service.subscribers.search_subscribers. Each step runs in a child process of its own, so its
peak memory (ru_maxrss) is its own; each prints one JSON line the parent collects.

Targets: import >= 50,000 rows/s (PostgreSQL), export >= 100,000 rows/s, < 300 MB peak for
both, search p99 < 10 ms. On PostgreSQL it first times the same three INSERTs done by the
server alone (INSERT ... SELECT from generate_series into another fresh database): the ceiling
no client can pass on the machine.

Import and export also print their CPU per row: the step's own process (all its threads;
on SQLite that includes SQLite's work) and the PostgreSQL backends serving it, read from
/proc before the pool is closed. On a 2-core machine shared with other people's work, rows/s
moves with the load; CPU per row is what to compare between two versions of the code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import procstat
from sqlalchemy import func, select, text

from service import csv_export, csv_import
from service.db import Database
from service.models import Subscriber
from service.subscribers import search_subscribers

FIRST = [
    "ada",
    "alan",
    "grace",
    "linus",
    "ken",
    "barbara",
    "edsger",
    "donald",
    "frances",
    "john",
    "margaret",
    "dennis",
    "radia",
    "tim",
    "vint",
    "hedy",
    "katherine",
    "niklaus",
]
LAST = [
    "lovelace",
    "turing",
    "hopper",
    "torvalds",
    "thompson",
    "liskov",
    "dijkstra",
    "knuth",
    "allen",
    "backus",
    "hamilton",
    "ritchie",
    "perlman",
    "berners-lee",
    "cerf",
    "lamarr",
]
DOMAINS = [f"example{i}.com" for i in range(40)] + ["mail.example.org", "post.example.net"]
SEARCHES = 200
TARGETS = {"import_pg": 50_000, "export": 100_000, "peak_mb": 300, "search_p99_ms": 10}


def generate(path: Path, rows: int, seed: int = 1) -> None:
    """A CSV of `rows` distinct addresses, written as an ops team would export it."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("email,name,language,company\r\n")
        lines = []
        for i in range(rows):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            lines.append(
                f"{first}.{last}{i}@{rng.choice(DOMAINS)},{first.title()} {last.title()},"
                f"{rng.choice(('en', 'de', 'uk', ''))},{'ACME' if i % 3 == 0 else ''}\r\n"
            )
            if len(lines) == 10_000:
                out.writelines(lines)
                lines.clear()
        out.writelines(lines)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def own_cpu() -> float:
    """CPU seconds this process (all its threads) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def backends_cpu(db: Database) -> float:
    """CPU seconds used so far by the PostgreSQL backends serving this database (0 on SQLite).

    The pool keeps its connections until dispose(), so every backend that did the step's
    work is still alive here; on a 2-core machine shared with others, CPU per row says more
    than rows/s.
    """
    if db.is_sqlite:
        return 0.0
    async with db.transaction() as session:
        pids = list(
            await session.scalars(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            )
        )
    return sum(procstat.process_cpu(pid) or 0.0 for pid in pids)


def cpu_per_row(client: float, server: float, rows: int) -> dict[str, float]:
    return {
        "client_cpu_us_per_row": client * 1e6 / max(rows, 1),
        "db_cpu_us_per_row": server * 1e6 / max(rows, 1),
    }


# ---------------------------------------------------------------- the child steps


async def child_import(url: str, workdir: Path, csv_path: Path) -> dict[str, Any]:
    settings = harness.settings_for(url, workdir)
    db = Database(settings)
    try:
        async with db.transaction() as session:
            job = await csv_import.create_import(
                session,
                newsletter_slug=harness.NEWSLETTER,
                status="active",
                consent_note="benchmark",
                path=csv_path,
                filename=csv_path.name,
                actor="bench",
            )
        server_before = await backends_cpu(db)
        client_before = own_cpu()
        started = time.perf_counter()
        done = await csv_import.run_import(db, settings, job.id)
        seconds = time.perf_counter() - started
        client = own_cpu() - client_before
        server = await backends_cpu(db) - server_before
    finally:
        await db.dispose()
    return {
        "status": done.status,
        "rows": done.rows_total,
        "imported": done.rows_imported,
        "rejected": done.rows_rejected,
        "skipped": done.rows_skipped,
        "seconds": seconds,
        "rows_per_s": done.rows_total / seconds,
        "peak_mb": peak_mb(),
        **cpu_per_row(client, server, done.rows_total),
    }


async def child_export(url: str, workdir: Path) -> dict[str, Any]:
    settings = harness.settings_for(url, workdir)
    db = Database(settings)
    lines = size = 0
    try:
        server_before = await backends_cpu(db)
        client_before = own_cpu()
        started = time.perf_counter()
        export = await csv_export.prepare_export(
            db, settings, harness.NEWSLETTER, "active", "bench"
        )
        with (workdir / "export.csv").open("wb") as out:
            async for chunk in export.chunks():
                out.write(chunk)
                lines += chunk.count(b"\r\n")
                size += len(chunk)
        seconds = time.perf_counter() - started
        client = own_cpu() - client_before
        server = await backends_cpu(db) - server_before
    finally:
        await db.dispose()
    rows = lines - 1  # the header
    return {
        "rows": rows,
        "bytes": size,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_mb": peak_mb(),
        **cpu_per_row(client, server, rows),
    }


async def child_search(url: str, workdir: Path) -> dict[str, Any]:
    settings = harness.settings_for(url, workdir)
    db = Database(settings)
    rng = random.Random(2)
    timings: list[float] = []
    found = 0
    try:
        async with db.transaction() as session:
            total = int(await session.scalar(select(func.count()).select_from(Subscriber)) or 0)
            ids = [rng.randint(1, total) for _ in range(SEARCHES)]
            keys = list(
                await session.scalars(select(Subscriber.email_key).where(Subscriber.id.in_(ids)))
            )
        # Prefixes as ops type them: the start of a real address, 2 to 12 characters.
        prefixes = [k[: rng.randint(2, 12)] for k in keys]
        for prefix in prefixes:
            started = time.perf_counter()
            async with db.transaction() as session:
                rows = await search_subscribers(session, email_prefix=prefix, limit=50)
            timings.append((time.perf_counter() - started) * 1000)
            found += len(rows)
    finally:
        await db.dispose()
    timings.sort()
    return {
        "subscribers": total,
        "searches": len(timings),
        "results": found,
        "p50_ms": timings[len(timings) // 2],
        "p99_ms": timings[int(len(timings) * 0.99) - 1],
        "max_ms": timings[-1],
    }


# The three inserts of an active import, done by the server alone from generate_series: what
# PostgreSQL itself spends on the rows (heap, the 10 indexes, the two foreign-key checks), with
# no client work at all. No import through any client can be faster than this. The addresses
# are drawn like generate()'s (first.last<n>@one of DOMAINS, in random order), so that each
# new key lands anywhere in the address indexes, as the file's do: numbered keys in order
# would all land on the last pages (31,800 rows/s here at 25.6 µs a row, against ~26,000).
FLOOR_SQL = [
    f"""INSERT INTO subscribers (public_id, email, email_key, name, language, attributes,
                                created_at, updated_at)
       SELECT md5(g::text), e, e, 'Ada Lovelace', 'en', '{{}}', now(), now()
       FROM (SELECT g, (ARRAY{FIRST!r})[1 + floor(random() * {len(FIRST)})::int] || '.'
                       || (ARRAY{LAST!r})[1 + floor(random() * {len(LAST)})::int] || g || '@'
                       || (ARRAY{DOMAINS!r})[1 + floor(random() * {len(DOMAINS)})::int] AS e
             FROM generate_series(1, :rows) AS g) AS rows""",
    """INSERT INTO subscriptions (subscriber_id, newsletter_id, status, created_at, updated_at,
                                  confirmed_at, consent_source, consent_user_agent, consent_page,
                                  consent_at)
       SELECT id, (SELECT id FROM newsletters LIMIT 1), 'active', now(), now(), now(), 'import',
              'import #1', 'benchmark', now()
       FROM subscribers""",
    """INSERT INTO events (type, subscriber_id, newsletter_id, actor, ip, data, created_at)
       SELECT 'subscription.confirmed', subscriber_id, newsletter_id, 'bench', NULL,
              '{"source": "import", "import_id": 1}', now()
       FROM subscriptions""",
]


async def child_floor(url: str, workdir: Path, rows: int) -> dict[str, Any]:
    db = Database(harness.settings_for(url, workdir))
    try:
        server_before = await backends_cpu(db)
        started = time.perf_counter()
        async with db.transaction() as session:
            for statement in FLOOR_SQL:
                await session.execute(text(statement), {"rows": rows})
        seconds = time.perf_counter() - started
        server = await backends_cpu(db) - server_before
    finally:
        await db.dispose()
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        **cpu_per_row(0.0, server, rows),
    }


CHILDREN = {"import": child_import, "export": child_export, "search": child_search}


def run_child(step: str, url: str, workdir: Path, csv_path: Path, rows: int = 0) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            step,
            "--url",
            url,
            "--workdir",
            str(workdir),
            "--csv",
            str(csv_path),
            "--rows",
            str(rows),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backends", default="postgresql,sqlite")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--child", choices=[*CHILDREN, "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "floor":
            coro: Any = child_floor(args.url, args.workdir, args.rows)
        elif args.child == "import":
            coro = child_import(args.url, args.workdir, args.csv)
        else:
            coro = CHILDREN[args.child](args.url, args.workdir)
        print(json.dumps(asyncio.run(coro)))
        return

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    info = harness.machine(need_postgresql="postgresql" in backends)
    print("Machine:")
    harness.print_machine(info)
    results: dict[str, Any] = {"machine": info, "rows": args.rows, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="bench-csv-") as tmp:
        workdir = Path(tmp)
        csv_path = workdir / "subscribers.csv"
        started = time.perf_counter()
        generate(csv_path, args.rows)
        print(
            f"\nGenerated {args.rows:,} rows ({csv_path.stat().st_size / 2**20:.0f} MiB)"
            f" in {time.perf_counter() - started:.1f} s"
        )
        for backend in backends:
            print(f"\n{backend}:")
            if backend == "postgresql":
                with harness.fresh_database(backend, workdir) as url:
                    floor = run_child("floor", url, workdir, csv_path, args.rows)
                print(
                    f"  server  {floor['rows']:>9,} rows in {floor['seconds']:6.1f} s"
                    f"  {floor['rows_per_s']:>9,.0f} rows/s"
                    f"  CPU/row {floor['db_cpu_us_per_row']:.1f} us db"
                    "  (the same three INSERTs from"
                    " generate_series, no client: the ceiling)"
                )
                results.setdefault("server_floor", {})[backend] = floor
            with harness.fresh_database(backend, workdir) as url:
                imported = run_child("import", url, workdir, csv_path)
                print(
                    f"  import  {imported['rows']:>9,} rows in {imported['seconds']:6.1f} s"
                    f"  {imported['rows_per_s']:>9,.0f} rows/s  peak {imported['peak_mb']:.0f} MB"
                    f"  CPU/row {imported['client_cpu_us_per_row']:.1f} us client,"
                    f" {imported['db_cpu_us_per_row']:.1f} us db"
                    f"  ({imported['imported']:,} imported, {imported['status']})"
                )
                exported = run_child("export", url, workdir, csv_path)
                print(
                    f"  export  {exported['rows']:>9,} rows in {exported['seconds']:6.1f} s"
                    f"  {exported['rows_per_s']:>9,.0f} rows/s  peak {exported['peak_mb']:.0f} MB"
                    f"  CPU/row {exported['client_cpu_us_per_row']:.1f} us client,"
                    f" {exported['db_cpu_us_per_row']:.1f} us db"
                    f"  ({exported['bytes'] / 2**20:.0f} MiB)"
                )
                searched = run_child("search", url, workdir, csv_path)
                print(
                    f"  search  {searched['searches']} prefixes over"
                    f" {searched['subscribers']:,} subscribers: p50 {searched['p50_ms']:.2f} ms,"
                    f" p99 {searched['p99_ms']:.2f} ms, max {searched['max_ms']:.2f} ms"
                )
                results["backends"][backend] = {
                    "import": imported,
                    "export": exported,
                    "search": searched,
                }
    print(
        "\nTargets: import >= 50,000 rows/s (PostgreSQL), export >= 100,000 rows/s,"
        " peak < 300 MB, search p99 < 10 ms"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
