#!/usr/bin/env python
"""Sign-up latency with 10,000,000 subscribers already in the table, against an empty one.

    python bench/big_table.py [--rows 10000000] [--keep] [--rounds 2] [--duration 15]

1. Checks the free disk space where PostgreSQL keeps its data (skips, with a message, under
   --min-free-gb, 20 GB by default).
2. Creates `bench_big_<rows>`, migrated, with the double opt-in newsletter `bench`, and fills
   it with SQL alone: --batch rows at a time (1,000,000; one transaction each, so the WAL
   between checkpoints stays bounded) of `INSERT INTO subscribers ... SELECT ... FROM
   generate_series` (email_key `<8 hex>.pre<n>@example.com`, public_id md5(n), created_at
   now()) and the same for one `active` subscription each to `bench`. The secondary indexes,
   unique constraints and foreign keys of the two tables are dropped first and rebuilt after
   (from their own definitions, read from the catalogue: the same schema migrate made), which
   is far faster than growing them row by row; then VACUUM ANALYZE and a CHECKPOINT, so that
   neither autovacuum nor the write-back of the fill lands in a measured run. Prints how long
   each phase took.
3. Runs the sign-up benchmark of scale.py (uvicorn, --workers 1, wrk as signup.py) against a
   fresh empty database and against the filled one, --rounds times (3), alternating the order
   (empty, filled; filled, empty; ...), and prints both p99s and their ratio (target <= 1.2)
   from the median of the rounds, and from the better run of each.

Addresses come from bench/signup_spread.lua: a random hex prefix puts each new email_key on
a random page of the indexes, among the pre-filled keys, as real addresses would land;
signup.lua's addresses all sort together (`--script signup.lua` to compare).

The filled database is dropped at the end unless --keep; a kept one (its comment records that
the fill finished and how long it took) is reused by the next run instead of being refilled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import harness
import scale
import signup

TARGET_RATIO = 1.2  # p99 with the table filled / p99 with it empty
TABLES = ("subscribers", "subscriptions")
MARKER = "bench/big_table.py"


@dataclass
class Fill:
    rows: int
    seconds: float  # the whole fill, from the first drop to the checkpoint
    phases: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    filled_at: str = ""
    sizes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- disk and databases


def data_directory() -> str:
    async def show() -> str:
        conn = await asyncpg.connect(harness.PG_ADMIN_URL, timeout=10)
        try:
            return str(await conn.fetchval("SHOW data_directory"))
        finally:
            await conn.close()

    return asyncio.run(show())


def free_gb(path: str) -> tuple[float, str]:
    """Free space (as `df` reports it for an ordinary user) on the file system holding path.

    The data directory itself is PostgreSQL's (mode 0700): the nearest parent we can see
    lives on the same file system unless something is mounted in between.
    """
    probe = Path(path)
    while True:
        try:
            return shutil.disk_usage(probe).free / 1e9, str(probe)
        except OSError:
            if probe == probe.parent:
                raise
            probe = probe.parent


def database_url(name: str) -> str:
    return f"postgresql://{harness.PG_USER}@{harness.PG_HOST}:{harness.PG_PORT}/{name}"


async def _kept(name: str) -> dict[str, object] | bool | None:
    """The fill record of a kept database; None when there is none, False when unfinished."""
    conn = await asyncpg.connect(harness.PG_ADMIN_URL, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT shobj_description(oid, 'pg_database') AS comment FROM pg_database "
            "WHERE datname = $1",
            name,
        )
    finally:
        await conn.close()
    if row is None:
        return None
    try:
        record = json.loads(row["comment"] or "")
    except ValueError:
        return False
    return record if isinstance(record, dict) and record.get("by") == MARKER else False


def drop_database(name: str) -> None:
    asyncio.run(harness._pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def create_database(name: str, workdir: Path) -> str:
    asyncio.run(harness._pg_admin(f'CREATE DATABASE "{name}"'))
    url = database_url(name)
    harness._prepare(url, workdir)  # migrated to head, newsletter `bench`, as fresh_database
    return url


# ---------------------------------------------------------------- the fill


SUBSCRIBERS = """
INSERT INTO subscribers (id, public_id, email, email_key, attributes, created_at, updated_at,
                         soft_bounces)
SELECT n, h, e, e, '{}'::json, now(), now(), 0
FROM (SELECT n, md5(n::text) AS h, right(md5(n::text), 8) || '.pre' || n || '@example.com' AS e
      FROM generate_series($1::bigint, $2::bigint) AS n) AS s
