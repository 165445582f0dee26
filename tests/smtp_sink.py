"""A real SMTP server (aiosmtpd) for tests, with failures and slow replies on demand."""

from __future__ import annotations

import asyncio
import email
import subprocess
from email import policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from devtools.mailsink import greeted
from devtools.servers import free_port


class Sink:
    """Keeps every accepted message; refuses chosen recipients (5xx), the next N messages (4xx)
    or every sender (``mail_reply``).

    ``reply_delay`` holds the 250 reply to DATA back after the message is kept: the window in
    which the server has the email but the sender does not know it yet. ``pipelining``: the
    EHLO reply advertises PIPELINING (RFC 2920), as real relays do. ``commands`` lists each
    MAIL, RCPT, DATA and end of data with the number of reads from the network it took to
    get there (``reads``): commands that share a number were sent without waiting for a reply.
    """

    def __init__(self, *, pipelining: bool = True) -> None:
        self.messages: list[tuple[EmailMessage, list[str]]] = []
        self.reject: set[str] = set()
        self.defer_next = 0
        self.reply_delay = 0.0
        self.mail_reply = ""
        self.pipelining = pipelining
        self.reads = 0
        self.commands: list[tuple[str, int]] = []
        self.port = free_port()
        self._controller: Controller | None = None

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return greeted(session, hostname, responses, pipelining=self.pipelining)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.commands.append(("MAIL", self.reads))
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.commands.append(("RCPT", self.reads))
        if address in self.reject:
            return f"550 5.1.1 <{address}>: no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands.append(("end of data", self.reads))
        if self.defer_next > 0:
            self.defer_next -= 1
            return "451 4.3.0 mailbox busy, try again later"
        parsed = email.message_from_bytes(envelope.content, policy=policy.default)
        self.messages.append((parsed, list(envelope.rcpt_tos)))  # type: ignore[arg-type]
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        return "250 2.0.0 queued"

    def established(self) -> int:
        """TCP connections open to the sink right now (counted by ``ss``, as an operator would)."""
        listed = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( sport = :{self.port} )"],
            capture_output=True,
            text=True,
            check=True,
        )
        return len(listed.stdout.splitlines())

    def start(self) -> Sink:
        self._controller = _CountingController(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


class _CountingSMTP(SMTP):
    """Counts the reads from the network (``Sink.reads``) and notes each DATA command."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        self._sink = sink

    def data_received(self, data: bytes) -> None:
        self._sink.reads += 1
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        self._sink.commands.append(("DATA", self._sink.reads))
        await super().smtp_DATA(arg)


class _CountingController(Controller):
    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)
