"""The RPC interceptor: request ids, authentication, metrics, error mapping.

Every handler of a service is wrapped once, so each RPC runs inside one
lifecycle: request id from ``x-request-id`` (or a new one, echoed back), the
caller's principal for protected methods, in-flight/latency/count metrics, and
domain errors turned into precise statuses. An unexpected exception is logged
once with its traceback and answers INTERNAL without leaking internals.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc import aio

from mesh.auth import Authenticator, is_public_method
from mesh.context import authorization_var, principal_var, request_id_var
from mesh.errors import (
    InvalidArgument,
    MalformedRequest,
    OpsmeshError,
    Unavailable,
    checked_reason,
    to_status,
)
from mesh.metrics import MethodMetrics, RpcMetrics

log = logging.getLogger("opsmesh.rpc")

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID = 128


class _RequestIds:
    """Ids for requests that came without one: 64 random bits per process and a counter.

    As unique as a uuid4 in practice, without a ``getrandom`` system call on every RPC (a few
    per cent of a GetSession's CPU in the session bench's profile). A forked child draws its
    own prefix.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_request_ids = _RequestIds()


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
    return _request_ids.next()


if TYPE_CHECKING:
    _ServerInterceptor = aio.ServerInterceptor[Any, Any]
else:  # not generic at run time
    _ServerInterceptor = aio.ServerInterceptor


class _PerMethodInterceptor(_ServerInterceptor):
    """Replaces each method's handler by a wrapper of it, built once per method."""

    def __init__(self) -> None:
        # method -> (the service's handler, our wrapper of it).
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError

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


class RpcInterceptor(_PerMethodInterceptor):
    def __init__(
        self, *, authenticator: Authenticator, metrics: RpcMetrics, access_log: bool = False
    ) -> None:
        super().__init__()
        self.authenticator = authenticator
        self.access_log = access_log
        self._metrics = metrics

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
        # A malformed request is a broken (or hostile) client: worth a warning, not a trace.
        level = (
            logging.WARNING if isinstance(error, Unavailable | MalformedRequest) else logging.INFO
        )
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


class WireCodecInterceptor(_PerMethodInterceptor):
    """Decodes requests and encodes responses inside the RPC instead of in gRPC's core.

    grpc.aio decodes a unary request before any interceptor runs, and answers a request that
    does not decode (truncated bytes, a string that is not UTF-8, messages nested past
    protobuf's depth limit) with UNKNOWN naming the exception class, logging an ERROR; a
    response that does not encode gets the same. Installed inside :class:`RpcInterceptor`
    (after it in the server's list), this runs both within the RPC's lifecycle: a malformed
    request answers INVALID_ARGUMENT (``MALFORMED_REQUEST``) with a one-line warning, a response
    that cannot be encoded is a server bug and answers INTERNAL like any other.
    """

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        decode = _strict_decoder(handler.request_deserializer, method)
        encode: Callable[[Any], Any] = handler.response_serializer or _unchanged
        # Messages a handler sends with context.write() are still encoded by gRPC.
        send = _encoded_or(encode)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _encoded_answer(handler.unary_unary, decode, encode), response_serializer=send
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _encoded_stream(handler.unary_stream, decode, encode), response_serializer=send
            )
        # A request stream is decoded as the handler reads it, inside the RPC already.
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _encoded_answer(handler.stream_unary, _unchanged, encode),
                request_deserializer=decode,
                response_serializer=send,
            )
        return grpc.stream_stream_rpc_method_handler(
            _encoded_stream(handler.stream_stream, _unchanged, encode),
            request_deserializer=decode,
            response_serializer=send,
        )


def _unchanged(value: Any) -> Any:
    return value


