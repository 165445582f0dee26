"""DeliverNotification end to end: the claimed, shielded delivery vs the unclaimed baseline.

Each delivery is one real gRPC call to notify_svc (in-process, trusted headers, the task
worker's service role) that reads the record from Redis, renders, sends over SMTP to the dev
mail sink (aiosmtpd -> Maildir, its own process) and records the outcome. The new path adds a
Redis claim (SET NX PX, renewed, compare-and-delete) and runs the send as a shielded task.

The baseline is the same script run against a checkout without the change (``--baseline``,
e.g. a ``git clone`` at 4408011), in a child process with that tree first on ``sys.path``;
both run in one go and the ratio is printed. Target: the new path within 15% of the baseline.

    .venv/bin/python bench/notify_deliver_bench.py --baseline /tmp/base [--deliveries 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from grpc import aio

from devtools.servers import ManagedProcess, RedisServer, free_port
from mesh.redisconn import RedisSettings, connect_redis
from mesh.settings import ServerSettings
from notify_svc.config import NotifySettings
from notify_svc.server import build_runner
from notify_svc.smtp import SmtpSettings
from notify_svc.store import NotificationStore
from notify_svc.webhooks import WebhookSettings
from opsmesh.notify.v1 import notify_pb2, notify_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
SERVICE = (("x-opsmesh-user-id", "task-worker"), ("x-opsmesh-org-id", "acme"))
ROLES = (("x-opsmesh-roles", "service"),)
INVITE = {"org_name": "Acme", "inviter_name": "Ada", "accept_url": "https://opsmesh.example/j/1"}


async def queue(store: NotificationStore, count: int) -> list[str]:
    """``count`` queued invitations, written straight to the store (no task service needed)."""
    ids = []
    for _ in range(count):
        request = notify_pb2.SendEmailRequest(
            template="org_invitation", to=[notify_pb2.Recipient(address="bob@example.com")]
        )
        request.data.update(INVITE)
        notification = notify_pb2.Notification(
            id=str(uuid.uuid4()),
            org_id="acme",
            template="org_invitation",
            locale="en",
            recipients=list(request.to),
            status=notify_pb2.NOTIFICATION_STATUS_QUEUED,
        )
        await store.create(notification, request)
        ids.append(notification.id)
    return ids


async def deliveries_per_second(
    stub: notify_pb2_grpc.NotificationServiceAsyncStub, ids: list[str], concurrency: int
) -> float:
    pending = list(reversed(ids))

    async def caller() -> None:
        while pending:
            notification_id = pending.pop()
            await stub.DeliverNotification(
                notify_pb2.DeliverNotificationRequest(notification_id=notification_id),
                metadata=SERVICE + ROLES,
                timeout=30,
            )

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(ids) / (time.perf_counter() - began)


async def measure(deliveries: int, concurrency: int) -> float:
    """Deliveries per second of the notify_svc importable here (this tree or the baseline's)."""
    workdir = Path(tempfile.mkdtemp(prefix="notify-deliver-bench-"))
    redis = RedisServer(workdir / "redis").start()
    port = free_port()
    serve = ("serve", str(workdir / "mail"), "--port", str(port))
    sink = ManagedProcess(
        "mail_sink",
        [sys.executable, "-m", "devtools.mailsink", *serve],
        log_path=workdir / "sink.log",
        ready=re.compile("mail sink listening"),
    )
    sink.start()
    settings = NotifySettings(
        server=ServerSettings(port=0),
        redis=RedisSettings(url=redis.url),
        smtp=SmtpSettings(port=port, pool_size=concurrency),
        task_address=f"127.0.0.1:{free_port()}",
        webhooks=WebhookSettings(port=0),
    )
    runner, _ = build_runner(settings)
    client = connect_redis(settings.redis)
    try:
        await runner.start()
        store = NotificationStore(client, key_prefix=settings.key_prefix, retention_ms=3_600_000)
        async with aio.insecure_channel(f"127.0.0.1:{runner.port}") as channel:
            stub = notify_pb2_grpc.NotificationServiceStub(channel)
            await deliveries_per_second(stub, await queue(store, 50), concurrency)  # warm-up
            return await deliveries_per_second(stub, await queue(store, deliveries), concurrency)
    finally:
        await client.aclose()
        await runner.stop()
        sink.stop()
        redis.stop()


def baseline_rate(tree: Path, deliveries: int, concurrency: int) -> float:
    """The same measurement in a child process that imports notify_svc and mesh from ``tree``."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    # This file by its path: the baseline's bench/ does not have it.
    script = (
        "import asyncio, json, runpy; "
        f"measure = runpy.run_path({str(Path(__file__).resolve())!r})['measure']; "
        f"print(json.dumps(asyncio.run(measure({deliveries}, {concurrency}))))"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tree, capture_output=True, text=True
    )
    if child.returncode != 0:
        raise SystemExit(f"baseline run failed:\n{child.stderr[-2000:]}")
    return float(json.loads(child.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout without it")
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"DeliverNotification: {args.deliveries} deliveries, {args.concurrency} concurrent "
        "callers, real Redis, gRPC and SMTP (aiosmtpd -> Maildir)\n"
    )
    # Alternate the runs so both see the same machine conditions; the best of each counts.
    new: list[float] = []
    old: list[float] = []
    for _ in range(args.rounds):
        new.append(asyncio.run(measure(args.deliveries, args.concurrency)))
        old.append(baseline_rate(args.baseline, args.deliveries, args.concurrency))
    rounds = ", ".join(f"{n:.0f}/{o:.0f}" for n, o in zip(new, old, strict=True))
    print(f"rounds (new/baseline deliveries/s): {rounds}")
    best_new, best_old = max(new), max(old)
    print(f"{'':<34}{'deliveries/s':>14}")
    print(f"{'baseline (no claim, no shield)':<34}{best_old:>14.0f}")
    print(f"{'claimed + shielded (this tree)':<34}{best_new:>14.0f}")
    ratio = best_new / best_old
    print(f"\nratio new/baseline: {ratio:.2f} (target >= 0.85)")
    raise SystemExit(0 if ratio >= 0.85 else 1)


if __name__ == "__main__":
    main()
