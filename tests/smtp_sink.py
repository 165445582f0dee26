"""A real SMTP server (aiosmtpd) for tests, with failures and slow replies on demand."""

from __future__ import annotations

import asyncio
import email
import subprocess
from email import policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from devtools.servers import free_port


class Sink:
    """Keeps every accepted message; refuses chosen recipients (5xx) or the next N (4xx).

    ``reply_delay`` holds the 250 reply to DATA back after the message is kept: the window in
    which the server has the email but the sender does not know it yet.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[EmailMessage, list[str]]] = []
        self.reject: set[str] = set()
        self.defer_next = 0
        self.reply_delay = 0.0
        self.port = free_port()
        self._controller: Controller | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address in self.reject:
            return f"550 5.1.1 <{address}>: no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
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
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