"""
SUBSCRIPTIONS = """
INSERT INTO subscriptions (id, subscriber_id, newsletter_id, status, created_at, updated_at,
                           pending_at, confirmed_at, consent_source, consent_ip,
                           consent_user_agent, consent_at)
SELECT n, n, $3, 'active', now(), now(), now(), now(), 'form', '192.0.2.' || (n % 250 + 1),
       'Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0', now()
FROM generate_series($1::bigint, $2::bigint) AS n
"""
# Secondary indexes and constraints of the two tables, as the migrations made them.
CONSTRAINTS = """
SELECT conrelid::regclass::text AS tbl, conname AS name, contype::text AS kind,
       pg_get_constraintdef(oid) AS definition
FROM pg_constraint
WHERE conrelid IN ('subscribers'::regclass, 'subscriptions'::regclass) AND contype IN ('u', 'f')
ORDER BY contype, conname
"""
INDEXES = """
SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS definition
FROM pg_index i
WHERE indrelid IN ('subscribers'::regclass, 'subscriptions'::regclass) AND NOT indisprimary
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                  WHERE c.conindid = i.indexrelid AND c.contype IN ('u', 'p', 'x'))
ORDER BY 1
"""
SIZES = """
SELECT c.relname AS name, pg_size_pretty(pg_relation_size(c.oid)) AS size
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')
  AND (c.relname IN ('subscribers', 'subscriptions')
       OR c.oid IN (SELECT indexrelid FROM pg_index
                    WHERE indrelid IN ('subscribers'::regclass, 'subscriptions'::regclass)))
