"""The RPC interceptor: request ids, authentication, metrics, error mapping.

Every handler of a service is wrapped once, so each RPC runs inside one
lifecycle: request id from ``x-request-id`` (or a new one, echoed back), the
caller's principal for protected methods, in-flight/latency/count metrics, and
domain errors turned into precise statuses. An unexpected exception is logged
once with its traceback and answers INTERNAL without leaking internals.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from grpc import aio

from mesh.auth import Authenticator, is_public_method
from mesh.context import authorization_var, principal_var, request_id_var
from mesh.errors import OpsmeshError, Unavailable, checked_reason, to_status
from mesh.metrics import MethodMetrics, RpcMetrics

log = logging.getLogger("opsmesh.rpc")

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID = 128


def _metadata_dict(call_metadata: Any) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in call_metadata or ():
        if isinstance(value, str):
            result.setdefault(key, value)
    return result


def _request_id(metadata: dict[str, str]) -> str:
    given = metadata.get(REQUEST_ID_HEADER, "")
    if 0 < len(given) <= _MAX_REQUEST_ID and given.isprintable():
        return given
    return uuid.uuid4().hex


if TYPE_CHECKING:
    _ServerInterceptor = aio.ServerInterceptor[Any, Any]
else:  # not generic at run time
    _ServerInterceptor = aio.ServerInterceptor


class RpcInterceptor(_ServerInterceptor):
    def __init__(
        self, *, authenticator: Authenticator, metrics: RpcMetrics, access_log: bool = False
    ) -> None:
        self.authenticator = authenticator
        self.access_log = access_log
        self._metrics = metrics
        # method -> (the service's handler, our wrapper of it); built once per method.
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, "unary"),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, "server_stream"),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, "client_stream"),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method, "bidi_stream"),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str, rpc_type: str
    ) -> Callable[..., Awaitable[Any]]:
        metrics = self._metrics.for_method(method, rpc_type)

        async def wrapped(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            async with _RpcScope(self, context, method, metrics):
                return await behavior(request, context)

        return wrapped

    def _wrap_stream(
        self, behavior: Any, method: str, rpc_type: str
    ) -> Callable[..., AsyncIterator[Any]]:
        metrics = self._metrics.for_method(method, rpc_type)

        async def wrapped(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with _RpcScope(self, context, method, metrics):
                async for response in behavior(request, context):
                    yield response

        return wrapped


class _RpcScope:
    """The lifecycle of one RPC: identity in, metrics and the final status out."""

    __slots__ = ("_code", "_context", "_interceptor", "_method", "_metrics", "_started")

    def __init__(
        self,
        interceptor: RpcInterceptor,
        context: aio.ServicerContext[Any, Any],
        method: str,
        metrics: tuple[MethodMetrics, Any],
    ) -> None:
        self._interceptor = interceptor
        self._context = context
        self._method = method
        self._metrics = metrics
        self._started = 0.0
        self._code = grpc.StatusCode.OK

    async def __aenter__(self) -> None:
        self._started = time.perf_counter()
        method_metrics, started_counter = self._metrics
        started_counter.inc()
        method_metrics.in_flight.inc()
        try:
            metadata = _metadata_dict(self._context.invocation_metadata())
            request_id = _request_id(metadata)
            request_id_var.set(request_id)
            self._context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            authorization_var.set(metadata.get("authorization"))
            if not is_public_method(self._method):
                principal = await self._interceptor.authenticator.authenticate(
                    metadata, self._method
                )
                principal_var.set(principal)
        except BaseException as error:
            await self.__aexit__(type(error), error, None)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, tb: Any
    ) -> None:
        try:
            if error is None:
                return
            if isinstance(error, asyncio.CancelledError | GeneratorExit):
                self._code = grpc.StatusCode.CANCELLED
            elif isinstance(error, aio.AbortError):
                # The handler aborted itself: its status travels up untouched.
                code = self._context.code()
                self._code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            elif isinstance(error, Exception):
                self._code = (
                    error.code if isinstance(error, OpsmeshError) else grpc.StatusCode.INTERNAL
                )
                await _abort_with(self._context, self._method, error)
        finally:
            self._finish()

    def _finish(self) -> None:
        elapsed = time.perf_counter() - self._started
        method_metrics, _ = self._metrics
        method_metrics.in_flight.dec()
        method_metrics.record(self._code.name, elapsed)
        if self._interceptor.access_log:
            log.info(
                "%s %s %.2fms",
                self._method,
                self._code.name,
                elapsed * 1000,
                extra={
                    "grpc_method": self._method,
                    "grpc_code": self._code.name,
                    "duration_ms": elapsed * 1000,
                },
            )


async def _abort_with(
    context: aio.ServicerContext[Any, Any], method: str, error: Exception
) -> NoReturn:
    """Logs ``error`` once and aborts the RPC with its status (always raises)."""
    trailing: tuple[tuple[str, str | bytes], ...] = (
        (REQUEST_ID_HEADER, request_id_var.get() or ""),
    )
    if isinstance(error, OpsmeshError):
        level = logging.WARNING if isinstance(error, Unavailable) else logging.INFO
        log.log(
            level,
            "%s failed: %s %s",
            method,
            error.code.name,
            error.message,
            extra={
                "grpc_method": method,
                "grpc_code": error.code.name,
                "reason": checked_reason(error),
            },
        )
        status = to_status(error)
        await context.abort(error.code, status.details, trailing + tuple(status.trailing_metadata))
    log.error("%s failed unexpectedly", method, exc_info=error, extra={"grpc_method": method})
    await context.abort(
        grpc.StatusCode.INTERNAL, "internal error; the server logged the details", trailing
    )
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
