"""PIPELINING against a scripted relay: replies that aiosmtpd never sends (grouped in one write,
split mid-line, 421, malformed, a 354 with no recipient accepted, a hang-up mid-group)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage

import pytest

from notify_svc.smtp import DeliveryError, SmtpProvider, SmtpSettings

EHLO = b"250-relay.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 HELP\r\n"


@dataclass
class Relay:
    """Answers each command with ``answer(command)`` (None: hang up). Replies to a pipelined
    group are held until DATA and then written ``together`` or one byte per write."""

    answer: Callable[[bytes], bytes | None]
    together: bool = True
    commands: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    hangups: int = 0
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held = b""
        try:
            writer.write(b"220 relay.test ready\r\n")
            while line := await reader.readline():
                command = line.rstrip(b"\r\n")
                self.commands.append(command)
                verb = command.split(b" ", 1)[0].upper()
                reply = EHLO if verb == b"EHLO" else self.answer(command)
                if reply is None:
                    self.hangups += 1
                    return
                held += reply
                if verb in (b"MAIL", b"RCPT"):
                    continue  # grouped, as RFC 2920 suggests, until DATA
                await self.send(writer, held)
                held = b""
                if verb == b"DATA" and reply.startswith(b"354"):
                    self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                    end = self.answer(b"<end of data>")
                    if end is None:
                        return
                    await self.send(writer, end)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.hangups += 1
        finally:
            writer.close()

    async def send(self, writer: asyncio.StreamWriter, replies: bytes) -> None:
        if self.together:
            writer.write(replies)
        else:
            for byte in replies:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
        await writer.drain()


def script(**replies: bytes | None) -> Callable[[bytes], bytes | None]:
    """Replies by verb (``end`` for end of data); 250 for anything not named."""

    def answer(command: bytes) -> bytes | None:
        verb = "end" if command == b"<end of data>" else command.split(b" ", 1)[0].decode().lower()
        if verb == "data" and "data" not in replies:
            return b"354 go ahead\r\n"
        return replies.get(verb, b"250 2.0.0 ok\r\n")

    return answer


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Relay], Awaitable[SmtpProvider]]]:
    servers: list[asyncio.Server] = []
    providers: list[SmtpProvider] = []

    async def start(relay: Relay) -> SmtpProvider:
        server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
        servers.append(server)
        relay.port = server.sockets[0].getsockname()[1]
        provider = SmtpProvider(SmtpSettings(port=relay.port, timeout=2.0, pool_size=1))
        providers.append(provider)
        return provider

    yield start
    for provider in providers:
        await provider.close()
    for server in servers:
        server.close()


def email(to: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "noreply@opsmesh.test"
    message["To"] = ", ".join(to)
    message["Subject"] = "Hello"
    message.set_content("Hello.\n")
    return message


@pytest.mark.parametrize("together", [True, False], ids=["one-write", "byte-by-byte"])
async def test_each_reply_is_paired_with_its_command_however_the_replies_arrive(
    serve: Callable[[Relay], Awaitable[SmtpProvider]], together: bool
) -> None:
    relay = Relay(
        script(
            rcpt=b"250-2.1.5 first line\r\n250 2.1.5 recipient ok\r\n",
            end=b"250-2.0.0 queued\r\n250 2.0.0 as 4711\r\n",
        ),
        together=together,
    )
    provider = await serve(relay)
    to = ["ann@example.com", "bob@example.com"]
    assert await provider.send(email(to), to) == "2.0.0 queued\n2.0.0 as 4711"
    assert await provider.send(email(to), to) == "2.0.0 queued\n2.0.0 as 4711"
    verbs = [command.split(b" ", 1)[0] for command in relay.commands]
    assert verbs == [b"EHLO", *[b"MAIL", b"RCPT", b"RCPT", b"DATA"] * 2]
    assert relay.commands[1].startswith(b"MAIL FROM:<noreply@opsmesh.localhost> size=")
    assert len(relay.messages) == 2


async def test_a_354_with_no_recipient_accepted_hangs_up_instead_of_sending(
    serve: Callable[[Relay], Awaitable[SmtpProvider]],
) -> None:
    relay = Relay(script(rcpt=b"550 5.1.1 no such user\r\n", data=b"354 go ahead anyway\r\n"))
    provider = await serve(relay)
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ghost@example.com"]), ["ghost@example.com"])
    assert failure.value.permanent
    assert str(failure.value) == "recipients refused: ghost@example.com: 550 5.1.1 no such user"
    await asyncio.sleep(0.1)
    assert relay.messages == []  # not even an empty one
    assert relay.hangups == 1


async def test_a_421_ends_the_conversation_as_a_transient_failure(
    serve: Callable[[Relay], Awaitable[SmtpProvider]],
) -> None:
    relay = Relay(script(mail=b"421 4.3.2 shutting down\r\n"))
    provider = await serve(relay)
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ann@example.com"]), ["ann@example.com"])
    assert (str(failure.value), failure.value.permanent) == ("SMTP 421 4.3.2 shutting down", False)
    assert relay.messages == []


async def test_a_refused_message_is_a_data_error_with_the_servers_reply(
    serve: Callable[[Relay], Awaitable[SmtpProvider]],
) -> None:
    relay = Relay(script(end=b"554 5.6.0 message refused\r\n"))
    provider = await serve(relay)
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ann@example.com"]), ["ann@example.com"])
    assert (str(failure.value), failure.value.permanent) == ("SMTP 554 5.6.0 message refused", True)


async def test_a_malformed_reply_is_a_transient_failure(
    serve: Callable[[Relay], Awaitable[SmtpProvider]],
) -> None:
    relay = Relay(script(rcpt=b"hello there\r\n"))
    provider = await serve(relay)
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ann@example.com"]), ["ann@example.com"])
    assert not failure.value.permanent
    assert str(failure.value).startswith("SMTP -1 Malformed SMTP response line")


async def test_a_hang_up_mid_group_is_a_transient_failure(
    serve: Callable[[Relay], Awaitable[SmtpProvider]],
) -> None:
    relay = Relay(script(rcpt=None))
    provider = await serve(relay)
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ann@example.com"]), ["ann@example.com"])
    assert not failure.value.permanent
    assert str(failure.value).startswith("SMTP server unreachable: SMTPServerDisconnected")