def _encoded_or(encode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def send(message: Any) -> Any:
        return message if isinstance(message, bytes) else encode(message)

    return send


def _strict_decoder(
    deserializer: Callable[[bytes], Any] | None, method: str
) -> Callable[[bytes], Any]:
    """``deserializer`` raising :class:`MalformedRequest` for bytes that do not decode."""
    parse = deserializer or _unchanged

    def decode(raw: bytes) -> Any:
        try:
            request = parse(raw)
        # upb raises DecodeError only; the pure-Python protobuf runtime also the other two.
        except (DecodeError, RecursionError, UnicodeDecodeError) as error:
            raise MalformedRequest(
                f"the request to {method} is not a valid protobuf message: {_flaw(error)}"
            ) from None
        if isinstance(request, Message) and _holds_json(request.DESCRIPTOR):
            check_json_depth(request)
        return request

    return decode


JSON_HEADROOM = 20
"""Protobuf levels a request's JSON value (``google.protobuf.Struct``, ``Value``, ``ListValue``)
must leave free under protobuf's decoding limit (100 nested messages): a request just under it
would decode while an answer carrying its JSON deeper (a session's context in
GetSessionResponse) could not. An object costs three levels (Struct, map entry, Value), an array
two, so a request's JSON may nest about 27 objects or 41 arrays."""
_TOO_DEEP = "nests JSON objects and arrays too deep (at most about 27 objects or 41 arrays)"

# Wire tags (field number << 3 | LEN) of the JSON types' message fields.
_STRUCT_IN_VALUE = 5 << 3 | 2  # Value.struct_value
_LIST_IN_VALUE = 6 << 3 | 2  # Value.list_value
_VALUE_IN_LIST = 1 << 3 | 2  # ListValue.values

_JSON_TYPES = frozenset(
    ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")
)


@functools.cache
def _holds_json(descriptor: Descriptor) -> bool:
    """Whether a message of this type can carry a Struct, Value or ListValue at any depth."""
    seen: set[str] = set()
    pending = [descriptor]
    while pending:
        current = pending.pop()
        if current.full_name in _JSON_TYPES:
            return True
        if current.full_name not in seen:
            seen.add(current.full_name)
            pending.extend(f.message_type for f in current.fields if f.message_type is not None)
    return False


def check_json_depth(request: Message) -> None:
    """Refuses JSON values that leave less than :data:`JSON_HEADROOM` levels, naming the field."""
    for path, value in _json_values(request):
        if not _decodes_with_headroom(value):
            raise InvalidArgument(f"{path} {_TOO_DEEP}", field=path)


def _json_values(request: Message) -> Iterator[tuple[str, Message]]:
    """Every outermost Struct, Value or ListValue in ``request``, with its field path."""
    pending: list[tuple[str, Message]] = [("", request)]
    while pending:
        path, message = pending.pop()
        for field, value in message.ListFields():
            if field.message_type is None or not _holds_json(field.message_type):
                continue
            where = f"{path}.{field.name}" if path else field.name
            kind, items = _field_messages(field, field.message_type, value)
            for item in items:
                if kind.full_name in _JSON_TYPES:
                    yield where, item
                else:
                    pending.append((where, item))


def _field_messages(
    field: FieldDescriptor, kind: Descriptor, value: Any
) -> tuple[Descriptor, list[Message]]:
    """The message type of a field of type ``kind`` and the messages it holds (maps: values)."""
    if kind.GetOptions().map_entry:
        # A map that can hold JSON (``_holds_json``) has message values.
        return cast(Descriptor, kind.fields_by_name["value"].message_type), list(value.values())
    return kind, list(value) if field.is_repeated else [value]


def _decodes_with_headroom(value: Message) -> bool:
    """Whether ``value`` still decodes :data:`JSON_HEADROOM` levels deeper: protobuf's C decoder
    counts the levels for us, many times faster than walking the value in Python."""
    data = value.SerializeToString()
    layers = JSON_HEADROOM
    if not isinstance(value, struct_pb2.Value):
        tag = _STRUCT_IN_VALUE if isinstance(value, struct_pb2.Struct) else _LIST_IN_VALUE
        data = _field_prefix(tag, len(data)) + data
        layers -= 1
    # Value in ListValue in Value ...: the prefixes, innermost first, then joined once.
    prefixes: list[bytes] = []
    size = len(data)
    for layer in range(layers):
        prefixes.append(_field_prefix(_LIST_IN_VALUE if layer % 2 else _VALUE_IN_LIST, size))
        size += len(prefixes[-1])
    outermost = struct_pb2.ListValue if layers % 2 else struct_pb2.Value
    try:
        outermost.FromString(b"".join([*reversed(prefixes), data]))
    except DecodeError:
        return False
    return True


def _field_prefix(tag: int, size: int) -> bytes:
    """A length-delimited field's tag and length (varint) before ``size`` bytes of content."""
    prefix = bytearray((tag,))
    while size > 0x7F:
        prefix.append(size & 0x7F | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix)


def _flaw(error: Exception) -> str:
    """What is wrong with the request bytes, in words that name no parser internals."""
    text = str(error)
    if isinstance(error, UnicodeDecodeError) or "UTF-8" in text:
        return "a string field is not valid UTF-8"
    if isinstance(error, RecursionError) or "Depth" in text:
        return "messages are nested deeper than protobuf's limit of 100 levels"
    return "the bytes are truncated or corrupt"


def _encoded_answer(
    behavior: Callable[..., Awaitable[Any]],
    decode: Callable[[Any], Any],
    encode: Callable[[Any], Any],
) -> Callable[..., Awaitable[Any]]:
    async def answer(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        return encode(await behavior(decode(request), context))

    return answer


def _encoded_stream(
    behavior: Any, decode: Callable[[Any], Any], encode: Callable[[Any], Any]
) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        produced = behavior(decode(request), context)
        if not inspect.isasyncgen(produced):
            await produced  # a handler that sends with context.write()
            return
        async for response in produced:
            yield encode(response)

    return stream
