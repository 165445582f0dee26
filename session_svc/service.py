"""opsmesh.session.v1.SessionService on top of :class:`~session_svc.store.SessionStore`."""

from __future__ import annotations

import asyncio
import random
import re

from google.protobuf import duration_pb2, struct_pb2

from mesh.context import current_principal
from mesh.errors import Aborted, InvalidArgument, NotFound, ResourceExhausted
from mesh.pagination import decode_token, encode_token, page_size
from mesh.protos import duration_from_millis, timestamp_from_millis
from mesh.servicer import Context, parse_uuid
from opsmesh.errors.v1 import errors_pb2
from opsmesh.session.v1 import session_pb2, session_pb2_grpc
from session_svc.config import SessionLimits
from session_svc.context_patch import merge_patch
from session_svc.store import (
    SessionNotFound,
    SessionStore,
    StoredSession,
    TooManySessions,
    VersionConflict,
)

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name

_LIST_TOKEN_KIND = "sessions"  # noqa: S105 - a token kind, not a secret
_CURSOR = re.compile(r"[0-9]{13}:[0-9a-f-]{36}")
_DEFAULT_PAGE = 50
_MAX_PAGE = 200
# A merge without expected_version re-reads and retries when another writer got in first;
# this bounds the retries under pathological contention (then ABORTED, nothing applied).
_MAX_MERGE_ATTEMPTS = 64


def _session_id(value: str) -> str:
    return parse_uuid(value, "session_id")


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id} not found (expired, ended, or never existed)")


def fill_session(session: session_pb2.Session, stored: StoredSession) -> None:
    """Writes ``stored`` into ``session`` in place.

    Responses fill their own ``session`` field: a Session built apart and passed to the
    response's constructor would be copied (context included) once more.
    """
    session.id = stored.id
    session.user_id = stored.user_id
    session.org_id = stored.org_id
    session.title = stored.title
    session.version = stored.version
    session.context_size_bytes = stored.context_size
    session.ttl.CopyFrom(duration_from_millis(stored.ttl_ms))
    session.created_at.CopyFrom(timestamp_from_millis(stored.created_ms))
    session.updated_at.CopyFrom(timestamp_from_millis(stored.updated_ms))
    session.expires_at.CopyFrom(timestamp_from_millis(stored.expires_ms))
    if stored.context is not None:
        session.context.CopyFrom(stored.context)


