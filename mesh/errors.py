"""Domain errors and the one place they become gRPC statuses.

Services raise these exceptions; :func:`to_status` turns any of them into a
``grpc.Status`` carrying google.rpc error details (ErrorInfo, BadRequest field
violations, RetryInfo), so every client gets the same precise answer.

The reasons are the contract's ``opsmesh.errors.v1.ErrorReason`` values
(proto/opsmesh/errors/v1/errors.proto): an error carries an enum member, and
``ErrorInfo.reason`` is that value's name without ``ERROR_REASON_``. A reason
the contract does not declare is refused: :func:`to_status` logs it and answers
with the generic reason of the status code instead, or raises
:class:`UndeclaredReason` while :data:`STRICT_REASONS` is on (the tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from opsmesh.errors.v1 import errors_pb2
from opsmesh.errors.v1.errors_pb2 import ErrorReason

log = logging.getLogger(__name__)

# The ErrorInfo domain of every opsmesh error (documented in errors.proto).
ERROR_DOMAIN = "opsmesh.dev"
REASON_PREFIX = "ERROR_REASON_"

# Raise on an undeclared reason instead of falling back: tests/conftest.py turns it on, and a
# service runner does when its settings say so (OPSMESH_STRICT_ERROR_REASONS, for the services
# the tests start in other processes).
STRICT_REASONS = False


class UndeclaredReason(ValueError):
    """A reason that is not a (specified) value of the contract's ErrorReason."""


def reason_name(reason: ErrorReason) -> str:
    """The ``ErrorInfo.reason`` string of ``reason``: its value name without ``ERROR_REASON_``.

    Raises :class:`UndeclaredReason` for ``ERROR_REASON_UNSPECIFIED`` and for anything that is
    not a value of the enum (a free string, an unknown number).
    """
    if (
        isinstance(reason, int)
        and not isinstance(reason, bool)
        and reason != errors_pb2.ERROR_REASON_UNSPECIFIED
        and reason in ErrorReason.values()
    ):
        return ErrorReason.Name(reason).removeprefix(REASON_PREFIX)
    raise UndeclaredReason(f"{reason!r} is not an ErrorReason of opsmesh.errors.v1")


def declared_reasons() -> frozenset[str]:
    """Every reason string the contract declares (ERROR_REASON_UNSPECIFIED is none)."""
    return frozenset(
        reason_name(cast(ErrorReason, value))
        for value in ErrorReason.values()
        if value != errors_pb2.ERROR_REASON_UNSPECIFIED
    )


class OpsmeshError(Exception):
    """Base of every error an opsmesh RPC answers with on purpose."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[ErrorReason] = errors_pb2.ERROR_REASON_INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason | None = None,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason: ErrorReason = self.default_reason if reason is None else reason
        self.field = field
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after


class InvalidArgument(OpsmeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = errors_pb2.ERROR_REASON_INVALID_ARGUMENT


class MalformedRequest(InvalidArgument):
    """The request bytes do not decode as the method's request message (a broken client)."""

    default_reason = errors_pb2.ERROR_REASON_MALFORMED_REQUEST


class NotFound(OpsmeshError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = errors_pb2.ERROR_REASON_NOT_FOUND


class AlreadyExists(OpsmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = errors_pb2.ERROR_REASON_ALREADY_EXISTS


class PermissionDenied(OpsmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = errors_pb2.ERROR_REASON_PERMISSION_DENIED


class Unauthenticated(OpsmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = errors_pb2.ERROR_REASON_UNAUTHENTICATED


class ResourceExhausted(OpsmeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = errors_pb2.ERROR_REASON_RESOURCE_EXHAUSTED


class FailedPrecondition(OpsmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = errors_pb2.ERROR_REASON_FAILED_PRECONDITION


class Aborted(OpsmeshError):
    """A compare-and-set lost: the client should re-read and try again."""

    code = grpc.StatusCode.ABORTED
    default_reason = errors_pb2.ERROR_REASON_ABORTED


class DeadlineExceeded(OpsmeshError):
    """A dependency took longer than allowed (a stalled stream, a slow first answer)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = errors_pb2.ERROR_REASON_DEADLINE_EXCEEDED


class Unavailable(OpsmeshError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = errors_pb2.ERROR_REASON_UNAVAILABLE


class DependencyUnavailable(Unavailable):
    """A backing system (Redis, NATS, ...) cannot be reached right now."""

    default_reason = errors_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE

    def __init__(self, dependency: str, cause: BaseException | str, *, retry_after: float = 1.0):
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"{dependency} is unavailable, try again later ({detail})",
            metadata={"dependency": dependency},
            retry_after=retry_after,
        )
        self.dependency = dependency


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def checked_reason(error: OpsmeshError) -> str:
    """The ``ErrorInfo.reason`` that answers ``error``: only ever a declared one.

    An undeclared reason raises :class:`UndeclaredReason` while :data:`STRICT_REASONS` is on;
    otherwise it is logged as an error and replaced (on ``error`` too, so it is logged once)
    by the generic reason of the error's status code, or ``INTERNAL``.
    """
    try:
        return reason_name(error.reason)
    except UndeclaredReason:
        if STRICT_REASONS:
            raise
        generic = REASON_PREFIX + error.code.name
        fallback = cast(
            ErrorReason,
            ErrorReason.Value(generic)
            if generic in ErrorReason.keys()  # noqa: SIM118 - an EnumTypeWrapper, not a dict
            else errors_pb2.ERROR_REASON_INTERNAL,
        )
        log.error(
            "%s carries the undeclared error reason %r (not in opsmesh.errors.v1.ErrorReason); "
            "answering with %s",
            type(error).__name__,
            error.reason,
            reason_name(fallback),
        )
        error.reason = fallback
        return reason_name(fallback)


def to_status(error: OpsmeshError) -> grpc.Status:
    """The gRPC status (with rich error details) that answers ``error``."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=checked_reason(error), domain=ERROR_DOMAIN, metadata=error.metadata
            )
        )
    ]
    if error.field is not None:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=error.field, description=error.message
                        )
                    ]
                )
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name), message=error.message, details=details
    )
    return rpc_status.to_status(status)
