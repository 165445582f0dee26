"""Emails per second to a local SMTP sink: pooled connections vs one connection per email.

Both sides send the same rendered invitation (notify_svc's templates and MIME
builder) to the dev mail sink (aiosmtpd, storing into a Maildir) in its own
process, with the same concurrency, over plain SMTP and over STARTTLS (what a
real relay requires; the target is judged there):
* pooled: notify_svc's SmtpProvider (connections opened once, reused);
* baseline: connect, EHLO, send, QUIT for every email (aiosmtplib.send).
Loopback makes a connection cost almost nothing, so the last rows put the relay
--round-trip (20 ms) away (what the client sends reaches the sink that late) and send
with --distant-concurrency (32) connections. The sink advertises PIPELINING (RFC 2920)
like real relays, so the pooled sender needs two round trips per email (MAIL+RCPT+DATA,
then the message); the last row turns it off (four round trips) for comparison. The
per-connection baseline (aiosmtplib.send) never pipelines: greeting, EHLO, STARTTLS,
EHLO, MAIL, RCPT, DATA, message, QUIT.
Targets: >= 300 emails/s pooled (also 20 ms away) and >= 5x the per-connection baseline
(judged on the STARTTLS loopback row; the ratios 20 ms away are printed beside it).

    .venv/bin/python bench/notify_bench.py [--emails 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib
import uvloop
from measure import cpu_seconds

from devtools.servers import ManagedProcess, free_port
from notify_svc.catalog import Catalog
from notify_svc.messages import build_message
from notify_svc.rendering import Renderer
from notify_svc.smtp import SmtpProvider, SmtpSettings
from opsmesh.notify.v1 import notify_pb2

INVITE = {"org_name": "Acme", "inviter_name": "Ada", "accept_url": "https://opsmesh.example/j/1"}


async def rate(send: Callable[[int], Awaitable[object]], count: int, concurrency: int) -> float:
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await send(index)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - began)


def self_signed(workdir: Path) -> tuple[str, str]:
    cert, key = str(workdir / "cert.pem"), str(workdir / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def measure(
    args: argparse.Namespace,
    workdir: Path,
    *,
    starttls: bool,
    round_trip: float = 0.0,
    concurrency: int = 8,
    pipelining: bool = True,
) -> tuple[float, float, float, float]:
    """Pooled and per-connection emails/s, and the CPU seconds per pooled email of the sender
    (this process) and of the sink: a price the machine's load does not change."""
    port = free_port()
    cert, key = self_signed(workdir) if starttls else ("", "")
    sink = ManagedProcess(
        "mail_sink",
        [
            sys.executable,
            "-m",
            "devtools.mailsink",
            "serve",
            str(workdir / "mail"),
            "--port",
            str(port),
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--round-trip",
            str(round_trip),
            *(() if pipelining else ("--no-pipelining",)),
        ],
        log_path=workdir / "sink.log",
        ready=re.compile("mail sink listening"),
    )
    sink.start()
    try:
        catalog, renderer = Catalog(), Renderer()
        spec = catalog.get("org_invitation")
        rendered = renderer.render(spec, "en", spec.check(INVITE))
        request = notify_pb2.SendEmailRequest(
            template="org_invitation", to=[notify_pb2.Recipient(address="bob@example.com")]
        )
        settings = SmtpSettings(
            port=port,
            pool_size=concurrency,
            ca_file=cert,
            security="starttls" if starttls else "none",
        )

        def message(index: int) -> tuple[object, list[str]]:
            return build_message(
                notification_id=f"bench-{index}",
                sender=settings.sender,
                request=request,
                rendered=rendered,
            )

        provider = SmtpProvider(settings)

        async def pooled(index: int) -> object:
            mail, recipients = message(index)
            return await provider.send(mail, recipients)  # type: ignore[arg-type]

        tls = ssl.create_default_context(cafile=cert) if starttls else None

        async def one_connection_each(index: int) -> object:
            mail, recipients = message(index)
            return await aiosmtplib.send(
                mail,
                hostname="127.0.0.1",
                port=port,
                recipients=recipients,  # type: ignore[arg-type]
                sender="noreply@opsmesh.localhost",
                start_tls=starttls,
                tls_context=tls,
            )

        await pooled(0)  # warm the pool
        sender_cpu, sink_cpu = time.process_time(), cpu_seconds(sink.pid)
        pooled_rate = await rate(pooled, args.emails, concurrency)
        sender_cpu = (time.process_time() - sender_cpu) / args.emails
        sink_cpu = (cpu_seconds(sink.pid) - sink_cpu) / args.emails
        await provider.close()
        baseline_rate = await rate(one_connection_each, args.emails // 4, concurrency)
        return pooled_rate, baseline_rate, sender_cpu, sink_cpu
    finally:
        sink.stop()


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    distant = f"STARTTLS, {args.round_trip * 1000:g} ms/reply"
    print(
        f"notify bench: {args.emails} emails pooled, {args.emails // 4} one connection each, "
        f"{args.concurrency} concurrent senders ({args.distant_concurrency} for the relay "
        f"{args.round_trip * 1000:g} ms away), sink: aiosmtpd -> Maildir\n"
    )
    print(
        f"{'':<40}{'pooled/s':>10}{'per-connection/s':>18}{'ratio':>8}"
        f"{'CPU/pooled email: sender':>27}{'sink':>8}"
    )
    rows = (
        ("plain SMTP", False, 0.0, args.concurrency, True),
        ("STARTTLS (as relays)", True, 0.0, args.concurrency, True),
        (distant, True, args.round_trip, args.distant_concurrency, True),
        (f"{distant}, no PIPELINING", True, args.round_trip, args.distant_concurrency, False),
    )
    results = {}
    for label, starttls, round_trip, concurrency, pipelining in rows:
        pooled_rate, baseline_rate, sender_cpu, sink_cpu = await measure(
            args,
            workdir,
            starttls=starttls,
            round_trip=round_trip,
            concurrency=concurrency,
            pipelining=pipelining,
        )
        ratio = pooled_rate / baseline_rate
        results[label] = (pooled_rate, ratio)
        print(
            f"{label:<40}{pooled_rate:>10.0f}{baseline_rate:>18.0f}{ratio:>7.2f}x"
            f"{sender_cpu * 1e6:>24.0f} us{sink_cpu * 1e6:>5.0f} us"
        )
    pooled_rate, ratio = results["STARTTLS (as relays)"]
    far_rate, far_ratio = results[distant]
    print(
        f"\nwith STARTTLS: pooled {pooled_rate:.0f} emails/s (target >= 300/s), "
        f"{ratio:.2f}x one connection per email (target >= 5x); a relay "
        f"{args.round_trip * 1000:g} ms away: pooled {far_rate:.0f}/s (target >= 300/s), "
        f"{far_ratio:.2f}x"
    )
    ok = pooled_rate >= 300 and ratio >= 5 and far_rate >= 300
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--emails", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--round-trip", type=float, default=0.02, help="seconds per SMTP reply of the far relay"
    )
    parser.add_argument(
        "--distant-concurrency",
        type=int,
        default=32,
        help="senders (and pooled connections) for the far relay: latency, not CPU, bounds it",
    )
    raise SystemExit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
