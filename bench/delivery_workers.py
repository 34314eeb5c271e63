#!/usr/bin/env python
"""Confirmation mail with 1 and 3 worker processes, and the SMTP sink's own ceiling.

    python bench/delivery_workers.py [--count 10000] [--workers 1,3] [--blast-connections 3,12]

For each worker count W (PostgreSQL): a fresh migrated database with the double opt-in
newsletter `bench`; --count sign-ups queued through service.signup.subscribe_many (as
bench/delivery.py does), each one confirmation mail; bench/smtp_sink.py in its own process;
then W processes, each one DeliveryWorker on a plain asyncio loop as `newsletter worker`
runs it, with the service's settings (NEWSLETTER_WORKER_SMTP_CONNECTIONS: 8 SMTP connections
per worker by default, batch size 100). Each process connects, says it is ready and waits;
all are started at once and call run_once() until nothing is due; the clock runs from the
start signal until the last one is done. The sink must have received every message and the
outbox must hold them all sent.

The sink's ceiling: one process that does nothing but send a real, pre-rendered confirmation
mail (rendered once by the service's MailRenderer) --count times over N persistent
connections, with bare SMTP commands (EHLO once, then MAIL, RCPT, DATA per message; no TLS,
pipelined as the worker's client pipelines: each message's content in one write with the next
one's commands), to a fresh sink. If 3 workers come close to that rate,
the sink is what limits them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import delivery
import harness
import procstat
import scale
from sqlalchemy import select, text

from service.config import Settings
from service.db import Database
from service.mail.render import MailRenderer
from service.mail.worker import DeliveryWorker
from service.models import Newsletter, OutboxMessage

OURS = ("workers", "sink", "postgresql", "pg shared")  # what delivering costs, not others' work
CPU_NAMES = {"postgresql": "PostgreSQL", "pg shared": "PG shared"}
TARGET_RATIO = 2.5  # 3 workers' msgs/s over one worker's, up to the sink's own limit
SCRIPT = Path(__file__).resolve()


@dataclass
class WorkersResult:
    workers: int
    count: int
    seconds: float
    smtp_connections: int  # per worker, as the worker's settings had it
    claimed: list[int]  # per worker process
    worker_cpu_seconds: list[float]  # per worker process, while delivering
    cpu: dict[str, float]  # cores: workers, sink, postgresql, pg shared, machine, rest
    received: int
    outbox: dict[str, int]
    queue_seconds: float
    load_before: str
    load_after: str

    @property
    def per_second(self) -> float:
        return sum(self.claimed) / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        claimed = sum(self.claimed)
        return 1000 * sum(self.worker_cpu_seconds) / claimed if claimed else 0.0

    @property
    def complete(self) -> bool:
        return self.received == self.count and self.outbox.get("sent") == self.count


@dataclass
class BlastResult:
    connections: int
    count: int
    seconds: float
    client_cpu_seconds: float
    cpu: dict[str, float]  # cores: client, sink, machine, rest
    received: int
    message_bytes: int
    load_before: str
    load_after: str
    errors: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- child: one worker process


def worker_settings(url: str, workdir: Path, mail_url: str, batch_size: int) -> Settings:
    return harness.settings_for(
        url,
        workdir,
        mail_url=mail_url,
        mail_from="news@example.org",
        base_url="https://news.example.org",
        worker_batch_size=batch_size,
    )


def child_worker(url: str, mail_url: str, workdir: str, batch_size: int) -> None:
    """Connect, print `ready <smtp connections>`, wait for a line, deliver until nothing is
    due, print `done <claimed> <seconds> <cpu seconds>`, wait for a line, exit."""
    settings = worker_settings(url, Path(workdir), mail_url, batch_size)

    async def main() -> None:
        db = Database(settings)
        try:
            async with db.transaction() as session:  # connect before the clock starts
                await session.execute(text("SELECT 1"))
            worker = DeliveryWorker(db, settings)
            print(f"ready {settings.worker_smtp_connections}", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            claimed = 0
            started, cpu_started = time.perf_counter(), time.process_time()
            while batch := await worker.run_once():
                claimed += batch
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            print(f"done {claimed} {seconds:.4f} {cpu:.4f}", flush=True)
            # Connections stay open until the parent has read their PostgreSQL backends' CPU.
            await asyncio.to_thread(sys.stdin.readline)
        finally:
            await db.dispose()

    asyncio.run(main())  # a plain asyncio loop, as `newsletter worker`


# ---------------------------------------------------------------- child: the blaster


def smtp_data(message: bytes) -> bytes:
    """The DATA payload: CRLF line ends, dot-stuffed, with the terminating dot line."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


