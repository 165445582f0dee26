"""Attempt leases: who runs a task, and until when that claim holds without renewal.

A running task's last attempt carries its worker's id and ``lease_expires_at``.
The worker renews the lease while the handler runs; once it has passed, the
worker is taken for dead and anyone (another worker, the reaper, RetryTask,
CancelTask) may close the attempt and move on. Every change goes through the
store's compare-and-set, so two workers can never both own an attempt: the
loser of a race re-reads the record and sees the winner's lease.

The functions here are record mutations for :meth:`TaskStore.change`; they
decide from the record they are given, since a lost race applies them again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from google.protobuf import timestamp_pb2

from opsmesh.task.v1 import task_pb2
from task_svc import states
from task_svc.store import now

STALE_ATTEMPT_ERROR = "worker stopped responding"


class LeaseHeld(Exception):
    """Another attempt holds a live lease: leave the task alone for ``remaining`` seconds."""

    def __init__(self, remaining: float) -> None:
        super().__init__(f"leased for {remaining:.1f}s more")
        self.remaining = remaining


class LeaseLost(Exception):
    """This attempt no longer owns the task: it was taken over, cancelled or retried."""


class AlreadyFinished(Exception):
    """The task is final already: its message needs no more work."""


def expires_in(ttl: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns() + int(ttl * 1e9))
    return stamp


def lease_remaining(task: task_pb2.Task) -> float:
    """Seconds the running attempt's lease still holds; 0 when stale or not running."""
    if task.status != states.RUNNING or not task.attempts:
        return 0.0
    attempt = task.attempts[-1]
    if attempt.HasField("ended_at") or not attempt.HasField("lease_expires_at"):
        # Records written before leases existed have none: their attempt counts as stale.
        return 0.0
    return max(0.0, (attempt.lease_expires_at.ToNanoseconds() - time.time_ns()) / 1e9)


def is_stale(task: task_pb2.Task) -> bool:
    """True when the task is marked running but nobody holds its attempt any more."""
    return task.status == states.RUNNING and lease_remaining(task) == 0.0


def close_stale_attempt(task: task_pb2.Task, max_attempts: int) -> None:
    """Ends a dead worker's attempt; the task waits for a retry, or fails if none is left."""
    if task.attempts and not task.attempts[-1].HasField("ended_at"):
        task.attempts[-1].ended_at.CopyFrom(now())
        task.attempts[-1].error = STALE_ATTEMPT_ERROR
    task.retry_count += 1
    if task.retry_count >= max_attempts:
        task.status = states.FAILED
        task.error = f"{STALE_ATTEMPT_ERROR}; gave up after {max_attempts} attempts"
    else:
        task.status = states.RETRYING
        task.error = STALE_ATTEMPT_ERROR


def claim(worker_id: str, ttl: float, max_attempts: int) -> Callable[[task_pb2.Task], None]:
    """The mutation that starts a new attempt owned by ``worker_id``.

    Raises :class:`AlreadyFinished` for a final task and :class:`LeaseHeld` while
    another attempt's lease is live. A stale attempt is closed first (and counts as
    a failed try); when that was the last try the task is failed instead of claimed.
    """

    def start(task: task_pb2.Task) -> None:
        if task.status in states.TERMINAL:
            raise AlreadyFinished()
        if task.status == states.RUNNING:
            remaining = lease_remaining(task)
            if remaining > 0:
                raise LeaseHeld(remaining)
            close_stale_attempt(task, max_attempts)
            if task.status == states.FAILED:
                return
        task.status = states.RUNNING
        task.error = ""
        task.progress.Clear()
        task.attempts.add(
            number=len(task.attempts) + 1,
            worker=worker_id,
            started_at=now(),
            lease_expires_at=expires_in(ttl),
        )

    return start


def check_owner(task: task_pb2.Task, worker_id: str, number: int) -> None:
    """Raises :class:`LeaseLost` unless attempt ``number`` of ``worker_id`` still runs the task."""
    if (
        task.status != states.RUNNING
        or len(task.attempts) != number
        or task.attempts[-1].worker != worker_id
        or task.attempts[-1].HasField("ended_at")
    ):
        raise LeaseLost()


def renew(worker_id: str, number: int, ttl: float) -> Callable[[task_pb2.Task], None]:
    def extend(task: task_pb2.Task) -> None:
        check_owner(task, worker_id, number)
        task.attempts[-1].lease_expires_at.CopyFrom(expires_in(ttl))

    return extend
