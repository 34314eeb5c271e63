#!/usr/bin/env python
"""Sign-ups/s with 1, 2 and 4 API processes on PostgreSQL: uvicorn --workers N, wrk as signup.py.

    python bench/scale.py [--processes 1,2,4] [--duration 15] [--connections 16]

For each N: a fresh migrated PostgreSQL database with the double opt-in newsletter `bench`,
`uvicorn service.app:create_app --factory --workers N` with signup.py's environment (delivery
worker off, the sign-up rate limit raised out of reach), one probe sign-up, a warm-up, then
the same wrk run as signup.py (bench/signup.lua, one new address a request). Prints req/s,
p50 and p99 per N, the CPU all uvicorn processes used, how busy the whole machine was, and
checks that every 2xx answer left a subscriber row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import harness
import procstat
import signup

APP = "service.app:create_app"


@dataclass
class Segment:
    """One server, one measured wrk run against it."""

    label: str
    workers: int
    run: signup.WrkRun
    warmup: signup.WrkRun
    # Cores used while measured: uvicorn (all its processes), wrk, postgresql (the backends
    # serving this database), pg shared (WAL writer, checkpointer, ...), machine (all busy
    # cores, anyone's work) and rest (machine minus the others: other people's work).
    cpu: dict[str, float]
    load_before: str
    load_after: str
    rows_before: int  # subscribers in the table when the server started
    new_subscribers: int
    new_subscriptions: int
    commits: int  # transactions committed in the database while the server ran

    @property
    def signups_per_commit(self) -> float:
        return self.new_subscribers / self.commits if self.commits else 0.0

    @property
    def expected(self) -> int:
        return 1 + self.warmup.ok + self.run.ok  # 1: the probe


COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


async def _fetch(url: str, query: str, *params: object) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval(query, *params) or 0)
    finally:
        await conn.close()


def highest_subscriber(url: str) -> tuple[int, int]:
    """(highest subscriber id, rows): a segment's new rows are those above that id."""
    top = asyncio.run(_fetch(url, "SELECT coalesce(max(id), 0) FROM subscribers"))
    rows = asyncio.run(_fetch(url, "SELECT count(*) FROM subscribers"))
    return top, rows


def measure_signups(
    url: str,
    workdir: Path,
    args: argparse.Namespace,
    workers: int,
    label: str,
    script: Path = signup.LUA_SCRIPT,
) -> Segment:
    """Start uvicorn --workers N on url, probe, warm up, measure; count the rows it wrote."""
    top, rows = highest_subscriber(url)
    commits_before = asyncio.run(_fetch(url, COMMITS))
    env = signup.server_env(url, workdir, None)
    env.update(args.server_env)
    load_before = harness.load_average()
    log_path = workdir / f"uvicorn-{label.replace(' ', '-')}.log"
    with signup.uvicorn_server(APP, env, log_path, workers) as server:
        if workers > 1:
            procstat.wait_for_children(server.pid, workers)
        signup.probe(server.base_url)
        warmup = signup.run_wrk(server.base_url, args, args.warmup, script)
        watch = cpu_watch(server.pid, url)
        wrk_before = _children_cpu()
        watch.start()
        run = signup.run_wrk(server.base_url, args, args.duration, script)
        cpu = watch.stop()
        cpu["wrk"] = round((_children_cpu() - wrk_before) / run.seconds, 3)
        if "rest" in cpu:
            cpu["rest"] = round(cpu["rest"] - cpu["wrk"], 3)
        if run.non2xx or warmup.non2xx:
            email = f"after-{time.time_ns()}@example.com"
            status, body = signup.post_signup(server.base_url, email)
            print(f"  non-2xx answers! One more sign-up now answers {status}: {body[:300]!r}")
    load_after = harness.load_average()
    time.sleep(1)  # the server's PostgreSQL backends report their counters as they exit
    commits = asyncio.run(_fetch(url, COMMITS)) - commits_before
    new_subscribers = asyncio.run(
        _fetch(url, "SELECT count(*) FROM subscribers WHERE id > $1", top)
    )
    new_subscriptions = asyncio.run(
        _fetch(url, "SELECT count(*) FROM subscriptions WHERE subscriber_id > $1", top)
    )
    segment = Segment(
        label,
        workers,
        run,
        warmup,
        cpu,
        load_before,
        load_after,
        rows,
        new_subscribers,
        new_subscriptions,
        commits,
    )
    print(
        f"  {label}: {run.requests} requests in {run.seconds:.1f} s: {run.rps:.0f} req/s, "
        f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, non-2xx {run.non2xx}; "
        f"CPU {cpu_line(cpu)}; load {load_before} -> {load_after}"
    )
    return segment


