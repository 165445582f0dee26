"""The task worker: durable pull consumers per task type, bounded concurrency, retries.

Run any number of replicas with ``python -m task_svc.worker``. For each message
the record in the bucket is the truth: a task already finished is acknowledged
and skipped (a redelivery); a task whose running attempt holds a live lease
(task_svc/lease.py) is left to its worker and the message comes back later;
otherwise the worker claims it with a lease of its own, renews the lease (and
JetStream's ack deadline) while the handler runs, and records the outcome
*before* acknowledging, so a crash at any point leads to a redelivery or a
takeover by the reaper (task_svc/reaper.py), never to a lost task. Once a task
is final its open-task marker is removed too (task_svc/outbox.py). Transient
failures are retried with exponential backoff and jitter through
``nak(delay)``; after the type's last attempt the task is failed and kept as a
dead letter for RetryTask. docs/tasks.md has the whole lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import nats.errors
from google.protobuf.message import DecodeError
from grpc import aio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mesh.backoff import half_jitter
from mesh.clients import Credentials, ServiceCredentials, trusted_headers
from mesh.context import Principal
from mesh.errors import DependencyUnavailable, NotFound
from mesh.health import Probe
from mesh.logs import configure_logging
from mesh.natsconn import close_nats, connect_nats
from mesh.server import RunnerOptions, ServiceRunner, run_main
from opsmesh.task.v1 import task_pb2
from task_svc import lease, states
from task_svc.attempt import AttemptContext, LeaseKeeper, quietly
from task_svc.config import TYPE_NAMES, RetryPolicy, WorkerSettings
from task_svc.delivery import ProvisioningEmails, email_handler
from task_svc.handlers import (
    Handler,
    PermanentError,
    TaskBusy,
    TaskCancelled,
    email_without_notifier,
    workspace_without_cluster,
)
from task_svc.outbox import close_unconfirmed
from task_svc.queue import MARKER_HEADER, REVISION_HEADER, Publisher
from task_svc.reaper import Reaper, ReaperSettings
from task_svc.store import TaskStore, now
from task_svc.workspace import KubeClient, workspace_handler

log = logging.getLogger("opsmesh.worker")


def backoff(retry: int, policy: RetryPolicy) -> float:
    """Delay before retry number ``retry`` (1-based): exponential, capped, half of it jittered."""
    return half_jitter(retry, base=policy.backoff_base, cap=policy.backoff_cap)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.finished = Counter(
            "opsmesh_tasks_finished_total",
            "Task attempts finished by this worker, by type and outcome.",
            ["type", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "opsmesh_task_attempt_seconds",
            "Duration of task attempts.",
            ["type"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "opsmesh_tasks_in_flight", "Tasks this worker is running.", registry=registry
        )


class Worker:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        store: TaskStore,
        settings: WorkerSettings,
        handlers: Mapping[int, Handler],
        registry: CollectorRegistry | None = None,
        reaper: Reaper | None = None,
    ) -> None:
        self._js = js
        self._reaper = reaper
        self.store = store
        self._settings = settings
        self._handlers = dict(handlers)
        self.metrics = WorkerMetrics(registry or CollectorRegistry())
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for task_type in self._handlers:
            await self._subscribe(task_type)  # fail fast if JetStream is not there
            self._loops.append(
                asyncio.create_task(self._fetch_loop(task_type), name=f"fetch-{task_type}")
            )
        if self._reaper is not None:
            self._loops.append(asyncio.create_task(self._reaper.run(self._stopping), name="reaper"))
        log.info(
            "worker %s consuming %s with %d slots",
            self._settings.worker_id,
            ", ".join(TYPE_NAMES[t] for t in self._handlers),
            self._settings.concurrency,
        )

    async def _subscribe(self, task_type: int) -> JetStreamContext.PullSubscription:
        topology = self._settings.topology
        return await self._js.pull_subscribe(
            topology.subject(task_type),
            durable=topology.consumer(task_type),
            stream=topology.stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._settings.ack_wait,
                deliver_policy=DeliverPolicy.ALL,
                max_deliver=-1,  # attempts are counted on the record, per task type
                max_ack_pending=max(1000, self._settings.concurrency * 4),
            ),
        )

    async def _fetch_loop(self, task_type: int) -> None:
        subscription: JetStreamContext.PullSubscription | None = None
        failures = 0
        while not self._stopping.is_set():
            free = self._settings.concurrency - len(self._in_flight)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                if subscription is None:
                    subscription = await self._subscribe(task_type)
                messages = await subscription.fetch(batch=free, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as error:  # noqa: BLE001 - any fetch failure: resubscribe
                # After a NATS restart the pull subscription may be gone: make a new one.
                failures += 1
                if failures == 1:
                    log.warning("fetching %s tasks failed: %s", TYPE_NAMES[task_type], error)
                subscription = None
                await asyncio.sleep(min(5.0, 0.2 * failures))
                continue
            failures = 0
            for message in messages:
                job = asyncio.create_task(self._process(message))
                self._in_flight.add(job)
                self.metrics.in_flight.inc()
                job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Task[None]) -> None:
        self._in_flight.discard(job)
        self.metrics.in_flight.dec()
        self._slot_freed.set()
        if not job.cancelled() and job.exception() is not None:
            log.error("task processing crashed", exc_info=job.exception())

    async def _process(self, message: Msg) -> None:
        try:
            queued = task_pb2.Task.FromString(message.data)
            revision = int((message.headers or {})[REVISION_HEADER])
            if not queued.id or not queued.org_id:
                raise ValueError("no task id")
        except (DecodeError, KeyError, ValueError):
            log.error("dropping an unreadable work message: %r", message.data[:200])
            await message.term()
            return
        try:
            await self._run(queued, revision, message)
        except DependencyUnavailable as error:
            # The record could not be read or written: leave the message to be redelivered.
            log.warning("task %s: %s; will be redelivered", queued.id, error.message)
            await quietly(message.nak(delay=2.0))

    async def _run(self, queued: task_pb2.Task, revision: int, message: Msg) -> None:
        policy = self._settings.retry[queued.type]
        start = lease.claim(self._settings.worker_id, self._settings.lease_ttl, policy.max_attempts)
        try:
            # Starts from the copy in the message; the compare-and-set re-reads the record
            # only if it changed since it was queued.
            task, revision = await self.store.change(
                queued.org_id, queued.id, start, known=(queued, revision)
            )
        except lease.AlreadyFinished:
            await message.ack()  # a redelivery, or cancelled while queued
            await self._close_marker(queued, message)
            return
        except lease.LeaseHeld as held:
            # Another worker runs it (a second message, or a redelivery after a NATS
            # restart): look again once its lease could have lapsed.
            await quietly(message.nak(delay=held.remaining + self._lease_interval()))
            return
        except NotFound:
            log.warning("task %s has no record; dropping its message", queued.id)
            await message.ack()
            return
        if task.status == states.FAILED:
            await message.ack()  # its last attempt's worker died: recorded as failed
            await self._close_marker(task, message)
            return
        context = AttemptContext(self.store, task, revision, worker_id=self._settings.worker_id)
        await self._attempt(context, message, policy)

    def _lease_interval(self) -> float:
        return min(self._settings.lease_ttl, self._settings.ack_wait) / 3

    async def _attempt(self, context: AttemptContext, message: Msg, policy: RetryPolicy) -> None:
        task = context.task
        type_name = TYPE_NAMES[task.type]
        handler = asyncio.create_task(_call(self._handlers[task.type], context))
        keeper = LeaseKeeper(
            context,
            message,
            handler,
            ttl=self._settings.lease_ttl,
            interval=self._lease_interval(),
        )
        started = time.perf_counter()
        outcome = "handed_back"
        try:
            outcome = await self._outcome(context, handler, keeper, message, policy)
        except lease.LeaseLost:
            # Taken over while running: the new owner records the outcome. The message goes
            # back so that nothing is acknowledged on an outcome this worker did not record.
            outcome = "lease_lost"
            log.warning("task %s: lease lost", task.id, extra=_task_extra(context))
            await quietly(message.nak())
        finally:
            keeper.cancel()
            self.metrics.finished.labels(type=type_name, outcome=outcome).inc()
            self.metrics.duration.labels(type=type_name).observe(time.perf_counter() - started)

    async def _outcome(
        self,
        context: AttemptContext,
        handler: asyncio.Task[None],
        keeper: LeaseKeeper,
        message: Msg,
        policy: RetryPolicy,
    ) -> str:
        """Awaits the handler, records what came of it, then acks (or naks); the outcome's name."""
        try:
            await handler
        except asyncio.CancelledError:
            if keeper.stopped is None:  # the worker itself is stopping
                await asyncio.shield(self._hand_back(context, message))
                raise
            if isinstance(keeper.stopped, lease.LeaseLost):
                raise keeper.stopped from None
            return await self._settle(context, message, states.CANCELLED, "cancelled while running")
        except TaskCancelled:
            return await self._settle(context, message, states.CANCELLED, "cancelled while running")
        except TaskBusy as busy:
            await self._finish(context, states.RETRYING, str(busy))
            await message.nak(delay=busy.retry_after)
            return "deferred"
        except PermanentError as error:
            log.error("task %s failed: %s", context.task.id, error, extra=_task_extra(context))
            await self._settle(context, message, states.FAILED, str(error))
            return "failed"
        except (DependencyUnavailable, lease.LeaseLost):
            raise
        except Exception as error:  # noqa: BLE001 - anything else is transient by contract
            return await self._failed_attempt(context, message, policy, error)
        return await self._settle(context, message, states.SUCCEEDED, "")

    async def _settle(self, context: AttemptContext, message: Msg, status: int, error: str) -> str:
        """Records a final outcome, then acknowledges the message and closes the task's marker."""
        await self._finish(context, status, error)
        await message.ack()
        await self._close_marker(context.task, message)
        return states.name(status)

    async def _close_marker(self, task: task_pb2.Task, message: Msg) -> None:
        """Removes the open-task marker named by the message, now that the task is final.

        Neither this nor the ack waits for an answer, so both go out in one socket write.
        """
        marker = _marker_revision(message)
        if marker:
            await quietly(close_unconfirmed(self.store.bucket_stream, task.org_id, task.id, marker))

    async def _failed_attempt(
        self, context: AttemptContext, message: Msg, policy: RetryPolicy, error: Exception
    ) -> str:
        detail = f"{type(error).__name__}: {error}"
        retries = context.task.retry_count + 1
        if retries >= policy.max_attempts:
            log.error(
                "task %s failed for good after %d attempts: %s",
                context.task.id,
                policy.max_attempts,
                detail,
                extra=_task_extra(context),
            )
            await self._settle(
                context,
                message,
                states.FAILED,
                f"{detail} (gave up after {policy.max_attempts} attempts)",
            )
            return "dead_letter"
        delay = backoff(retries, policy)
        log.warning(
            "task %s attempt %d failed, retrying in %.1fs: %s",
            context.task.id,
            context.attempt,
            delay,
            detail,
            extra=_task_extra(context),
        )
        await self._finish(context, states.RETRYING, detail, retry=True)
        await message.nak(delay=delay)
        return "retrying"

    async def _finish(
        self, context: AttemptContext, status: int, error: str, *, retry: bool = False
    ) -> None:
        def finish(record: task_pb2.Task) -> None:
            record.status = status  # type: ignore[assignment]
            record.error = error
            if retry:
                record.retry_count += 1
            record.attempts[-1].ended_at.CopyFrom(now())
            record.attempts[-1].error = error

        await context.change(finish)

    async def _hand_back(self, context: AttemptContext, message: Msg) -> None:
        """Returns a task the worker could not finish before stopping: queued again at once."""
        try:
            await self._finish(context, states.RETRYING, "worker stopped before finishing")
            await message.nak()
        except Exception as error:  # noqa: BLE001 - best effort; redelivery covers it
            # Not acknowledged either way: JetStream redelivers it after ack_wait, and the
            # lease lapses for whoever gets it.
            log.warning("could not hand back task %s: %s", context.task.id, error)

    async def stop(self) -> None:
        """Stops fetching; running tasks get the grace period, the rest are handed back."""
        self._stopping.set()
        self._slot_freed.set()
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._in_flight:
            log.info("draining %d running tasks", len(self._in_flight))
            _, pending = await asyncio.wait(
                set(self._in_flight), timeout=self._settings.server.grace_period
            )
            for job in pending:
                job.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def js(self) -> JetStreamContext:
        return self._js

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)


