#!/usr/bin/env python
"""Sign-up throughput: uvicorn (one worker) on loopback, wrk posting new addresses.

    python bench/signup.py [--duration 15] [--connections 16] [--backends sqlite,postgresql,nodb]
                           [--rounds 3]

For each backend: a fresh migrated database with the double opt-in newsletter `bench`, the
service under `uvicorn service.app:create_app --factory` (one worker, no access log, log level
warning), a 2 s warm-up, then wrk for --duration seconds at --connections connections, each
request a new address (bench/signup.lua). `nodb` is bench/nodb_app.py: the same request
parsing and answer with no database, the framework's ceiling on this machine.

The delivery worker is off by default (NEWSLETTER_RUN_WORKER=false): this measures the API;
bench/delivery.py measures mail. --worker runs it inside the server against an SMTP sink.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import harness
from starlette.requests import ClientDisconnect

WRK_MISSING = """wrk is not installed. On Debian or Ubuntu:

    apt-get install -y wrk

elsewhere build it from https://github.com/wg/wrk (make; put `wrk` on PATH)."""
LUA_SCRIPT = harness.BENCH_DIR / "signup.lua"
BACKENDS = ("sqlite", "postgresql", "nodb")
# backend: (minimum share of the no-database endpoint's req/s, p99 ceiling in ms)
TARGETS = {"postgresql": (0.50, 25.0), "sqlite": (0.35, 50.0)}
# The per-client limit would refuse a load test from one address after a few dozen sign-ups.
# Two limits, like the default, raised out of reach: the limiter's work stays in the figures.
RATE_LIMIT = "1000000/minute;10000000/hour"


@dataclass
class WrkRun:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int

    @property
    def ok(self) -> int:
        return self.requests - self.non2xx


@dataclass
class BackendResult:
    backend: str
    run: WrkRun
    warmup: WrkRun
    server_cpu: float | None = None  # share of one core the uvicorn process used while measured
    load_after: str = ""  # load average after the measured run: others share this machine
    subscribers: int | None = None
    expected_subscribers: int | None = None
    outbox: dict[str, int] = field(default_factory=dict)
    wal: dict[str, int] = field(default_factory=dict)  # PostgreSQL: pg_stat_wal while measured

    @property
    def cpu_ms_per_request(self) -> float | None:
        if self.server_cpu is None or not self.run.rps:
            return None
        return 1000 * self.server_cpu / self.run.rps


# ---------------------------------------------------------------- the server


def _server_command(app: str, port: int, workers: int = 1) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    # uvicorn picks these by itself when installed; naming them makes the run reproducible.
    for option, module in (("--loop", "uvloop"), ("--http", "httptools")):
        with contextlib.suppress(ImportError):
            __import__(module)
            command += [option, module]
    return command


def _wait_ready(base_url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"uvicorn not ready after {timeout} s")