def _plural(workers: int) -> str:
    return f"{workers} process" + ("es" if workers > 1 else "")


def _children_cpu() -> float:
    """CPU of the finished children of this process (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_watch(server_pid: int, url: str, **more: Callable[[], list[int]]) -> procstat.CpuWatch:
    """Watch uvicorn (with its workers), any `more` groups, and PostgreSQL for this database."""
    database = url.rsplit("/", 1)[1]
    return procstat.CpuWatch(
        {
            "uvicorn": lambda: [server_pid, *procstat.descendants(server_pid)],
            **more,
            "postgresql": lambda: procstat.postgres_pids(database)[0],
            "pg shared": lambda: procstat.postgres_pids(database)[1],
        }
    )


OURS = ("uvicorn", "wrk", "postgresql", "pg shared")  # the benchmark's own work
CPU_NAMES = {"postgresql": "PostgreSQL", "pg shared": "PG shared", "rest": "others"}
CPU_LEGEND = (
    "(uvicorn: all its processes; PostgreSQL: the backends serving the benchmark's database; "
    "PG shared: its WAL writer, checkpointer, background writer and autovacuum; others: "
    "what the machine was busy with besides, mostly other people's work.)"
)


def cpu_line(cpu: dict[str, float]) -> str:
    """`uvicorn 0.75, wrk 0.30, ... of 1.98 busy`: where the cores went."""
    parts = [f"{CPU_NAMES.get(k, k)} {v:.2f}" for k, v in cpu.items() if k != "machine"]
    total = f" of {cpu['machine']:.2f} busy" if "machine" in cpu else ""
    return ", ".join(parts) + total


def per_request(segment: Segment) -> str:
    """CPU per sign-up of the server, wrk and PostgreSQL, and the rate the machine's cores
    could carry at that cost with nothing else running."""
    rps = segment.run.rps
    per = {k: 1000 * v / rps for k, v in segment.cpu.items() if k in OURS and rps}
    if not per:
        return "-"
    ours = sum(per.values())
    cores = os.cpu_count() or 1
    return (
        ", ".join(f"{CPU_NAMES.get(k, k)} {v:.2f}" for k, v in per.items())
        + f"; together {ours:.2f} ms: {cores} cores to ourselves would carry at most "
        f"{1000 * cores / ours:.0f}/s; {segment.signups_per_commit:.1f} sign-ups per "
        "PostgreSQL transaction"
    )


def row_check(segments: list[Segment], connections: int) -> list[str]:
    """Every 2xx answer must have left a subscriber with one subscription."""
    slack = 2 * connections  # answers in flight when each wrk run stopped
    lines = []
    for s in segments:
        diff = s.new_subscribers - s.expected
        ok = 0 <= diff <= slack and s.new_subscriptions == s.new_subscribers
        lines.append(
            f"  {s.label:<14} new subscribers {s.new_subscribers}, subscriptions "
            f"{s.new_subscriptions}, 2xx answers {s.expected}, difference {diff:+d} "
            f"({'ok' if ok else 'MISMATCH'}; at most {slack} in flight when wrk stopped)"
        )
    return lines


def segment_json(s: Segment) -> dict[str, object]:
    return {
        **asdict(s),
        "expected_subscribers": s.expected,
        "signups_per_commit": s.signups_per_commit,
    }


def save(name: str, document: Mapping[str, object], path: Path | None) -> Path:
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    target = Path(path or harness.RESULTS_DIR / f"{name}-{stamp}.json")
    document = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **document,
    }
    target.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return target


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The wrk and server options signup.py has, with its defaults."""
    parser.add_argument("--duration", type=float, default=15, help="Seconds measured.")
    parser.add_argument("--warmup", type=float, default=2, help="Seconds of warm-up.")
    parser.add_argument("--connections", type=int, default=16, help="Concurrent connections.")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads.")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Extra environment for the server, e.g. NEWSLETTER_SIGNUP_BATCH_CONSUMERS=2.",
    )
    parser.add_argument("--json", type=Path, help="Where to write the results.")