def _marker_revision(message: Msg) -> int:
    """The marker revision the message names; 0 for none (or one this code cannot read)."""
    try:
        return int((message.headers or {}).get(MARKER_HEADER, 0))
    except ValueError:
        return 0


async def _call(handler: Handler, context: AttemptContext) -> None:
    await handler(context)


def _task_extra(context: AttemptContext) -> dict[str, object]:
    """Log fields that tie a line to its task and organization (a worker has no caller)."""
    return {"task_id": context.task.id, "org_id": context.task.org_id, "attempt": context.attempt}


def handlers_for(
    settings: WorkerSettings,
) -> tuple[dict[int, Handler], list[Callable[[], Awaitable[None]]]]:
    """The handlers a worker runs by its settings, and what to close when it stops."""
    handlers: dict[int, Handler] = {
        task_pb2.TASK_TYPE_WORKSPACE: workspace_without_cluster,
        task_pb2.TASK_TYPE_EMAIL: email_without_notifier,
    }
    closers: list[Callable[[], Awaitable[None]]] = []
    emails: ProvisioningEmails | None = None
    credentials: Credentials = trusted_headers
    if settings.service_client.token_url:
        client = settings.service_client
        service = ServiceCredentials(
            token_url=client.token_url, client_id=client.client_id, secret=client.secret
        )
        credentials = service
        closers.append(service.close)
    if settings.notify_address:
        channel = aio.insecure_channel(settings.notify_address)
        handlers[task_pb2.TASK_TYPE_EMAIL] = email_handler(channel, credentials=credentials)
        emails = ProvisioningEmails(channel, credentials=credentials)
        closers.append(functools.partial(channel.close, None))
    if settings.kube.api:
        kube = KubeClient(settings.kube)
        handlers[task_pb2.TASK_TYPE_WORKSPACE] = workspace_handler(kube, emails)
        closers.append(kube.close)
    return handlers, closers