@dataclass
class Server:
    base_url: str
    pid: int

    def cpu_seconds(self) -> float | None:
        """User + system CPU the server process has used so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def uvicorn_server(
    app: str, env: dict[str, str], log_path: Path, workers: int = 1
) -> Iterator[Server]:
    """uvicorn on a free port; workers > 1 runs its supervisor over that many processes."""
    port = harness.free_port()
    command = _server_command(app, port, workers)
    print(f"  server: {shlex.join(command[1:])}")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, cwd=harness.PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base_url, process)
        yield Server(base_url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        report_server_log(log_path)


def report_server_log(log_path: Path) -> None:
    """Summarise what the server logged: wrk hanging up at the end of a run is expected.

    The whole log is kept in bench/results/ when it holds anything else.
    """
    lines = log_path.read_text(errors="replace").splitlines()
    hangups = sum(1 for line in lines if line == f"{ClientDisconnect.__module__}.ClientDisconnect")
    if hangups:
        print(
            f"  server log: {hangups} x ClientDisconnect tracebacks (wrk closing connections "
            "with requests in flight when a run ends)"
        )
    # Everything that is not part of one of those tracebacks.
    other = [
        line
        for line in lines
        if line.strip()
        and "ClientDisconnect" not in line
        and not line.startswith(("  ", "Traceback", "ERROR:    Exception in ASGI application"))
        and not line.startswith(("The above exception", "During handling", "+", "|"))
    ]
    if other:
        harness.RESULTS_DIR.mkdir(exist_ok=True)
        kept = harness.RESULTS_DIR / f"{log_path.stem}-{datetime.now(UTC):%Y%m%d-%H%M%S}.log"
        shutil.copyfile(log_path, kept)
        print(f"  server log: {len(other)} other lines, kept in {kept}; first ones:")
        for line in other[:10]:
            print(f"    {line[:300]}")


def server_env(database_url: str, workdir: Path, mail_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEYS=harness.SECRET_KEY,
        NEWSLETTER_DATA_DIR=str(workdir),
        NEWSLETTER_RUN_WORKER="true" if mail_url else "false",
        NEWSLETTER_SIGNUP_RATE_LIMIT=RATE_LIMIT,
    )
    if mail_url:
        env["NEWSLETTER_MAIL_URL"] = mail_url
    return env


def post_signup(base_url: str, email: str) -> tuple[int, bytes]:
    body = {"email": email, "newsletters": [harness.NEWSLETTER]}
    request = urllib.request.Request(
        f"{base_url}/v1/subscriptions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def probe(base_url: str) -> None:
    """One sign-up before the load: a wrong setup fails here, not as a column of non-2xx."""
    status, body = post_signup(base_url, "probe@example.com")
    if status != 202 or json.loads(body).get("status") != "pending":
        raise RuntimeError(f"probe sign-up answered {status}: {body[:300]!r}")


# ---------------------------------------------------------------- the load


def run_wrk(
    base_url: str, args: argparse.Namespace, seconds: float, script: Path = LUA_SCRIPT
) -> WrkRun:
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{base_url}/v1/subscriptions",
        "--",
        secrets.token_hex(4),  # the run tag: addresses never repeat across runs
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            values = dict(item.split("=", 1) for item in line.split()[1:])
            return WrkRun(
                **{
                    f.name: (int if f.type == "int" else float)(values[f.name])
                    for f in fields(WrkRun)
                }
            )
    raise RuntimeError(
        f"wrk gave no BENCH line (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    )


def bench_backend(backend: str, args: argparse.Namespace) -> BackendResult:
    print(f"\n== {backend}")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-signup-")))
        if backend == "nodb":
            url = None
            env = server_env("sqlite:///" + str(workdir / "unused.db"), workdir, None)
            app = "bench.nodb_app:create_app"
        else:
            url = stack.enter_context(harness.fresh_database(backend, workdir))
            mail_url = None
            if args.worker:
                sink = harness.SinkProcess()
                stack.callback(lambda: print(f"  SMTP sink received {sink.stop()} mails"))
                mail_url = sink.url
            env = server_env(url, workdir, mail_url)
            app = "service.app:create_app"
        env.update(args.server_env)
        log_path = workdir / f"uvicorn-{backend}.log"
        with uvicorn_server(app, env, log_path, args.workers) as server:
            probe(server.base_url)
            warmup = run_wrk(server.base_url, args, args.warmup)
            wal_before = harness.pg_wal_counters() if backend == "postgresql" else {}
            cpu_before = server.cpu_seconds()
            run = run_wrk(server.base_url, args, args.duration)
            cpu_after = server.cpu_seconds()
            wal_after = harness.pg_wal_counters() if wal_before else {}
            if run.non2xx or warmup.non2xx:
                status, body = post_signup(server.base_url, "after@example.com")
                print(f"  non-2xx answers! One more sign-up now answers {status}: {body[:300]!r}")
        result = BackendResult(backend, run, warmup, load_after=harness.load_average())
        if wal_after:
            result.wal = {name: wal_after[name] - wal_before[name] for name in wal_after}
        if cpu_before is not None and cpu_after is not None:
            result.server_cpu = (cpu_after - cpu_before) / run.seconds
        if url is not None:
            counts = harness.count_rows(url, workdir)
            result.subscribers = counts.subscribers
            result.expected_subscribers = 1 + warmup.ok + run.ok  # 1: the probe
            result.outbox = counts.outbox
    cpu = f", server process at {result.server_cpu:.0%} of a core" if result.server_cpu else ""
    print(
        f"  {run.requests} requests in {run.seconds:.1f} s: {run.rps:.0f} req/s, "
        f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, non-2xx {run.non2xx}{cpu}; "
        f"load average {result.load_after}"
    )
    if result.wal and run.requests:
        print(f"  {wal_summary(result.wal, run.requests)}")
    return result


def wal_summary(wal: dict[str, int], requests: int) -> str:
    """PostgreSQL's write-ahead log while measured, per sign-up: every batch's commit waits
    for a WAL flush, so a slow disk shows here first (the counters are the whole cluster's)."""
    syncs = wal["wal_sync"]
    per_sync = f"{requests / syncs:.1f} sign-ups per flush" if syncs else "no flushes"
    return (
        f"WAL: {syncs} flushes ({per_sync}), {wal['wal_bytes'] / requests / 1024:.1f} KiB "
        f"and {wal['wal_records'] / requests:.1f} records per sign-up, "
        f"{wal['wal_fpi']} full-page images"
    )


# ---------------------------------------------------------------- the report


def print_table(results: list[BackendResult]) -> None:
    nodb = next((r.run.rps for r in results if r.backend == "nodb"), None)
    header = ("backend", "req/s", "p50 ms", "p99 ms", "non-2xx", "% of nodb", "CPU", "CPU ms/req")
    print("\n{:<11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>5} {:>10}".format(*header))
    for r in results:
        share = f"{100 * r.run.rps / nodb:.0f}%" if nodb else "-"
        cpu = f"{r.server_cpu:.0%}" if r.server_cpu is not None else "-"
        per_request = f"{r.cpu_ms_per_request:.2f}" if r.cpu_ms_per_request else "-"
        print(
            f"{r.backend:<11} {r.run.rps:>8.0f} {r.run.p50_ms:>8.2f} {r.run.p99_ms:>8.2f} "
            f"{r.run.non2xx:>8} {share:>9} {cpu:>5} {per_request:>10}"
        )
    print("(CPU: the uvicorn process, share of one core while measured; not PostgreSQL's.)")
    errors = [r for r in results if r.run.timeouts or r.run.read_errors or r.run.connect_errors]
    for r in errors:
        print(
            f"  {r.backend}: {r.run.timeouts} timeouts, {r.run.read_errors} read errors, "
            f"{r.run.connect_errors} connect errors"
        )


def print_checks(results: list[BackendResult], args: argparse.Namespace) -> None:
    """The rows written must match the 2xx answers: proof that the work happened."""
    print("\nRows written vs 2xx answers (probe + warm-up + measured):")
    slack = 2 * args.connections  # answers in flight when each wrk run stopped
    for r in results:
        if r.subscribers is None or r.expected_subscribers is None:
            continue
        diff = r.subscribers - r.expected_subscribers
        verdict = "ok" if 0 <= diff <= slack else "MISMATCH"
        print(
            f"  {r.backend:<11} subscribers rows {r.subscribers}, 2xx answers "
            f"{r.expected_subscribers}, difference {diff:+d} ({verdict}: requests still in "
            f"flight when wrk stopped reach the database but not wrk's count, at most {slack}); "
            f"outbox {r.outbox}"
        )


def print_targets(results: list[BackendResult]) -> None:
    nodb = next((r.run.rps for r in results if r.backend == "nodb"), None)
    if nodb is None:
        return
    print("\nTargets (one worker, same run):")
    for r in results:
        if r.backend not in TARGETS:
            continue
        share, p99 = TARGETS[r.backend]
        got = r.run.rps / nodb
        met = got >= share and r.run.p99_ms < p99 and not r.run.non2xx
        print(
            f"  {r.backend:<11} >= {share:.0%} of nodb and p99 < {p99:g} ms: "
            f"{got:.0%}, p99 {r.run.p99_ms:.1f} ms -> {'met' if met else 'NOT met'}"
            + (f" (invalid: {r.run.non2xx} non-2xx answers)" if r.run.non2xx else "")
        )


def print_rounds(rounds: list[list[BackendResult]]) -> None:
    """Each round's share of the no-database endpoint measured in that round, and the
    medians: the machine's speed drifts over minutes, so a share is only fair within a round."""
    print(f"\nAll {len(rounds)} rounds (share: of the same round's nodb):")
    for backend in [r.backend for r in rounds[0] if r.backend != "nodb"]:
        parts, shares, p99s = [], [], []
        for round_ in rounds:
            by_backend = {r.backend: r.run for r in round_}
            run, nodb = by_backend[backend], by_backend.get("nodb")
            part = f"{run.rps:.0f}/s"
            if nodb is not None and nodb.rps:
                shares.append(run.rps / nodb.rps)
                part += f" ({shares[-1]:.0%})"
            parts.append(f"{part} p99 {run.p99_ms:.1f} ms")
            p99s.append(run.p99_ms)
        median = f"; median share {statistics.median(shares):.0%}" if shares else ""
        print(
            f"  {backend:<11} {', '.join(parts)}{median}, "
            f"median p99 {statistics.median(p99s):.1f} ms"
        )


def save(results: list[BackendResult], args: argparse.Namespace, info: dict[str, str]) -> Path:
    harness.RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.json or harness.RESULTS_DIR / f"signup-{stamp}.json"
    document = {
        "benchmark": "signup",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": info,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [
            {
                **asdict(r),
                "run": asdict(r.run),
                "warmup": asdict(r.warmup),
                "cpu_ms_per_request": r.cpu_ms_per_request,
            }
            for r in results
        ],
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")
    return Path(path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15, help="Seconds measured.")
    parser.add_argument("--warmup", type=float, default=2, help="Seconds of warm-up.")
    parser.add_argument("--connections", type=int, default=16, help="Concurrent connections.")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads.")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn --workers: API processes (the targets are for 1; CPU is then the "
        "supervisor's only, see bench/scale.py for several).",
    )
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="Comma-separated: sqlite,postgresql,nodb."
    )
    parser.add_argument(
        "--worker",
        action="store_true",
        help="Run the delivery worker inside the server, sending to an SMTP sink.",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Extra environment for the server, e.g. NEWSLETTER_SIGNUP_BATCH_CONSUMERS=4.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Run every backend this many times, in turn, and give each round's share and the "
        "medians.",
    )
    parser.add_argument("--json", type=Path, help="Where to write the results.")
    args = parser.parse_args()
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    if args.threads > args.connections:
        parser.error("--threads must not exceed --connections")
    return args


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print(WRK_MISSING, file=sys.stderr)
        return 2
    info = harness.machine(need_postgresql="postgresql" in args.backends)
    print("Machine:")
    harness.print_machine(info)
    worker = "on, sending to an SMTP sink" if args.worker else "off (NEWSLETTER_RUN_WORKER=false)"
    if args.workers != 1:
        print(f"uvicorn --workers {args.workers}: the CPU column counts the supervisor only.")
    print(
        f"Load: wrk -t{args.threads} -c{args.connections}, {args.warmup:g} s warm-up, "
        f"{args.duration:g} s measured; delivery worker {worker}. wrk shares the cores with "
        "the server."
    )
    print(f"Server environment: NEWSLETTER_SIGNUP_RATE_LIMIT={RATE_LIMIT} (out of reach)")
    if args.server_env:
        print(f"  and: {' '.join(f'{k}={v}' for k, v in args.server_env.items())}")
    rounds: list[list[BackendResult]] = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"\n#### round {number} of {args.rounds}")
        rounds.append([bench_backend(backend, args) for backend in args.backends])
        print_table(rounds[-1])
        print_checks(rounds[-1], args)
        print_targets(rounds[-1])
    if args.rounds > 1:
        print_rounds(rounds)
    print(f"\nResults written to {save([r for round_ in rounds for r in round_], args, info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