async def _reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the SMTP server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got = await _reply(reader)
    if got != code:
        raise RuntimeError(f"{what}: the SMTP server answered {got}, not {code}")


async def _blast(port: int, connections: int, count: int, data: bytes) -> tuple[float, float]:
    lanes = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _expect(reader, 220, "greeting")
        writer.write(b"EHLO blaster.localhost\r\n")
        await _expect(reader, 250, "EHLO")
        lanes.append((reader, writer))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    envelope = b"MAIL FROM:<news@example.org>\r\nRCPT TO:<reader@example.com>\r\nDATA\r\n"

    async def lane(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        # Pipelined as the worker sends when the server offers PIPELINING: a message's
        # content goes out with the next one's MAIL, RCPT and DATA, one write a message.
        if n:
            writer.write(envelope)
        for i in range(n):
            await _expect(reader, 250, "MAIL")
            await _expect(reader, 250, "RCPT")
            await _expect(reader, 354, "DATA")
            writer.write(data + envelope if i + 1 < n else data)
            await _expect(reader, 250, "end of data")
        writer.write(b"QUIT\r\n")
        await _expect(reader, 221, "QUIT")
        writer.close()

    shares = [
        count // connections + (1 if i < count % connections else 0) for i in range(connections)
    ]
    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane(r, w, n) for (r, w), n in zip(lanes, shares, strict=True)))
    return time.perf_counter() - started, time.process_time() - cpu_started


def child_blast(port: int, connections: int, count: int, message_path: str) -> None:
    data = smtp_data(Path(message_path).read_bytes())
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # the cheapest client we have: the sink should be what limits

        run = uvloop.run
    seconds, cpu = run(_blast(port, connections, count, data))
    print(f"done {count} {seconds:.4f} {cpu:.4f}", flush=True)


# ---------------------------------------------------------------- the parent


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=harness.PROJECT_ROOT,
    )


def _read(process: subprocess.Popen[str], word: str) -> list[str]:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith(word):
        process.kill()
        raise RuntimeError(
            f"child {process.pid} said {line!r}, not {word!r} (exit {process.poll()})"
        )
    return line.split()[1:]


