"""StrictMillis: stamps never tie or go back, and follow the wall clock."""

from __future__ import annotations

import time
import uuid

import pytest

from mesh import clock
from mesh.clock import StrictMillis


def test_stamps_within_one_millisecond_are_still_strictly_increasing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen = time.time_ns()
    monkeypatch.setattr(clock.time, "time_ns", lambda: frozen)
    stamps = StrictMillis()
    taken = [stamps.next() for _ in range(5)]
    assert taken == list(range(frozen // 1_000_000, frozen // 1_000_000 + 5))


def test_a_clock_stepping_back_does_not_move_stamps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [2_000_000_000_000_000_000]
    monkeypatch.setattr(clock.time, "time_ns", lambda: now[0])
    stamps = StrictMillis()
    first = stamps.next()
    now[0] -= 5_000_000_000
    assert stamps.next() == first + 1
    now[0] += 10_000_000_000
    assert stamps.next() == now[0] // 1_000_000, "catches up with the wall clock"


def test_task_ids_made_in_one_millisecond_sort_in_creation_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from task_svc.store import new_task_id

    frozen = time.time_ns()
    monkeypatch.setattr(clock.time, "time_ns", lambda: frozen)
    ids = [new_task_id() for _ in range(50)]
    assert ids == sorted(ids)
    assert {uuid.UUID(i).version for i in ids} == {7}