def reaper_for(
    client: Client,
    js: JetStreamContext,
    store: TaskStore,
    settings: WorkerSettings,
    handlers: Mapping[int, Handler],
    registry: CollectorRegistry,
) -> Reaper:
    return Reaper(
        nc=client,
        js=js,
        store=store,
        publisher=Publisher(js, settings.topology, timeout=settings.nats.request_timeout),
        settings=ReaperSettings(
            topology=settings.topology,
            retry=settings.retry,
            types=tuple(handlers),
            interval=settings.reap_interval,
            outbox_grace=settings.outbox_grace,
        ),
        registry=registry,
    )


async def serve(environ: Mapping[str, str], handlers: Mapping[int, Handler] | None = None) -> None:
    settings = WorkerSettings.from_env(environ)
    configure_logging(
        service="task_worker", level=settings.server.log_level, fmt=settings.server.log_format
    )
    client: Client = await connect_nats(settings.nats, name=f"task-worker-{settings.worker_id}")
    js = client.jetstream(timeout=settings.nats.request_timeout)
    store = await TaskStore.open(
        client, js, settings.topology, request_timeout=settings.nats.request_timeout
    )
    registry = CollectorRegistry()
    configured, closers = handlers_for(settings)
    chosen = handlers or configured
    worker = Worker(
        js=js,
        store=store,
        settings=settings,
        handlers=chosen,
        registry=registry,
        reaper=reaper_for(client, js, store, settings, chosen, registry),
    )

    async def nats_connected() -> None:
        if not client.is_connected:
            raise ConnectionError("not connected to NATS")

    runner = ServiceRunner(
        settings=settings.server,
        registrations=[],
        authenticator=_NoCallers(),
        probes=[Probe(name="nats", check=nats_connected)],
        options=RunnerOptions(
            on_stop=(worker.stop, functools.partial(close_nats, client), *closers)
        ),
        registry=registry,
    )
    await worker.start()
    await runner.serve_until_signalled()


class _NoCallers:
    """The worker serves only health and reflection, which need no identity."""

    async def authenticate(self, metadata: Mapping[str, str], method: str) -> Principal:
        raise NotImplementedError  # pragma: no cover - no protected methods exist


def main() -> None:
    run_main("task worker", serve, WorkerSettings)


if __name__ == "__main__":
    main()
