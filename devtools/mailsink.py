"""The development mail sink: a real SMTP server (aiosmtpd) that keeps every message.

``python -m devtools.mailsink serve DIR --port 2525`` stores each received
message in the Maildir ``DIR`` (``--tls-cert``/``--tls-key`` offer STARTTLS;
``--round-trip 0.02`` answers each SMTP command 20 ms late, like a relay across a
network, for benchmarks);
``python -m devtools.mailsink list DIR`` shows them (date, recipients,
subject); ``show DIR N`` prints one.
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP


class _DistantSMTP(SMTP):
    """Sends each reply ``round_trip`` seconds late (once per reply, not per line of a
    multi-line one): what a relay across a network costs a sender per exchange."""

    def __init__(self, *args: Any, round_trip: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._round_trip = round_trip

    async def push(self, status: AnyStr) -> None:
        last_line = len(status) < 4 or status[3:4] in (" ", b" ")
        if last_line:
            await asyncio.sleep(self._round_trip)
        await super().push(status)


class _SinkController(Controller):
    def __init__(self, handler: Any, *, round_trip: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._round_trip = round_trip

    def factory(self) -> SMTP:
        if not self._round_trip:
            return SMTP(self.handler, **self.SMTP_kwargs)
        return _DistantSMTP(self.handler, round_trip=self._round_trip, **self.SMTP_kwargs)


def serve(
    directory: str,
    host: str,
    port: int,
    cert: str = "",
    key: str = "",
    *,
    round_trip: float = 0.0,
) -> None:
    tls = None
    if cert:
        # STARTTLS offered, as real relays do; plain sessions stay allowed for local tools.
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key or None)
    controller = _SinkController(
        Mailbox(Path(directory)), round_trip=round_trip, hostname=host, port=port, tls_context=tls
    )
    controller.start()
    print(f"mail sink listening on {host}:{port}, storing into {directory}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()


def messages(directory: str) -> list[mailbox.MaildirMessage]:
    box = mailbox.Maildir(directory, create=True)
    return sorted(box, key=lambda m: m.get_date())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.mailsink", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve")
    serving.add_argument("directory")
    serving.add_argument("--host", default="127.0.0.1")
    serving.add_argument("--port", type=int, default=2525)
    serving.add_argument("--tls-cert", default="", help="PEM certificate: offer STARTTLS")
    serving.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    serving.add_argument(
        "--round-trip", type=float, default=0.0, help="seconds each reply is late (benchmarks)"
    )
    listing = commands.add_parser("list")
    listing.add_argument("directory")
    showing = commands.add_parser("show")
    showing.add_argument("directory")
    showing.add_argument("number", type=int)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(
            args.directory,
            args.host,
            args.port,
            args.tls_cert,
            args.tls_key,
            round_trip=args.round_trip,
        )
        return 0
    found = messages(args.directory)
    if args.command == "list":
        for number, message in enumerate(found, 1):
            print(f"{number:>4}  {message['Date']}  {message['To']}  {message['Subject']}")
        print(f"{len(found)} message(s) in {args.directory}")
        return 0
    if not 1 <= args.number <= len(found):
        print(f"no message {args.number}; there are {len(found)}", file=sys.stderr)
        return 1
    parsed = BytesParser(policy=policy.default).parsebytes(found[args.number - 1].as_bytes())
    print(parsed.as_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