def check_load_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--processes", default="1,2,4", help="Comma-separated uvicorn --workers counts."
    )
    add_load_options(parser)
    args = parser.parse_args()
    check_load_options(parser, args)
    try:
        args.processes = [int(p) for p in args.processes.split(",") if p.strip()]
    except ValueError:
        parser.error("--processes takes numbers, e.g. 1,2,4")
    if not args.processes or min(args.processes) < 1:
        parser.error("--processes takes positive numbers")
    return args


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print(signup.WRK_MISSING, file=sys.stderr)
        return 2
    info = harness.machine()
    print("Machine:")
    harness.print_machine(info)
    print(
        f"PostgreSQL; uvicorn --workers N for N in {args.processes}; wrk -t{args.threads} "
        f"-c{args.connections}, {args.warmup:g} s warm-up, {args.duration:g} s measured, "
        f"{signup.LUA_SCRIPT.name}; delivery worker off; "
        f"NEWSLETTER_SIGNUP_RATE_LIMIT={signup.RATE_LIMIT} (out of reach)."
    )
    if args.server_env:
        print(f"  and: {' '.join(f'{k}={v}' for k, v in args.server_env.items())}")
    started = time.monotonic()
    segments = []
    for workers in args.processes:
        print(f"\n== {_plural(workers)}")
        with (
            tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp,
            harness.fresh_database("postgresql", Path(tmp)) as url,
        ):
            segments.append(measure_signups(url, Path(tmp), args, workers, _plural(workers)))
    base = segments[0].run.rps if segments and segments[0].workers == 1 else None
    print(
        "\n{:>9} {:>8} {:>8} {:>8} {:>8} {:>8}  {}".format(
            "processes", "req/s", "vs 1", "p50 ms", "p99 ms", "non-2xx", "load before -> after"
        )
    )
    for s in segments:
        ratio = f"{s.run.rps / base:.2f}x" if base else "-"
        print(
            f"{s.workers:>9} {s.run.rps:>8.0f} {ratio:>8} {s.run.p50_ms:>8.2f} "
            f"{s.run.p99_ms:>8.2f} {s.run.non2xx:>8}  {s.load_before} -> {s.load_after}"
        )
    print(f"\nCPU while measured, in cores (of {info['cpus (nproc)']}):")
    for s in segments:
        print(f"  {_plural(s.workers):<12} {cpu_line(s.cpu)}")
    print(CPU_LEGEND)
    print("\nCPU per sign-up, in ms (cores / req/s):")
    for s in segments:
        print(f"  {_plural(s.workers):<12} {per_request(s)}")
    print("\nRows written vs 2xx answers (probe + warm-up + measured):")
    print("\n".join(row_check(segments, args.connections)))
    print(f"\nTotal {time.monotonic() - started:.0f} s; load average now {harness.load_average()}")
    document = {
        "machine": info,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [segment_json(s) for s in segments],
    }
    print(f"Results written to {save('scale', document, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
