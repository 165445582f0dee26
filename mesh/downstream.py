"""Calls from one service to another: named deadlines and error mapping."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

import grpc
from grpc import aio

from mesh.errors import DependencyUnavailable, OpsmeshError


class Deadline:
    """Deadlines (seconds) for calls to another service, by what the call does."""

    # Reading one record (a session, a task) that the caller needs to go on.
    LOOKUP: Final = 5.0
    # Handing work to the task service; the work itself runs later.
    QUEUE: Final = 5.0


# The downstream service is down or slow: the caller may retry, nothing is the client's fault.
TRANSIENT: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@contextmanager
def downstream_errors(
    service: str,
    *,
    not_found: Callable[[], OpsmeshError] | None = None,
    only_transient: bool = True,
) -> Iterator[None]:
    """Maps a failed call to ``service`` to this service's errors.

    NOT_FOUND becomes ``not_found()`` when given. UNAVAILABLE / DEADLINE_EXCEEDED become
    DependencyUnavailable; so does every other code unless ``only_transient``, in which
    case the error passes through unchanged.
    """
    try:
        yield
    except aio.AioRpcError as error:
        code = error.code()
        if not_found is not None and code == grpc.StatusCode.NOT_FOUND:
            raise not_found() from None
        if code in TRANSIENT or not only_transient:
            raise DependencyUnavailable(service, error.details() or "") from error
        raise
