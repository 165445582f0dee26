"""The SMTP provider against a real server (aiosmtpd): PIPELINING (RFC 2920) when the server
advertises it, one command at a time when it does not, and the same failure kinds either way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.handlers import Mailbox

from devtools.mailsink import _SinkController, _SinkHandler
from devtools.servers import free_port
from notify_svc.smtp import DeliveryError, SmtpProvider, SmtpSettings
from tests.smtp_sink import Sink


def email(to: list[str], subject: str = "Hello") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "opsmesh <noreply@opsmesh.test>"
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message.set_content("A line.\n.A line that starts with a dot.\n")
    return message


@pytest.fixture(params=[True, False], ids=["pipelining", "one-at-a-time"])
async def sink(request: pytest.FixtureRequest) -> AsyncIterator[Sink]:
    sink = Sink(pipelining=request.param).start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
async def provider(sink: Sink) -> AsyncIterator[SmtpProvider]:
    provider = SmtpProvider(SmtpSettings(port=sink.port, timeout=2.0, pool_size=1))
    try:
        yield provider
    finally:
        await provider.close()


def reads_by_command(sink: Sink) -> list[tuple[str, int]]:
    """Each command with the read it arrived in, counted from the transaction's first."""
    first = sink.commands[0][1]
    return [(command, read - first) for command, read in sink.commands]


async def test_envelope_and_data_go_in_one_write_when_pipelining_is_advertised() -> None:
    sink = Sink(pipelining=True).start()
    provider = SmtpProvider(SmtpSettings(port=sink.port, timeout=2.0, pool_size=1))
    try:
        to = ["ann@example.com", "bob@example.com"]
        for subject in ("first", "second"):  # a new connection, then the pooled one
            sink.commands.clear()
            assert await provider.send(email(to, subject), to) == "2.0.0 queued"
            # MAIL, both RCPTs and DATA in the same read: one round trip; the message after 354.
            assert reads_by_command(sink) == [
                ("MAIL", 0),
                ("RCPT", 0),
                ("RCPT", 0),
                ("DATA", 0),
                ("end of data", 1),
            ]
        assert [(m["Subject"], rcpt) for m, rcpt in sink.messages] == [
            ("first", to),
            ("second", to),
        ]
        # Dot-stuffing and line endings survive the pipelined DATA.
        assert sink.messages[0][0].get_content().splitlines() == [
            "A line.",
            ".A line that starts with a dot.",
        ]
    finally:
        await provider.close()
        sink.stop()


async def test_one_command_per_round_trip_when_pipelining_is_not_advertised() -> None:
    sink = Sink(pipelining=False).start()
    provider = SmtpProvider(SmtpSettings(port=sink.port, timeout=2.0, pool_size=1))
    try:
        to = ["ann@example.com", "bob@example.com"]
        assert await provider.send(email(to), to) == "2.0.0 queued"
        assert reads_by_command(sink) == [
            ("MAIL", 0),
            ("RCPT", 1),
            ("RCPT", 2),
            ("DATA", 3),
            ("end of data", 4),
        ]
        assert [rcpt for _, rcpt in sink.messages] == [to]
    finally:
        await provider.close()
        sink.stop()


async def test_a_refused_recipient_fails_for_good_and_nothing_is_sent(
    sink: Sink, provider: SmtpProvider
) -> None:
    sink.reject.add("ghost@example.com")
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ghost@example.com"]), ["ghost@example.com"])
    assert failure.value.permanent
    assert str(failure.value) == (
        "recipients refused: ghost@example.com: 550 5.1.1 <ghost@example.com>: no such user here"
    )
    assert sink.messages == []
    assert await provider.send(email(["ann@example.com"]), ["ann@example.com"]) == "2.0.0 queued"


async def test_the_other_recipients_still_get_the_message_when_one_is_refused(
    sink: Sink, provider: SmtpProvider
) -> None:
    sink.reject.add("ghost@example.com")
    to = ["ghost@example.com", "ann@example.com"]
    assert await provider.send(email(to), to) == "2.0.0 queued"
    assert [rcpt for _, rcpt in sink.messages] == [["ann@example.com"]]


