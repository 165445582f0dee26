"""ESMTP PIPELINING (RFC 2920) on top of aiosmtplib, which waits for each reply before it sends
the next command.

When the server's EHLO lists PIPELINING, MAIL FROM, every RCPT TO and DATA go out in one write,
their replies are read and checked one by one, in order, and the message follows the 354: two
round trips per email instead of three plus one per recipient. Without PIPELINING, aiosmtplib's
own one-command-at-a-time ``sendmail`` runs unchanged. Either way a refusal raises what
aiosmtplib raises (``SMTPSenderRefused``, ``SMTPRecipientsRefused``, ``SMTPDataError``), so
callers map failures the same way whichever path sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus
from aiosmtplib.email import parse_address, quote_address
from aiosmtplib.protocol import normalize_message_line_endings
from aiosmtplib.typing import Default

_LINE_START_DOT = re.compile(rb"(?m)^\.")
_CONTROL_CHARACTER = re.compile(rb"[\x00-\x1f\x7f]")
_MAX_REPLY_BYTES = 32 * 1024
"""A whole reply, continuation lines included (aiosmtplib's bound too)."""
_ACCEPTED_RECIPIENT = (SMTPStatus.completed, SMTPStatus.will_forward)


class PipeliningSMTP(aiosmtplib.SMTP):
    """aiosmtplib's client; ``sendmail`` (and so ``send_message``) pipelines when it may.

    One sender at a time per client (what a connection pool hands out): the pipelined group
    is written and read under this client's own lock.
    """

    _pipeline_lock: asyncio.Lock | None = None

    async def sendmail(
        self,
        sender: str,
        recipients: str | Sequence[str],
        message: str | bytes,
        /,
        *,
        mail_options: Iterable[str] | None = None,
        rcpt_options: Iterable[str] | None = None,
        # aiosmtplib's signature, kept whole: send_message passes these on.
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> tuple[dict[str, SMTPResponse], str]:
        # Known only after EHLO, which send_message always does first.
        if not self.supports_extension("pipelining"):
            return await super().sendmail(
                sender,
                recipients,
                message,
                mail_options=mail_options,
                rcpt_options=rcpt_options,
                timeout=timeout,
            )
        recipients = [recipients] if isinstance(recipients, str) else list(recipients)
        mail_options = list(mail_options or ())
        smtputf8 = any(option.lower() == "smtputf8" for option in mail_options)
        if smtputf8 and not self.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
        # Every address checked before anything is sent, as aiosmtplib does.
        for address in (sender, *recipients):
            parse_address(address)
        content = normalize_message_line_endings(
            message.encode("ascii") if isinstance(message, str) else message
        )
        if self.supports_extension("size"):
            mail_options.insert(0, f"size={len(content)}")  # RFC 1870: octets as transmitted
        encoding = "utf-8" if smtputf8 else "ascii"
        envelope = [
            _command(b"MAIL", b"FROM:" + quote_address(sender).encode(encoding), mail_options),
            *(
                _command(b"RCPT", b"TO:" + quote_address(to).encode(encoding), rcpt_options or ())
                for to in recipients
            ),
            b"DATA\r\n",
        ]
        if self._pipeline_lock is None:
            self._pipeline_lock = asyncio.Lock()
        async with self._pipeline_lock:
            try:
                return await self._pipelined(
                    envelope,
                    sender,
                    recipients,
                    content,
                    self.timeout if timeout is Default.token else timeout,
                )
            except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
                # Leave the connection ready for the next message, as aiosmtplib does.
                with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                    await self.rset(timeout=timeout)
                raise

    async def _pipelined(
        self,
        envelope: list[bytes],
        sender: str,
        recipients: list[str],
        content: bytes,
        reply_timeout: float | None,
    ) -> tuple[dict[str, SMTPResponse], str]:
        protocol, transport = self.protocol, self.transport
        if protocol is None or transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        replies = _Replies(protocol)
        transport.set_protocol(replies)
        try:
            protocol.write(b"".join(envelope))
            mail = await replies.next(reply_timeout)
            if self._closing(mail):
                raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
            refused: list[aiosmtplib.SMTPRecipientRefused] = []
            for address in recipients:
                reply = await replies.next(reply_timeout)
                if reply.code not in _ACCEPTED_RECIPIENT:
                    refused.append(
                        aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)
                    )
                if self._closing(reply):
                    raise aiosmtplib.SMTPRecipientsRefused(refused)
            data = await replies.next(reply_timeout)
            if self._closing(data):
                raise aiosmtplib.SMTPDataError(data.code, data.message)
            nothing_to_send = mail.code != SMTPStatus.completed or len(refused) == len(recipients)
            if data.code == SMTPStatus.start_input and nothing_to_send:
                # The server took DATA with no sender or recipient it accepted. RFC 2920 would
                # end the message with a lone dot; closing is surer: an unfinished message is
                # never delivered, while a server this lax might deliver an empty one.
                self.close()
            if mail.code != SMTPStatus.completed:
                raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
            if len(refused) == len(recipients):
                raise aiosmtplib.SMTPRecipientsRefused(refused)
            if data.code != SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(data.code, data.message)
            protocol.write(_LINE_START_DOT.sub(b"..", content) + b".\r\n")
            sent = await replies.next(reply_timeout)
            self._closing(sent)
            if sent.code != SMTPStatus.completed:
                raise aiosmtplib.SMTPDataError(sent.code, sent.message)
            errors = {error.recipient: SMTPResponse(error.code, error.message) for error in refused}
            return errors, sent.message
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            # Replies may still be on their way: the connection cannot be trusted to pair the
            # next reply with the next command any more (aiosmtplib closes here too).
            self.close()
            raise
        except aiosmtplib.SMTPResponseException as error:
            if error.code == SMTPStatus.invalid_response:
                # Not a reply: where the server stands (even mid-DATA) is unknown, so no RSET.
                self.close()
            raise
        finally:
            transport.set_protocol(protocol)

    def _closing(self, reply: SMTPResponse) -> bool:
        """Whether ``reply`` is a 421, the server closing the connection; the client then closes
        it too (as aiosmtplib does) and reads no further reply."""
        if reply.code != SMTPStatus.domain_unavailable:
            return False
        self.close()
        return True


class _Replies(asyncio.Protocol):
    """Reads the connection while a pipelined group is on the wire and keeps every reply, in
    order. aiosmtplib's protocol parses one reply per read and drops bytes that arrive while
    nobody waits for a reply, so replies sent together would be lost. Connection events go on
    to aiosmtplib's protocol, which owns the connection again once the group is done."""

    def __init__(self, owner: asyncio.BaseProtocol) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._failure: aiosmtplib.SMTPException | None = None
        self._arrived = asyncio.Event()

    async def next(self, within: float | None) -> SMTPResponse:
        """The next reply; waits at most ``within`` seconds for it."""
        try:
            async with asyncio.timeout(within):
                while not self._replies:
                    if self._failure is not None:
                        raise self._failure
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError as error:
            raise aiosmtplib.SMTPReadTimeoutError(
                "Timed out waiting for server response"
            ) from error
        return self._replies.popleft()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (reply := self._take_reply()) is not None:
                self._replies.append(reply)
        except aiosmtplib.SMTPResponseException as error:
            self._failure = error
        self._arrived.set()

    def _take_reply(self) -> SMTPResponse | None:
        """The first complete reply in the buffer, taken out of it; None while incomplete."""
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) != -1:
            line = bytes(self._buffer[offset : end + 1])
            offset = end + 1
            if not line[:3].isdigit():
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response.value, f"Malformed SMTP response line: {line!r}"
                )
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":  # the last line of the reply
                del self._buffer[:offset]
                text = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return SMTPResponse(int(line[:3]), text)
        if len(self._buffer) > _MAX_REPLY_BYTES:
            raise aiosmtplib.SMTPResponseException(
                SMTPStatus.invalid_response.value, "Response too long"
            )
        return None

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._owner.pause_writing()

    def resume_writing(self) -> None:
        self._owner.resume_writing()

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._failure is None:
            self._failure = error
        self._arrived.set()


def _command(verb: bytes, argument: bytes, options: Iterable[str]) -> bytes:
    words = [verb, argument, *(option.encode("ascii") for option in options)]
    if any(_CONTROL_CHARACTER.search(word) for word in words):
        raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(words) + b"\r\n"