ORDER BY c.relkind DESC, c.relname
"""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _fill(url: str, rows: int, batch: int) -> Fill:
    conn = await asyncpg.connect(url, timeout=10, command_timeout=None)
    phases: dict[str, float] = {}
    started = time.perf_counter()

    def lap(phase: str, since: float) -> float:
        now = time.perf_counter()
        phases[phase] = round(now - since, 1)
        return now

    try:
        # Index builds sort in memory; a commit need not wait for its WAL flush (bench data:
        # a crash mid-fill leaves the database unmarked, and the next run refills it).
        await conn.execute("SET maintenance_work_mem = '512MB'")
        await conn.execute("SET synchronous_commit = off")
        if await conn.fetchval("SELECT count(*) FROM (SELECT 1 FROM subscribers LIMIT 1) s"):
            raise RuntimeError("the database to fill already holds subscribers")
        newsletter = await conn.fetchval("SELECT id FROM newsletters WHERE slug = $1", "bench")
        constraints = await conn.fetch(CONSTRAINTS)
        indexes = await conn.fetch(INDEXES)
        async with conn.transaction():
            for c in sorted(constraints, key=lambda c: c["kind"] != "f"):  # foreign keys first
                await conn.execute(f"ALTER TABLE {c['tbl']} DROP CONSTRAINT {_quote(c['name'])}")
            for index in indexes:
                await conn.execute(f"DROP INDEX {index['name']}")
        mark = time.perf_counter()
        for first in range(1, rows + 1, batch):
            last = min(rows, first + batch - 1)
            async with conn.transaction():
                await conn.execute(SUBSCRIBERS, first, last)
                await conn.execute(SUBSCRIPTIONS, first, last, newsletter)
            print(
                f"    {last:>11,} rows inserted, {time.perf_counter() - started:6.1f} s",
                flush=True,
            )
        mark = lap("insert", mark)
        for index in indexes:
            await conn.execute(index["definition"])
            print(f"    index {index['name']} built", flush=True)
        for c in sorted(constraints, key=lambda c: c["kind"] == "f"):  # foreign keys last
            await conn.execute(
                f"ALTER TABLE {c['tbl']} ADD CONSTRAINT {_quote(c['name'])} {c['definition']}"
            )
            print(f"    constraint {c['name']} added", flush=True)
        for name in TABLES:
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                f"(SELECT max(id) FROM {name}))"
            )
        mark = lap("indexes and constraints", mark)
        for name in TABLES:
            await conn.execute(f"VACUUM (ANALYZE) {name}")
        mark = lap("vacuum analyze", mark)
        await conn.execute("CHECKPOINT")
        lap("checkpoint", mark)
        sizes = {r["name"]: r["size"] for r in await conn.fetch(SIZES)}
    finally:
        await conn.close()
    return Fill(
        rows,
        round(time.perf_counter() - started, 1),
        phases,
        filled_at=datetime.now(UTC).isoformat(timespec="seconds"),
        sizes=sizes,
    )


async def _sizes(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {r["name"]: r["size"] for r in await conn.fetch(SIZES)}
    finally:
        await conn.close()


def fill(name: str, url: str, args: argparse.Namespace) -> Fill:
    print(f"  filling {name} with {args.rows:,} subscribers, {args.batch:,} a transaction")
    result = asyncio.run(_fill(url, args.rows, args.batch))
    record = {"by": MARKER, **asdict(result)}
    comment = json.dumps(record).replace("'", "''")
    asyncio.run(harness._pg_admin(f"COMMENT ON DATABASE \"{name}\" IS '{comment}'"))
    print(f"  filled in {result.seconds:.0f} s: {result.phases}")
    return result


def prepare_big(args: argparse.Namespace, workdir: Path) -> tuple[str, str, Fill] | None:
    """The filled database: a kept one if it is complete, else a new one. None: no room."""
    name = f"bench_big_{args.rows}"
    kept = asyncio.run(_kept(name))
    if isinstance(kept, dict) and kept.get("rows") == args.rows:
        url = database_url(name)
        known = {k: v for k, v in kept.items() if k in Fill.__dataclass_fields__}
        result = Fill(**{**known, "reused": True})  # type: ignore[arg-type]
        result.sizes = asyncio.run(_sizes(url))
        print(
            f"  reusing {name}, kept by an earlier --keep run: filled {result.filled_at} in "
            f"{result.seconds:.0f} s {result.phases}"
        )
        return name, url, result
    if kept is False:
        print(f"  {name} exists but its fill never finished: dropping it")
        drop_database(name)
    directory = data_directory()
    free, where = free_gb(directory)
    print(f"  free disk space for PostgreSQL ({directory}, seen at {where}): {free:.0f} GB")
    if free < args.min_free_gb:
        print(
            f"SKIPPED: {free:.1f} GB free, under --min-free-gb {args.min_free_gb:g}; the "
            f"filled tables, their indexes and the WAL of the fill need several GB."
        )
        return None
    url = create_database(name, workdir)
    try:
        return name, url, fill(name, url, args)
    except BaseException:
        if not args.keep:
            drop_database(name)
        raise


# ---------------------------------------------------------------- the report


def p99_summary(segments: list[scale.Segment]) -> dict[str, object]:
    """p99 with the table empty and filled: the median of the rounds (the verdict) and the
    better of them; one ratio per round shows how much the machine's other load moved it."""
    empty = [s for s in segments if s.label.startswith("empty")]
    big = [s for s in segments if s.label.startswith("filled")]
    median_empty = statistics.median(s.run.p99_ms for s in empty)
    median_big = statistics.median(s.run.p99_ms for s in big)
    best_empty = min(s.run.p99_ms for s in empty)
    best_big = min(s.run.p99_ms for s in big)
    rounds = [round(b.run.p99_ms / e.run.p99_ms, 2) for e, b in zip(empty, big, strict=True)]
    return {
        "p99_empty_median_ms": median_empty,
        "p99_filled_median_ms": median_big,
        "ratio_median": round(median_big / median_empty, 2),
        "p99_empty_best_ms": best_empty,
        "p99_filled_best_ms": best_big,
        "ratio_best": round(best_big / best_empty, 2),
        "ratio_per_round": rounds,
        "rps_empty_median": statistics.median(s.run.rps for s in empty),
        "rps_filled_median": statistics.median(s.run.rps for s in big),
        "met": median_big / median_empty <= TARGET_RATIO,
    }