@pytest.mark.parametrize(
    ("reply", "permanent"),
    [("550 5.7.1 sender not allowed", True), ("451 4.3.2 try again later", False)],
)
async def test_a_refused_sender_keeps_its_failure_kind(
    sink: Sink, provider: SmtpProvider, reply: str, permanent: bool
) -> None:
    sink.mail_reply = reply
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ann@example.com"]), ["ann@example.com"])
    assert (str(failure.value), failure.value.permanent) == (f"SMTP {reply}", permanent)
    assert sink.messages == []
    sink.mail_reply = ""
    assert await provider.send(email(["ann@example.com"]), ["ann@example.com"]) == "2.0.0 queued"


async def test_a_deferred_message_is_a_transient_failure(
    sink: Sink, provider: SmtpProvider
) -> None:
    sink.defer_next = 1
    with pytest.raises(DeliveryError) as failure:
        await provider.send(email(["ann@example.com"]), ["ann@example.com"])
    assert str(failure.value) == "SMTP 451 4.3.0 mailbox busy, try again later"
    assert not failure.value.permanent
    assert await provider.send(email(["ann@example.com"]), ["ann@example.com"]) == "2.0.0 queued"


async def test_a_reply_that_does_not_come_is_a_transient_failure_and_the_connection_goes(
    sink: Sink,
) -> None:
    provider = SmtpProvider(SmtpSettings(port=sink.port, timeout=0.3, pool_size=1))
    try:
        sink.reply_delay = 1.0
        with pytest.raises(DeliveryError) as failure:
            await provider.send(email(["ann@example.com"]), ["ann@example.com"])
        assert not failure.value.permanent
        assert str(failure.value).startswith("SMTP server unreachable: SMTPReadTimeoutError")
        sink.reply_delay = 0.0
        assert await provider.send(email(["bob@example.com"]), ["bob@example.com"]) == (
            "2.0.0 queued"
        )
    finally:
        await provider.close()


@asynccontextmanager
async def distant_relay(
    tmp_path: Path, round_trip: float, *, pipelining: bool, pool_size: int
) -> AsyncIterator[SmtpProvider]:
    """A provider sending to the dev sink with ``round_trip`` s of latency on the wire."""
    port = free_port()
    handler: Mailbox = _SinkHandler(tmp_path / "mail", pipelining=pipelining)
    controller = _SinkController(handler, round_trip=round_trip, hostname="127.0.0.1", port=port)
    controller.start()
    provider = SmtpProvider(SmtpSettings(port=port, timeout=5.0, pool_size=pool_size))
    try:
        yield provider
    finally:
        await provider.close()
        controller.stop()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
async def test_a_distant_relay_costs_two_round_trips_per_email_when_pipelining(
    tmp_path: Path, pipelining: bool
) -> None:
    """The dev sink's --round-trip delays what the client sends, not each reply: a pipelined
    group shares one round trip, as over a network."""
    round_trip = 0.2
    async with distant_relay(tmp_path, round_trip, pipelining=pipelining, pool_size=1) as provider:
        await provider.send(email(["ann@example.com"]), ["ann@example.com"])  # connects
        began = time.perf_counter()
        await provider.send(email(["bob@example.com"]), ["bob@example.com"])
        took = time.perf_counter() - began
    # Bounds a round trip apart from what the other mode takes, so a busy machine's slack
    # cannot turn one into the other.
    if pipelining:  # MAIL+RCPT+DATA, then the message
        assert 2 * round_trip <= took < 4 * round_trip
    else:  # MAIL, RCPT, DATA, the message
        assert 4 * round_trip <= took


async def test_a_burst_opens_its_connections_side_by_side(tmp_path: Path) -> None:
    """A cold pool opens a connection per concurrent send at once, not one after another."""
    round_trip = 0.2
    async with distant_relay(tmp_path, round_trip, pipelining=True, pool_size=4) as provider:
        began = time.perf_counter()
        await asyncio.gather(
            *(provider.send(email([f"u{n}@example.com"]), [f"u{n}@example.com"]) for n in range(4))
        )
        took = time.perf_counter() - began
    # Greeting, EHLO, MAIL+RCPT+DATA, the message: 4 round trips when the four connections
    # open together; opening them one by one would take at least 3 more round trips (the
    # bound leaves a busy machine most of one).
    assert 4 * round_trip <= took < 6.9 * round_trip
