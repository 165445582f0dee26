"""The reaper: brings back what crashes left behind, and measures the true queue depth.

Every worker replica runs one; a pass walks the open-task markers
(task_svc/outbox.py) and, for each task,

* final, or never recorded (a publish that failed half-way): removes the marker;
* running with a stale lease (its worker died): queues a message for it, which the
  worker that gets it takes over (or fails the task when no attempt is left);
* recorded and never published for longer than the outbox grace: publishes it,
  with the message id of the first publish so JetStream drops it if that one
  did get through;
* pending or retrying, unchanged for the grace, while its type's consumer holds
  no message at all: its message was lost (nats-server 2.9 can lose its last
  writes to a SIGKILL): publishes it again (message id = record version).

Every change is a compare-and-set and every publish carries a message id, so
any number of reapers can run at once.

Queue depth: JetStream's stream count is not the backlog after an unclean
NATS restart. nats-server 2.9 may come back with messages that its consumer
had acknowledged (its ack floor is past them) still in the work-queue stream:
the removal that an ack triggers had not reached the disk. No consumer ever
delivers them again, so they would stay forever. The reaper purges a type's
messages below its consumer's ack floor when the stream holds more than the
consumer has pending, and exports the depth from the consumer's own counts
(``num_pending + num_ack_pending``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh.errors import DependencyUnavailable, NotFound
from mesh.natsconn import jetstream_request, nats_errors
from opsmesh.task.v1 import task_pb2
from task_svc import lease, states
from task_svc.config import TYPE_NAMES, RetryPolicy, Topology
from task_svc.outbox import Marker, OpenTasks
from task_svc.queue import Publisher
from task_svc.store import TaskStore

log = logging.getLogger("opsmesh.reaper")


class ReaperMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_depth = Gauge(
            "opsmesh_task_queue_depth",
            "Task messages waiting or being worked on (the work consumer's pending plus "
            "unacknowledged messages), by type. Every worker replica reports the same value.",
            ["type"],
            registry=registry,
        )
        self.reaped = Counter(
            "opsmesh_tasks_reaped_total",
            "Tasks the reaper brought back, by what it did: taken_over (stale lease), "
            "published (outbox), purged (acknowledged messages left in the stream).",
            ["action"],
            registry=registry,
        )
        self.swept = Counter(
            "opsmesh_task_marker_tombstones_swept_total",
            "Tombstones of open-task markers removed from the records bucket by a reaper's sweep.",
            registry=registry,
        )


@dataclass
class PassReport:
    """What one pass did (for tests and logs)."""

    taken_over: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    closed: int = 0
    purged: int = 0
    swept: int = 0
    """Tombstones of removed markers swept away."""


@dataclass(frozen=True, kw_only=True)
class ReaperSettings:
    topology: Topology
    retry: Mapping[int, RetryPolicy]
    types: Collection[int]
    interval: float
    outbox_grace: float
    sweep_after: int = 1000
    """Tombstones of removed markers a pass meets before it sweeps them (task_svc/outbox.py)."""


class Reaper:
    def __init__(
        self,
        *,
        nc: Client,
        js: JetStreamContext,
        store: TaskStore,
        publisher: Publisher,
        settings: ReaperSettings,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._timeout = publisher.timeout
        self._store = store
        self._open = OpenTasks(store)
        self._publisher = publisher
        self._settings = settings
        self.metrics = ReaperMetrics(registry or CollectorRegistry())

    async def run(self, stopping: asyncio.Event) -> None:
        """A pass every ``interval`` until ``stopping`` is set; a failed pass is tried again."""
        while not stopping.is_set():
            try:
                await self.reap()
            except Exception as error:  # noqa: BLE001 - NATS away or a bug: keep the loop alive
                log.warning("reaper pass failed: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._settings.interval)

    async def reap(self) -> PassReport:
        report = PassReport()
        idle: set[int] = set()
        for task_type in self._settings.types:
            depth, purged = await self._measure(task_type)
            report.purged += purged
            if depth == 0:
                idle.add(task_type)
        survey = await self._open.survey()
        for marker in survey.markers:
            try:
                await self._visit(marker, report, idle)
            except DependencyUnavailable:
                raise
            except Exception:  # one odd record must not stop the pass
                log.exception("reaper: task %s", marker.task_id)
        if len(survey.tombstones) >= self._settings.sweep_after:
            report.swept = await self._open.sweep(survey)
            self.metrics.swept.inc(report.swept)
        return report

    async def _visit(self, marker: Marker, report: PassReport, idle: Collection[int]) -> None:
        try:
            task, revision = await self._store.read(marker.org_id, marker.task_id)
        except NotFound:
            if marker.age() > self._settings.outbox_grace:
                await self._open.close(marker)  # its publish failed half-way
                report.closed += 1
            return
        if task.status in states.TERMINAL:
            await self._open.close(marker)
            report.closed += 1
        elif lease.is_stale(task):
            await self._take_over(task, revision, marker)
            report.taken_over.append(task.id)
        elif task.type in idle and self._unchanged_for_grace(task):
            # Waiting, yet its consumer holds no message at all: the message was lost (an
            # unclean NATS restart can drop the last writes) or never published. It may
            # have been stored first, so the message id names the marker's revision: the
            # first id is in JetStream's duplicate window for two minutes, and a message
            # under it would be dropped. Reapers that read the same marker still send one.
            await self._publish(task, revision, report, resend=marker.revision)
            await self._open.requeued(marker)
        elif not marker.queued and marker.age() > self._settings.outbox_grace:
            if task.status == states.PENDING:
                # Dropped by JetStream as a duplicate if the first publish got through.
                await self._publish(task, revision, report)
            await self._open.requeued(marker)

    def _unchanged_for_grace(self, task: task_pb2.Task) -> bool:
        idle_for = time.time() - task.updated_at.ToNanoseconds() / 1e9
        return task.status in (states.PENDING, states.RETRYING) and (
            idle_for > self._settings.outbox_grace
        )

    async def _publish(
        self, task: task_pb2.Task, revision: int, report: PassReport, *, resend: int = 0
    ) -> None:
        await self._publisher.publish(task, revision, resend=resend)
        self.metrics.reaped.labels(action="published").inc()
        report.published.append(task.id)

    async def _take_over(self, task: task_pb2.Task, revision: int, marker: Marker) -> None:
        """Queues a message for a task whose worker died; the worker that gets it takes over.

        The record is left as it is: the taking worker's claim closes the stale attempt by
        compare-and-set (see lease.claim), so a reaper that crashes half-way changes
        nothing. The message id names the record's version, so reapers that find the same
        stale attempt queue one message between them. The marker is left as it is too, so
        the message names it: the worker that finishes the task removes it.
        """
        await self._publisher.publish(task, revision, marker=marker.revision)
        log.warning(
            "task %s: the lease of %s lapsed; queued for another worker",
            task.id,
            task.attempts[-1].worker,
            extra={"task_id": task.id, "org_id": task.org_id},
        )
        self.metrics.reaped.labels(action="taken_over").inc()

    async def _measure(self, task_type: int) -> tuple[int, int]:
        """Exports the type's queue depth and purges acknowledged leftovers: (depth, purged)."""
        topology = self._settings.topology
        subject = topology.subject(task_type)
        with nats_errors():
            consumer = await self._js.consumer_info(topology.stream, topology.consumer(task_type))
            depth = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
            stored = await self._stored(subject)
            purged = 0
            ack_floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
            if stored > depth and ack_floor:
                purged = await self._purge_below(subject, ack_floor + 1)
        if purged:
            log.warning(
                "purged %d acknowledged %s message(s) left in the work stream",
                purged,
                TYPE_NAMES[task_type],
            )
            self.metrics.reaped.labels(action="purged").inc(purged)
        self.metrics.queue_depth.labels(type=TYPE_NAMES[task_type]).set(depth)
        return depth, purged

    async def _purge_below(self, subject: str, sequence: int) -> int:
        """Drops ``subject``'s messages before ``sequence``: all acknowledged (the ack floor)."""
        # The JetStream API's own reply says how many went (nats-py's purge_stream drops it).
        answer = await jetstream_request(
            self._nc,
            f"STREAM.PURGE.{self._settings.topology.stream}",
            {"filter": subject, "seq": sequence},
            request_timeout=self._timeout,
        )
        return int(answer.get("purged", 0))

    async def _stored(self, subject: str) -> int:
        info = await self._js.stream_info(self._settings.topology.stream, subjects_filter=subject)
        return int((info.state.subjects or {}).get(subject, 0))