def report(segments: list[scale.Segment], fill_result: Fill, args: argparse.Namespace) -> None:
    print(
        "\n{:<12} {:>12} {:>8} {:>8} {:>8} {:>8}  {}".format(
            "run", "rows before", "req/s", "p50 ms", "p99 ms", "non-2xx", "load before -> after"
        )
    )
    for s in segments:
        print(
            f"{s.label:<12} {s.rows_before:>12,} {s.run.rps:>8.0f} {s.run.p50_ms:>8.2f} "
            f"{s.run.p99_ms:>8.2f} {s.run.non2xx:>8}  {s.load_before} -> {s.load_after}"
        )
    print("\nCPU while measured, in cores:")
    for s in segments:
        print(f"  {s.label:<12} {scale.cpu_line(s.cpu)}")
    print(scale.CPU_LEGEND)
    print("\nCPU per sign-up, in ms (cores / req/s):")
    for s in segments:
        print(f"  {s.label:<12} {scale.per_request(s)}")
    print("\nRows written vs 2xx answers (probe + warm-up + measured):")
    print("\n".join(scale.row_check(segments, args.connections)))
    summary = p99_summary(segments)
    print(
        f"\nFill: {fill_result.rows:,} subscribers + {fill_result.rows:,} subscriptions "
        + (
            f"(reused; the fill had taken {fill_result.seconds:.0f} s)"
            if fill_result.reused
            else f"in {fill_result.seconds:.0f} s"
        )
        + f": {fill_result.phases}"
    )
    print(f"Sizes: {fill_result.sizes}")
    print(
        f"\nreq/s (median of {args.rounds}): empty {summary['rps_empty_median']:.0f}, filled "
        f"{summary['rps_filled_median']:.0f}"
    )
    print(
        f"p99 (median of {args.rounds}): empty {summary['p99_empty_median_ms']:.1f} ms, filled "
        f"{summary['p99_filled_median_ms']:.1f} ms: ratio {summary['ratio_median']:.2f}; target "
        f"<= {TARGET_RATIO:g}: {'met' if summary['met'] else 'NOT met'}"
    )
    print(
        f"p99 (the better run of each): empty {summary['p99_empty_best_ms']:.1f} ms, filled "
        f"{summary['p99_filled_best_ms']:.1f} ms: ratio {summary['ratio_best']:.2f}; "
        f"per round {summary['ratio_per_round']}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="Subscribers to pre-fill.")
    parser.add_argument("--batch", type=int, default=1_000_000, help="Rows a transaction.")
    parser.add_argument(
        "--keep", action="store_true", help="Keep the filled database (and reuse a kept one)."
    )
    parser.add_argument("--rounds", type=int, default=3, help="Empty/filled pairs measured.")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn --workers.")
    parser.add_argument(
        "--script",
        default="signup_spread.lua",
        help="wrk script in bench/: signup_spread.lua (spread addresses) or signup.lua.",
    )
    parser.add_argument(
        "--min-free-gb", type=float, default=20, help="Skip when less disk is free."
    )
    scale.add_load_options(parser)
    args = parser.parse_args()
    scale.check_load_options(parser, args)
    args.script = harness.BENCH_DIR / args.script
    if not args.script.is_file():
        parser.error(f"no wrk script {args.script}")
    if args.rows < 1 or args.batch < 1 or args.rounds < 1:
        parser.error("--rows, --batch and --rounds must be positive")
    return args


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print(signup.WRK_MISSING, file=sys.stderr)
        return 2
    info = harness.machine()
    print("Machine:")
    harness.print_machine(info)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-big-")))
        print(f"\n== the filled database ({args.rows:,} subscribers)")
        prepared = prepare_big(args, workdir)
        if prepared is None:
            scale.save("big_table", {"machine": info, "skipped": "disk space"}, args.json)
            return 0
        name, big_url, fill_result = prepared
        if not args.keep:
            stack.callback(print, f"  dropped {name}")
            stack.callback(drop_database, name)
        empty_url = stack.enter_context(harness.fresh_database("postgresql", workdir))
        print(
            f"\n== sign-ups: uvicorn --workers {args.workers}, wrk -t{args.threads} "
            f"-c{args.connections}, {args.warmup:g} s warm-up, {args.duration:g} s measured, "
            f"{args.script.name}; load average {harness.load_average()}"
        )
        segments: list[scale.Segment] = []
        for round_ in range(1, args.rounds + 1):
            order = [("empty", empty_url), ("filled", big_url)]
            for kind, url in order if round_ % 2 else reversed(order):
                segments.append(
                    scale.measure_signups(
                        url, workdir, args, args.workers, f"{kind} #{round_}", args.script
                    )
                )
        report(segments, fill_result, args)
    print(
        f"\nTotal {time.monotonic() - started:.0f} s; load average now {harness.load_average()}"
        + ("; kept " + name if args.keep else "")
    )
    document = {
        "machine": info,
        "options": {k: str(v) for k, v in vars(args).items() if k != "json"},
        "fill": asdict(fill_result),
        "summary": p99_summary(segments),
        "results": [scale.segment_json(s) for s in segments],
    }
    print(f"Results written to {scale.save('big_table', document, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
