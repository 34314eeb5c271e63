"""Instructions per sign-up request, counted by valgrind's callgrind.

Wall-clock figures on a shared 2-core machine spread by ±20% between runs of the same code;
an instruction count does not move with the machine's load, so it shows what a change to the
code saved. The app is driven in-process over ASGI (no HTTP server, no socket): a warm-up,
then N sign-ups at concurrency 16, for the no-database endpoint (bench/nodb_app.py), SQLite
and PostgreSQL. Only the measured requests are counted: callgrind_control zeroes the counters
before them and dumps them after. uvicorn and httptools cost the same for every backend and
are not in these counts; PostgreSQL's own work is not either (it runs in its own processes).

    .venv/bin/python bench/signup_instructions.py
    .venv/bin/python bench/signup_instructions.py --requests 400 --backends nodb,postgresql

Needs valgrind (Debian: apt-get install -y valgrind). Each backend takes a few minutes: the
program runs about 50 times slower under callgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import harness

BACKENDS = ("nodb", "sqlite", "postgresql")
CONCURRENCY = 16
WARMUP = 300
RATE_LIMIT = "1000000/minute;10000000/hour"  # counted as in the service, never reached


def _request(n: int) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"email": f"reader{n}@example.com", "newsletters": [harness.NEWSLETTER]})
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/subscriptions",
        "raw_path": b"/v1/subscriptions",
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 40000 + n % 1000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"accept", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"user-agent", b"bench"),
        ],
    }
    return scope, body.encode()


async def _sign_up(app: Any, n: int, slots: asyncio.Semaphore) -> int:
    scope, body = _request(n)
    status = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the request runs to its end
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    async with slots:
        await app(scope, receive, send)
    return status


async def _drive(app: Any, first: int, count: int) -> None:
    slots = asyncio.Semaphore(CONCURRENCY)
    statuses = await asyncio.gather(*(_sign_up(app, n, slots) for n in range(first, first + count)))
    failed = [s for s in statuses if s != 202]
    if failed:
        raise RuntimeError(f"{len(failed)} sign-ups answered {sorted(set(failed))}, not 202")


def _callgrind(command: str) -> None:
    subprocess.run(
        ["callgrind_control", command, str(os.getpid())], check=True, capture_output=True
    )


async def _child(backend: str, url: str | None, workdir: Path, requests: int) -> None:
    """Runs under callgrind: build the app, warm up, count the measured requests."""
    if url is None:
        from nodb_app import create_app as nodb_app

        app = nodb_app()
    else:
        from service.app import create_app

        app = create_app(harness.settings_for(url, workdir, signup_rate_limit=RATE_LIMIT))
    async with app.router.lifespan_context(app):
        await _drive(app, 0, WARMUP)
        _callgrind("-z")  # zero the counters: startup and warm-up are not counted
        await _drive(app, WARMUP, requests)
        _callgrind("--dump=measured")


def _measure(backend: str, requests: int) -> int:
    """Instructions per request of one backend (a child process under callgrind)."""
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-instr-")))
        url = (
            None
            if backend == "nodb"
            else stack.enter_context(harness.fresh_database(backend, workdir))
        )
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={workdir}/callgrind.%p",
            sys.executable,
            __file__,
            "--child",
            backend,
            "--requests",
            str(requests),
            "--workdir",
            str(workdir),
        ]
        if url is not None:
            command += ["--url", url]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{backend}: the child failed:\n{done.stderr[-3000:]}")
        for dump in workdir.glob("callgrind.*"):
            text = dump.read_text(errors="replace")
            if "measured" not in text.split("\nevents:", 1)[0]:
                continue
            for line in text.splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1]) // requests
        raise RuntimeError(f"{backend}: no dump of the measured requests in {workdir}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="Sign-ups counted.")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import uvloop

        uvloop.install()
        asyncio.run(_child(args.child, args.url, args.workdir, args.requests))
        return 0
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    if missing:
        print(f"needs {', '.join(missing)}: apt-get install -y valgrind", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    harness.print_machine(harness.machine(need_postgresql="postgresql" in backends))
    counts: dict[str, int] = {}
    for backend in backends:
        counts[backend] = _measure(backend, args.requests)
        print(f"  {backend}: {counts[backend]:,} instructions per sign-up", flush=True)
    print(f"\n{args.requests} sign-ups at concurrency {CONCURRENCY}, after {WARMUP} not counted:")
    print("backend      instructions/request   x nodb")
    for backend, count in counts.items():
        ratio = f"{count / counts['nodb']:.2f}" if "nodb" in counts else "-"
        print(f"{backend:12} {count:>20,}   {ratio:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
