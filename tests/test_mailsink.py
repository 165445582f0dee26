"""The dev mail sink as a distant relay: every reply late by the round trip asked for."""

from __future__ import annotations

import time
from pathlib import Path

import aiosmtplib
from aiosmtpd.handlers import Mailbox

from devtools.mailsink import _SinkController
from devtools.servers import free_port


async def test_a_distant_sink_answers_each_command_one_round_trip_late(tmp_path: Path) -> None:
    timings = {}
    for round_trip in (0.0, 0.1):
        port = free_port()
        controller = _SinkController(
            Mailbox(tmp_path / f"mail-{round_trip}"),
            round_trip=round_trip,
            hostname="127.0.0.1",
            port=port,
        )
        controller.start()
        try:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            await client.connect()
            await client.ehlo()  # a multi-line reply: late once, not once per line
            began = time.perf_counter()
            for _ in range(3):
                await client.noop()
            timings[round_trip] = time.perf_counter() - began
            await client.quit()
        finally:
            controller.stop()
    assert timings[0.0] < 0.1
    assert 0.3 <= timings[0.1] < 0.6