def _go(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()


def render_sample(url: str, workdir: Path, mail_url: str, batch_size: int) -> bytes:
    """One queued confirmation mail rendered as the worker renders it: the blaster's message."""
    settings = worker_settings(url, workdir, mail_url, batch_size)

    async def render() -> bytes:
        db = Database(settings)
        try:
            async with db.transaction() as session:
                message = (await session.scalars(select(OutboxMessage).limit(1))).one()
                ids = (message.payload or {}).get("newsletters", [])
                newsletters = list(
                    await session.scalars(select(Newsletter).where(Newsletter.id.in_(ids)))
                )
        finally:
            await db.dispose()
        renderer = MailRenderer(settings)
        header_id = renderer.message_id(message.id, message.created_at.timestamp())
        mail = renderer.render(
            message.template, message.recipient or "", newsletters, message.payload or {}, header_id
        )
        return mail.data

    return asyncio.run(render())


def bench_workers(workers: int, args: argparse.Namespace, sample: list[bytes]) -> WorkersResult:
    print(f"\n== {workers} worker process{'es' if workers > 1 else ''}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp,
        harness.fresh_database("postgresql", Path(tmp)) as url,
    ):
        workdir = Path(tmp)
        queue_seconds = delivery.queue_signups(url, workdir, args)
        queued = harness.count_rows(url, workdir).outbox.get("queued", 0)
        print(f"  queued {queued} confirmation mails in {queue_seconds:.1f} s")
        sink = harness.SinkProcess()
        processes: list[subprocess.Popen[str]] = []
        try:
            if not sample:
                sample.append(render_sample(url, workdir, sink.url, args.batch_size))
            processes = [
                _spawn("_worker", url, sink.url, tmp, str(args.batch_size)) for _ in range(workers)
            ]
            lanes = {int(_read(p, "ready")[0]) for p in processes}
            load_before = harness.load_average()
            database = url.rsplit("/", 1)[1]
            watch = procstat.CpuWatch(
                {
                    "workers": lambda: [p.pid for p in processes],
                    "sink": lambda: [sink.process.pid],
                    "postgresql": lambda: procstat.postgres_pids(database)[0],
                    "pg shared": lambda: procstat.postgres_pids(database)[1],
                }
            )
            watch.start()
            started = time.perf_counter()
            _go(processes)
            done = [_read(p, "done") for p in processes]
            seconds = time.perf_counter() - started
            cpu = watch.stop()
            load_after = harness.load_average()
            _go(processes)  # now they may close their connections and exit
            for p in processes:
                p.wait(timeout=30)
        finally:
            for p in processes:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            received = sink.stop()
        outbox = harness.count_rows(url, workdir).outbox
    result = WorkersResult(
        workers=workers,
        count=args.count,
        seconds=seconds,
        smtp_connections=lanes.pop() if len(lanes) == 1 else -1,
        claimed=[int(d[0]) for d in done],
        worker_cpu_seconds=[float(d[2]) for d in done],
        cpu=cpu,
        received=received,
        outbox=outbox,
        queue_seconds=queue_seconds,
        load_before=load_before,
        load_after=load_after,
    )
    print(
        f"  delivered {sum(result.claimed)} in {seconds:.2f} s: {result.per_second:.0f} msgs/s "
        f"(per process {result.claimed}), worker CPU {result.cpu_ms_per_message:.2f} ms/msg; "
        f"sink received {received}; outbox {outbox}; load {load_before} -> {load_after}\n"
        f"  CPU {scale.cpu_line(cpu)}"
    )
    return result


def bench_blast(connections: int, args: argparse.Namespace, message: bytes) -> BlastResult:
    print(f"\n== the sink's ceiling: pre-rendered mail over {connections} connections")
    with tempfile.TemporaryDirectory(prefix="bench-blast-") as tmp:
        path = Path(tmp) / "message.eml"
        path.write_bytes(message)
        sink = harness.SinkProcess()
        process = None
        try:
            process = _spawn("_blast", str(sink.port), str(connections), str(args.count), str(path))
            _read(process, "ready")
            load_before = harness.load_average()
            client = process.pid
            watch = procstat.CpuWatch(
                {"client": lambda: [client], "sink": lambda: [sink.process.pid]}
            )
            watch.start()
            _go([process])
            count, seconds, client_cpu = _read(process, "done")
            cpu = watch.stop()
            load_after = harness.load_average()
            process.wait(timeout=30)
        finally:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            received = sink.stop()
    result = BlastResult(
        connections=connections,
        count=int(count),
        seconds=float(seconds),
        client_cpu_seconds=float(client_cpu),
        cpu=cpu,
        received=received,
        message_bytes=len(message),
        load_before=load_before,
        load_after=load_after,
    )
    print(
        f"  {result.count} messages of {len(message)} bytes in {result.seconds:.2f} s: "
        f"{result.per_second:.0f} msgs/s; sink received {received}; load "
        f"{load_before} -> {load_after}\n  CPU {scale.cpu_line(cpu)}"
    )
    return result


def report(workers: list[WorkersResult], blasts: list[BlastResult]) -> dict[str, object]:
    print(
        "\n{:<22} {:>7} {:>8} {:>8} {:>9}  {}".format(
            "run", "mails", "seconds", "msgs/s", "received", "load before -> after"
        )
    )
    rows: list[tuple[str, dict[str, float]]] = []
    for w in workers:
        label = f"{w.workers} worker{'s' if w.workers > 1 else ''} x {w.smtp_connections} conn."
        rows.append((label, w.cpu))
        print(
            f"{label:<22} {w.count:>7} {w.seconds:>8.2f} {w.per_second:>8.0f} {w.received:>9}  "
            f"{w.load_before} -> {w.load_after}" + ("" if w.complete else "  INCOMPLETE")
        )
    for b in blasts:
        label = f"sink ceiling, {b.connections} conn."
        rows.append((label, b.cpu))
        print(
            f"{label:<22} {b.count:>7} {b.seconds:>8.2f} {b.per_second:>8.0f} {b.received:>9}  "
            f"{b.load_before} -> {b.load_after}"
        )
    print("\nCPU while measured, in cores:")
    for label, cpu in rows:
        print(f"  {label:<22} {scale.cpu_line(cpu)}")
    print(
        "(workers: the worker processes; client: the blasting client; sink: bench/smtp_sink.py; "
        "PostgreSQL: the backends serving the benchmark's database; PG shared: its background "
        "processes; others: the rest of what kept the machine busy, mostly other people's work.)"
    )
    print("\nCPU per message, in ms (cores x seconds / mails):")
    for w in workers:
        per = {k: 1000 * v * w.seconds / w.count for k, v in w.cpu.items() if k in OURS}
        ours = sum(per.values())
        cores = os.cpu_count() or 1
        print(
            f"  {w.workers} worker{'s' if w.workers > 1 else ''}: "
            + ", ".join(f"{CPU_NAMES.get(k, k)} {v:.2f}" for k, v in per.items())
            + f"; together {ours:.2f} ms: {cores} cores to ourselves would carry at most "
            f"{1000 * cores / ours:.0f} msgs/s"
            + (
                f", one worker (one core at most) {1000 / per['workers']:.0f}"
                if w.workers == 1
                else ""
            )
        )
    one = next((w for w in workers if w.workers == 1), None)
    three = next((w for w in workers if w.workers == 3), None)
    summary: dict[str, object] = {}
    if one and three and one.per_second:
        ratio = three.per_second / one.per_second
        ceiling = max((b.per_second for b in blasts), default=0.0)
        needed = (
            min(TARGET_RATIO * one.per_second, ceiling)
            if ceiling
            else TARGET_RATIO * one.per_second
        )
        met = three.complete and one.complete and three.per_second >= needed
        summary = {
            "one_worker_msgs_per_second": one.per_second,
            "three_workers_msgs_per_second": three.per_second,
            "ratio": ratio,
            "sink_ceiling_msgs_per_second": ceiling,
            "needed_msgs_per_second": needed,
            "met": met,
        }
        limit = f"the sink's own limit ({ceiling:.0f} msgs/s measured)" if ceiling else "-"
        print(
            f"\n3 workers / 1 worker: {three.per_second:.0f} / {one.per_second:.0f} msgs/s = "
            f"{ratio:.2f}x; target >= {TARGET_RATIO:g}x up to {limit}, i.e. >= "
            f"{needed:.0f} msgs/s: {'met' if met else 'NOT met'}"
        )
        if ceiling:
            print(f"3 workers reached {three.per_second / ceiling:.0%} of the sink's ceiling.")
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="Confirmation mails a run.")
    parser.add_argument("--workers", default="1,3", help="Comma-separated worker process counts.")
    parser.add_argument(
        "--blast-connections",
        default="3,12",
        help="Connections of the sink-ceiling runs (12 = 3 workers x 4); empty for none.",
    )
    parser.add_argument(
        "--batch-size", type=int, default=100, help="NEWSLETTER_WORKER_BATCH_SIZE (default 100)."
    )
    parser.add_argument(
        "--per-transaction", type=int, default=500, help="Sign-ups per queueing transaction."
    )
    parser.add_argument("--json", type=Path, help="Where to write the results.")
    args = parser.parse_args()
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
        args.blast_connections = [int(c) for c in args.blast_connections.split(",") if c.strip()]
    except ValueError:
        parser.error("--workers and --blast-connections take numbers, e.g. 1,3")
    if not args.workers or min(args.workers) < 1 or min(args.blast_connections, default=1) < 1:
        parser.error("counts must be positive")
    return args


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        child_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_blast":
        child_blast(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return 0
    args = parse_args()
    info = harness.machine()
    print("Machine:")
    harness.print_machine(info)
    print(
        f"PostgreSQL; {args.count} confirmation mails a run; worker processes {args.workers}, "
        f"each a DeliveryWorker on a plain asyncio loop (batch size {args.batch_size}, SMTP "
        "connections per worker from NEWSLETTER_WORKER_SMTP_CONNECTIONS, default 8); "
        "bench/smtp_sink.py in its own process. All share the cores."
    )
    started = time.monotonic()
    sample: list[bytes] = []
    workers = [bench_workers(w, args, sample) for w in args.workers]
    blasts = [bench_blast(c, args, sample[0]) for c in args.blast_connections]
    summary = report(workers, blasts)
    print(f"\nTotal {time.monotonic() - started:.0f} s; load average now {harness.load_average()}")
    document = {
        "machine": info,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "summary": summary,
        "workers": [{**asdict(w), "msgs_per_second": w.per_second} for w in workers],
        "sink_ceiling": [{**asdict(b), "msgs_per_second": b.per_second} for b in blasts],
    }
    print(f"Results written to {scale.save('delivery_workers', document, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
