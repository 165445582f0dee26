"""The development mail sink: a real SMTP server (aiosmtpd) that keeps every message.

``python -m devtools.mailsink serve DIR --port 2525`` stores each received
message in the Maildir ``DIR`` (``--tls-cert``/``--tls-key`` offer STARTTLS;
``--round-trip 0.02`` puts it 20 ms away, like a relay across a network, for
benchmarks; it advertises ESMTP PIPELINING as real relays do, ``--no-pipelining``
leaves it out);
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
from collections import deque
from collections.abc import Sequence
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP


class _DistantSMTP(SMTP):
    """A relay ``round_trip`` away. What the client sends reaches the server that much later
    (the whole round trip is charged on the way in) and the greeting comes one round trip
    after connecting, so a client that waits for each reply pays a round trip per command,
    while commands written together (PIPELINING) arrive together and share one, as they
    would over a network; a server that slept before each reply would charge each of them."""

    def __init__(self, *args: Any, round_trip: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._round_trip = round_trip
        self._in_flight: deque[tuple[float, bytes]] = deque()
        self._greeted = False
        self._client_closed = False

    async def push(self, status: AnyStr) -> None:
        if not self._greeted:  # the greeting: what opening the connection costs
            self._greeted = True
            await asyncio.sleep(self._round_trip)
        await super().push(status)

    def data_received(self, data: bytes) -> None:
        self._in_flight.append((self.loop.time() + self._round_trip, data))
        if len(self._in_flight) == 1:
            self.loop.call_at(self._in_flight[0][0], self._arrive)

    def _arrive(self) -> None:
        """Hands the oldest bytes in flight to the server, in the order they were sent."""
        _, data = self._in_flight.popleft()
        if self.transport is not None and not self._client_closed:
            super().data_received(data)
        if self._in_flight:
            self.loop.call_at(self._in_flight[0][0], self._arrive)

    def eof_received(self) -> bool | None:
        # Bytes still in flight are dropped: the session ends here (aiosmtpd stops reading).
        self._client_closed = True
        return super().eof_received()


class _SinkHandler(Mailbox):
    """Keeps messages in a Maildir; advertises PIPELINING unless told not to."""

    def __init__(self, directory: Path, *, pipelining: bool) -> None:
        super().__init__(directory)
        self._pipelining = pipelining

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return greeted(session, hostname, responses, pipelining=self._pipelining)


def greeted(session: Any, hostname: str, responses: list[str], *, pipelining: bool) -> list[str]:
    """An aiosmtpd EHLO hook's work: the session's host name, PIPELINING when offered."""
    session.host_name = hostname  # aiosmtpd leaves this to an EHLO hook
    if pipelining:
        # aiosmtpd reads commands from a buffered stream and answers them in order,
        # which is all RFC 2920 asks of a server; it just does not say so.
        responses.insert(-1, "250-PIPELINING")
    return responses


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
    pipelining: bool = True,
) -> None:
    tls = None
    if cert:
        # STARTTLS offered, as real relays do; plain sessions stay allowed for local tools.
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key or None)
    controller = _SinkController(
        _SinkHandler(Path(directory), pipelining=pipelining),
        round_trip=round_trip,
        hostname=host,
        port=port,
        tls_context=tls,
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
        "--round-trip", type=float, default=0.0, help="seconds the relay is away (benchmarks)"
    )
    serving.add_argument(
        "--no-pipelining",
        dest="pipelining",
        action="store_false",
        help="do not advertise ESMTP PIPELINING (RFC 2920)",
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
            pipelining=args.pipelining,
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
