"""An SMTP server on loopback that accepts every message, counts it and throws it away.

    python bench/smtp_sink.py --port 2525

Prints `ready <port>` once listening and `received <count>` when stopped by SIGTERM or
SIGINT. It runs in its own process (on uvloop when installed) so that, as with a real mail
server, it does not share an interpreter lock with what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import warnings
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class CountingSink:
    def __init__(self, pipelining: bool = True) -> None:
        self.count = 0
        self.pipelining = pipelining

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        # Mail servers in production offer PIPELINING (RFC 2920); aiosmtpd handles pipelined
        # commands, reading them a line at a time, but does not say so.
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        return "250 OK"


async def serve(port: int, pipelining: bool) -> int:
    sink = CountingSink(pipelining)
    loop = asyncio.get_running_loop()
    # A fixed hostname: without one aiosmtpd calls socket.getfqdn() for every connection.
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="bench-sink.localhost"), host="127.0.0.1", port=port
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {port}", flush=True)
    await stop.wait()
    server.close()
    return sink.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--no-pipelining", action="store_true", help="Do not offer PIPELINING (RFC 2920)."
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    count = run(serve(args.port, not args.no_pipelining))
    print(f"received {count}", flush=True)


if __name__ == "__main__":
    main()