class SessionService(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, store: SessionStore, limits: SessionLimits) -> None:
        self._store = store
        self._limits = limits

    def _ttl_ms(self, request_ttl: duration_pb2.Duration, has_ttl: bool, field: str) -> int | None:
        if not has_ttl:
            return None
        seconds = request_ttl.ToNanoseconds() / 1e9
        if not self._limits.min_ttl <= seconds <= self._limits.max_ttl:
            raise InvalidArgument(
                f"{field} must be between {self._limits.min_ttl:g}s and "
                f"{self._limits.max_ttl:g}s, got {seconds:g}s",
                field=field,
            )
        return int(seconds * 1000)

    def _check_patch_size(self, context: struct_pb2.Struct) -> None:
        size = context.ByteSize()
        if size > self._limits.max_context_bytes:
            raise InvalidArgument(
                f"context is {size} bytes, the limit is {self._limits.max_context_bytes}",
                field="context",
            )

    def _check_result_size(self, context: struct_pb2.Struct) -> None:
        size = context.ByteSize()
        if size > self._limits.max_context_bytes:
            raise ResourceExhausted(
                f"the session's context would grow to {size} bytes, over the limit of "
                f"{self._limits.max_context_bytes}; remove keys or replace the context",
                reason=errors_pb2.ERROR_REASON_CONTEXT_TOO_LARGE,
                metadata={"limit_bytes": str(self._limits.max_context_bytes)},
            )

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: Context
    ) -> session_pb2.CreateSessionResponse:
        owner = current_principal()
        if len(request.title) > self._limits.max_title_chars:
            raise InvalidArgument(
                f"title is longer than {self._limits.max_title_chars} characters", field="title"
            )
        self._check_patch_size(request.context)
        ttl_ms = self._ttl_ms(request.ttl, request.HasField("ttl"), "ttl")
        try:
            stored = await self._store.create(
                owner,
                title=request.title,
                context=request.context,
                ttl_ms=ttl_ms if ttl_ms is not None else int(self._limits.default_ttl * 1000),
            )
        except TooManySessions:
            raise ResourceExhausted(
                f"you have {self._limits.max_sessions_per_user} live sessions, the most allowed; "
                "expire one first",
                reason=errors_pb2.ERROR_REASON_TOO_MANY_SESSIONS,
            ) from None
        response = session_pb2.CreateSessionResponse()
        fill_session(response.session, stored)
        return response

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: Context
    ) -> session_pb2.GetSessionResponse:
        session_id = _session_id(request.session_id)
        try:
            stored = await self._store.get(current_principal(), session_id)
        except SessionNotFound:
            raise _not_found(session_id) from None
        response = session_pb2.GetSessionResponse()
        fill_session(response.session, stored)
        return response

    async def UpdateContext(
        self, request: session_pb2.UpdateContextRequest, context: Context
    ) -> session_pb2.UpdateContextResponse:
        owner = current_principal()
        session_id = _session_id(request.session_id)
        self._check_patch_size(request.context)
        expected = request.expected_version if request.HasField("expected_version") else None
        if expected is not None and expected < 1:
            raise InvalidArgument("expected_version starts at 1", field="expected_version")
        replace = request.mode == session_pb2.UPDATE_MODE_REPLACE
        try:
            for attempt in range(_MAX_MERGE_ATTEMPTS):
                if replace:
                    new_context = request.context
                    base_version = expected
                else:
                    current = await self._store.get(owner, session_id)
                    if expected is not None and current.version != expected:
                        raise VersionConflict(current.version)
                    new_context = struct_pb2.Struct()
                    if current.context is not None:
                        new_context.CopyFrom(current.context)
                    merge_patch(new_context, request.context)
                    base_version = current.version
                self._check_result_size(new_context)
                try:
                    stored = await self._store.set_context(
                        owner, session_id, new_context, expected_version=base_version
                    )
                except VersionConflict:
                    if expected is not None:
                        raise
                    # Someone else merged first: re-read and apply our patch on top.
                    await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))  # noqa: S311
                    continue
                response = session_pb2.UpdateContextResponse()
                fill_session(response.session, stored)
                return response
        except SessionNotFound:
            raise _not_found(session_id) from None
        except VersionConflict as conflict:
            raise Aborted(
                f"session {session_id} is at version {conflict.current_version}, not "
                f"{expected}: re-read it and apply your change again",
                reason=errors_pb2.ERROR_REASON_VERSION_MISMATCH,
                metadata={"current_version": str(conflict.current_version)},
            ) from None
        raise Aborted(
            f"session {session_id} changed {_MAX_MERGE_ATTEMPTS} times while merging; try again",
            reason=errors_pb2.ERROR_REASON_CONTENTION,
        )

    async def TouchSession(
        self, request: session_pb2.TouchSessionRequest, context: Context
    ) -> session_pb2.TouchSessionResponse:
        session_id = _session_id(request.session_id)
        ttl_ms = self._ttl_ms(request.ttl, request.HasField("ttl"), "ttl")
        try:
            stored = await self._store.get(
                current_principal(), session_id, new_ttl_ms=ttl_ms, with_context=False
            )
        except SessionNotFound:
            raise _not_found(session_id) from None
        return session_pb2.TouchSessionResponse(
            expires_at=timestamp_from_millis(stored.expires_ms),
            ttl=duration_from_millis(stored.ttl_ms),
        )

    async def ExpireSession(
        self, request: session_pb2.ExpireSessionRequest, context: Context
    ) -> session_pb2.ExpireSessionResponse:
        session_id = _session_id(request.session_id)
        try:
            await self._store.expire(current_principal(), session_id)
        except SessionNotFound:
            raise _not_found(session_id) from None
        return session_pb2.ExpireSessionResponse()

    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: Context
    ) -> session_pb2.ListSessionsResponse:
        limit = page_size(request.page_size, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        after = decode_token(request.page_token, _LIST_TOKEN_KIND)
        if after is not None and _CURSOR.fullmatch(after) is None:
            raise InvalidArgument(
                "page_token is not a token returned by this list", field="page_token"
            )
        sessions, cursor = await self._store.list(
            current_principal(),
            after=after,
            limit=limit,
            with_context=request.view == session_pb2.SESSION_VIEW_FULL,
        )
        response = session_pb2.ListSessionsResponse(
            next_page_token=encode_token(_LIST_TOKEN_KIND, cursor) if cursor else ""
        )
        for stored in sessions:
            fill_session(response.sessions.add(), stored)
        return response
