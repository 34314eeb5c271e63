#!/usr/bin/env python
"""Confirmation mail throughput: N sign-ups queued, one DeliveryWorker, an SMTP sink.

    python bench/delivery.py [--count 10000] [--backends sqlite,postgresql]

For each backend: a fresh migrated database with the double opt-in newsletter `bench`;
--count sign-ups through the domain function service.signup.subscribe_many (the batch form of
service.subscriptions.subscribe, --per-transaction at a time, so queueing is quick), each
queueing one confirmation mail; an SMTP server in its own process (bench/smtp_sink.py) that
counts and discards; then one DeliveryWorker, as `newsletter worker` runs it, calling
run_once() until nothing is due. Prints msgs/s and the
total seconds, and checks that the sink received every message and the outbox marked it sent.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
from sqlalchemy import text

from service.db import Database
from service.mail.worker import DeliveryWorker
from service.signup import Consent, subscribe_many
from service.signup_input import SignupInput, parse_signup

TARGET_SECONDS = 10.0  # for 10,000 confirmation mails, one worker


@dataclass
class DeliveryResult:
    backend: str
    count: int
    queue_seconds: float
    deliver_seconds: float
    worker_cpu_seconds: float  # CPU of the worker's process while delivering
    claimed: int
    received: int
    outbox: dict[str, int]
    load_after: str  # load average when done: others share this machine

    @property
    def per_second(self) -> float:
        return self.claimed / self.deliver_seconds if self.deliver_seconds else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        return 1000 * self.worker_cpu_seconds / self.claimed if self.claimed else 0.0


def run(coro: Callable[[], Awaitable[Any]], loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro())
    return asyncio.run(coro())


def queue_signups(url: str, workdir: Path, args: argparse.Namespace) -> float:
    """Sign up --count new addresses; return the seconds it took."""
    settings = harness.settings_for(url, workdir)
    consent = Consent(source="api", ip="127.0.0.1", user_agent="bench/delivery.py")
    tag = secrets.token_hex(3)

    def signup(i: int) -> tuple[SignupInput, Consent]:
        fields = {"email": f"d{i}-{tag}@example.com", "newsletters": [harness.NEWSLETTER]}
        return parse_signup(fields, settings), consent

    async def main() -> None:
        db = Database(settings)
        try:
            for start in range(0, args.count, args.per_transaction):
                end = min(args.count, start + args.per_transaction)
                async with db.transaction() as session:
                    outcomes = await subscribe_many(
                        session, settings, [signup(i) for i in range(start, end)]
                    )
                refused = [o for o in outcomes if isinstance(o, Exception)]
                if refused:
                    raise RuntimeError(f"sign-ups refused: {refused[:3]}")
        finally:
            await db.dispose()

    started = time.perf_counter()
    run(main, "asyncio")
    return time.perf_counter() - started


def deliver_all(
    url: str, workdir: Path, mail_url: str, args: argparse.Namespace
) -> tuple[float, float, int]:
    """One worker until nothing is due; return (seconds, CPU seconds, messages claimed)."""
    settings = harness.settings_for(
        url,
        workdir,
        mail_url=mail_url,
        mail_from="news@example.org",
        base_url="https://news.example.org",
        worker_batch_size=args.batch_size,
    )

    async def main() -> tuple[float, float, int]:
        db = Database(settings)
        try:
            async with db.transaction() as session:  # connect before the clock starts
                await session.execute(text("SELECT 1"))
            worker = DeliveryWorker(db, settings)
            claimed = 0
            # CPU time, not wall time: on a shared machine a wall clock charges others' work here.
            profiler = cProfile.Profile(time.process_time) if args.profile else None
            started, cpu_started = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            while batch := await worker.run_once():
                claimed += batch
            if profiler:
                profiler.disable()
                profiler.dump_stats(f"{args.profile}.{url.partition(':')[0]}")
            return time.perf_counter() - started, time.process_time() - cpu_started, claimed
        finally:
            await db.dispose()

    result: tuple[float, float, int] = run(main, args.loop)
    return result


def bench_backend(backend: str, args: argparse.Namespace) -> DeliveryResult:
    print(f"\n== {backend}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp,
        harness.fresh_database(backend, Path(tmp)) as url,
    ):
        workdir = Path(tmp)
        queue_seconds = queue_signups(url, workdir, args)
        queued = harness.count_rows(url, workdir).outbox.get("queued", 0)
        print(f"  queued {queued} confirmation mails in {queue_seconds:.1f} s")
        sink = harness.SinkProcess()
        try:
            seconds, cpu_seconds, claimed = deliver_all(url, workdir, sink.url, args)
        finally:
            received = sink.stop()
        outbox = harness.count_rows(url, workdir).outbox
    result = DeliveryResult(
        backend,
        args.count,
        queue_seconds,
        seconds,
        cpu_seconds,
        claimed,
        received,
        outbox,
        harness.load_average(),
    )
    print(
        f"  delivered {claimed} in {seconds:.2f} s: {result.per_second:.0f} msgs/s, worker CPU "
        f"{result.cpu_ms_per_message:.2f} ms/msg; "
        f"sink received {received}; outbox {outbox}; load average {result.load_after}"
    )
    return result


def report(results: list[DeliveryResult]) -> None:
    header = ("backend", "mails", "seconds", "msgs/s", "CPU ms/msg", "received", "sent", "target")
    print("\n{:<11} {:>7} {:>8} {:>8} {:>10} {:>9} {:>7}  {}".format(*header))
    for r in results:
        complete = r.received == r.count and r.outbox.get("sent") == r.count
        # The target is for 10,000 mails; scale it when --count differs.
        limit = TARGET_SECONDS * r.count / 10_000
        met = complete and r.deliver_seconds < limit
        print(
            f"{r.backend:<11} {r.count:>7} {r.deliver_seconds:>8.2f} {r.per_second:>8.0f} "
            f"{r.cpu_ms_per_message:>10.2f} {r.received:>9} {r.outbox.get('sent', 0):>7}  "
            f"< {limit:g} s: {'met' if met else 'NOT met'}"
            + ("" if complete else " (INCOMPLETE: not every message was delivered)")
        )


def save(results: list[DeliveryResult], args: argparse.Namespace, info: dict[str, str]) -> Path:
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = Path(args.json or harness.RESULTS_DIR / f"delivery-{stamp}.json")
    document = {
        "benchmark": "delivery",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": info,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [
            {
                **asdict(r),
                "msgs_per_second": r.per_second,
                "cpu_ms_per_message": r.cpu_ms_per_message,
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="Confirmation mails.")
    parser.add_argument(
        "--backends", default=",".join(harness.DB_BACKENDS), help="Comma-separated."
    )
    parser.add_argument(
        "--batch-size", type=int, default=100, help="NEWSLETTER_WORKER_BATCH_SIZE (default 100)."
    )
    parser.add_argument(
        "--per-transaction", type=int, default=500, help="Sign-ups per queueing transaction."
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="asyncio: as `newsletter worker`; uvloop: as the worker inside `newsletter serve`.",
    )
    parser.add_argument("--json", type=Path, help="Where to write the results.")
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="Write a cProfile of the worker to PATH.<dialect> (slows it; for finding hot spots).",
    )
    args = parser.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(harness.DB_BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_args()
    info = harness.machine(need_postgresql="postgresql" in args.backends)
    print("Machine:")
    harness.print_machine(info)
    print(
        f"One DeliveryWorker ({args.loop} loop, batch size {args.batch_size}) sending to an "
        "SMTP sink in its own process on loopback; both share the cores."
    )
    results = [bench_backend(backend, args) for backend in args.backends]
    report(results)
    print(f"\nResults written to {save(results, args, info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
