"""SessionService over real gRPC against a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from grpc import aio

from opsmesh.session.v1 import session_pb2 as pb
from opsmesh.session.v1 import session_pb2_grpc
from tests.helpers import assert_eventually, error_details, identity

ALICE = identity("alice", "acme")
BOB = identity("bob", "acme")  # same org, other user
MALLORY = identity("alice", "evilcorp")  # same user id, other org


def ctx(**values: object) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def secs(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def create(
    stub: session_pb2_grpc.SessionServiceStub,
    who: tuple[tuple[str, str], ...] = ALICE,
    **kw: object,
) -> pb.Session:
    response = await stub.CreateSession(pb.CreateSessionRequest(**kw), metadata=who)  # type: ignore[arg-type]
    return response.session


async def test_create_get_update_list_expire_round_trip(sessions) -> None:
    created = await create(sessions, title="incident 42", context=ctx(topic="latency"))
    assert uuid.UUID(created.id)
    assert (created.user_id, created.org_id, created.version) == ("alice", "acme", 1)
    assert created.context["topic"] == "latency"
    assert created.ttl.seconds == 600
    assert created.expires_at.ToMilliseconds() - created.created_at.ToMilliseconds() == 600_000

    got = (
        await sessions.GetSession(pb.GetSessionRequest(session_id=created.id), metadata=ALICE)
    ).session
    assert got.title == "incident 42"
    assert got.context == created.context
    assert got.context_size_bytes == created.context.ByteSize()

    updated = (
        await sessions.UpdateContext(
            pb.UpdateContextRequest(
                session_id=created.id, context=ctx(service="api"), expected_version=1
            ),
            metadata=ALICE,
        )
    ).session
    assert updated.version == 2
    assert dict(updated.context) == {"topic": "latency", "service": "api"}

    listed = await sessions.ListSessions(pb.ListSessionsRequest(), metadata=ALICE)
    assert [s.id for s in listed.sessions] == [created.id]
    assert not listed.sessions[0].HasField("context"), "basic view leaves the context out"
    assert listed.next_page_token == ""

    full = await sessions.ListSessions(
        pb.ListSessionsRequest(view=pb.SESSION_VIEW_FULL), metadata=ALICE
    )
    assert dict(full.sessions[0].context) == {"topic": "latency", "service": "api"}

    await sessions.ExpireSession(pb.ExpireSessionRequest(session_id=created.id), metadata=ALICE)
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.GetSession(pb.GetSessionRequest(session_id=created.id), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await sessions.ListSessions(pb.ListSessionsRequest(), metadata=ALICE)).sessions == []


async def test_merge_follows_rfc7396_and_replace_replaces(sessions) -> None:
    created = await create(sessions, context=ctx(a=1, nested={"x": 1, "y": 2}, gone="soon"))
    patch = struct_pb2.Struct()
    patch.update({"nested": {"y": None, "z": 3}, "gone": None, "list": [1, 2]})
    merged = (
        await sessions.UpdateContext(
            pb.UpdateContextRequest(session_id=created.id, context=patch), metadata=ALICE
        )
    ).session
    assert struct_to_dict(merged.context) == {"a": 1, "nested": {"x": 1, "z": 3}, "list": [1, 2]}

    replaced = (
        await sessions.UpdateContext(
            pb.UpdateContextRequest(
                session_id=created.id, context=ctx(only="this"), mode=pb.UPDATE_MODE_REPLACE
            ),
            metadata=ALICE,
        )
    ).session
    assert struct_to_dict(replaced.context) == {"only": "this"}
    assert replaced.version == 3


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, object]:
    from google.protobuf import json_format

    return json_format.MessageToDict(struct)


async def test_stale_expected_version_is_aborted_and_changes_nothing(sessions) -> None:
    created = await create(sessions, context=ctx(n=0))
    await sessions.UpdateContext(
        pb.UpdateContextRequest(session_id=created.id, context=ctx(n=1), expected_version=1),
        metadata=ALICE,
    )
    for mode in (pb.UPDATE_MODE_MERGE, pb.UPDATE_MODE_REPLACE):
        with pytest.raises(aio.AioRpcError) as caught:
            await sessions.UpdateContext(
                pb.UpdateContextRequest(
                    session_id=created.id, context=ctx(n=99), mode=mode, expected_version=1
                ),
                metadata=ALICE,
            )
        assert caught.value.code() == grpc.StatusCode.ABORTED
        info = error_details(caught.value)["ErrorInfo"]
        assert info.reason == "VERSION_MISMATCH"
        assert info.metadata["current_version"] == "2"
    got = (
        await sessions.GetSession(pb.GetSessionRequest(session_id=created.id), metadata=ALICE)
    ).session
    assert (got.version, got.context["n"]) == (2, 1)


async def test_concurrent_merges_never_lose_an_update(sessions) -> None:
    created = await create(sessions)
    writers = 40

    async def write(i: int) -> None:
        await sessions.UpdateContext(
            pb.UpdateContextRequest(session_id=created.id, context=ctx(**{f"k{i}": i})),
            metadata=ALICE,
        )

    await asyncio.gather(*(write(i) for i in range(writers)))
    got = (
        await sessions.GetSession(pb.GetSessionRequest(session_id=created.id), metadata=ALICE)
    ).session
    assert got.version == writers + 1
    assert {k: int(v) for k, v in got.context.items()} == {f"k{i}": i for i in range(writers)}


async def test_concurrent_updates_with_same_expected_version_exactly_one_wins(sessions) -> None:
    created = await create(sessions)

    async def write(i: int) -> grpc.StatusCode:
        try:
            await sessions.UpdateContext(
                pb.UpdateContextRequest(
                    session_id=created.id, context=ctx(winner=i), expected_version=1
                ),
                metadata=ALICE,
            )
        except aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(write(i) for i in range(20)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.ABORTED) == 19


@pytest.mark.parametrize("who", [BOB, MALLORY], ids=["other-user-same-org", "other-org"])
async def test_another_tenant_cannot_see_or_touch_a_session(sessions, who) -> None:
    created = await create(sessions, context=ctx(secret="alice's"))
    calls = [
        sessions.GetSession(pb.GetSessionRequest(session_id=created.id), metadata=who),
        sessions.UpdateContext(
            pb.UpdateContextRequest(
                session_id=created.id, context=ctx(secret="pwned"), mode=pb.UPDATE_MODE_REPLACE
            ),
            metadata=who,
        ),
        sessions.TouchSession(pb.TouchSessionRequest(session_id=created.id), metadata=who),
        sessions.ExpireSession(pb.ExpireSessionRequest(session_id=created.id), metadata=who),
    ]
    for call in calls:
        with pytest.raises(aio.AioRpcError) as caught:
            await call
        # Indistinguishable from a session that does not exist: nothing to probe.
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await sessions.ListSessions(pb.ListSessionsRequest(), metadata=who)).sessions == []
    got = (
        await sessions.GetSession(pb.GetSessionRequest(session_id=created.id), metadata=ALICE)
    ).session
    assert (got.context["secret"], got.version) == ("alice's", 1)


async def test_calls_without_identity_are_unauthenticated(sessions) -> None:
    for metadata in [
        (),
        (("x-opsmesh-user-id", "alice"),),
        identity("al ice", "acme"),
        identity("alice", "acme", roles="Admin!"),
    ]:
        with pytest.raises(aio.AioRpcError) as caught:
            await sessions.ListSessions(pb.ListSessionsRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GetSessionRequest(session_id="not-a-uuid"), "session_id"),
        (pb.GetSessionRequest(session_id=""), "session_id"),
    ],
)
async def test_bad_session_ids_are_invalid_argument_with_field(sessions, request_, field) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.GetSession(request_, metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = error_details(caught.value)["BadRequest"].field_violations[0]
    assert violation.field == field


async def test_a_session_id_in_any_uuid_spelling_reads_the_session_under_its_canonical_id(
    sessions,
) -> None:
    created = await create(sessions, title="spelled")
    for spelling in (created.id.upper(), "{" + created.id + "}", created.id.replace("-", "")):
        got = (
            await sessions.GetSession(pb.GetSessionRequest(session_id=spelling), metadata=ALICE)
        ).session
        assert (got.id, got.title) == (created.id, "spelled")
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.GetSession(
            pb.GetSessionRequest(session_id=created.id + "\n"), metadata=ALICE
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_missing_session_is_not_found(sessions) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.TouchSession(
            pb.TouchSessionRequest(session_id=str(uuid.uuid4())), metadata=ALICE
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_validates_title_ttl_and_context_size(sessions) -> None:
    cases = [
        (pb.CreateSessionRequest(title="x" * 201), "title"),
        (pb.CreateSessionRequest(ttl=secs(0.5)), "ttl"),
        (pb.CreateSessionRequest(ttl=secs(7200)), "ttl"),
        (pb.CreateSessionRequest(context=ctx(blob="x" * 5000)), "context"),
    ]
    for request, field in cases:
        with pytest.raises(aio.AioRpcError) as caught:
            await sessions.CreateSession(request, metadata=ALICE)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert error_details(caught.value)["BadRequest"].field_violations[0].field == field
    assert (await sessions.ListSessions(pb.ListSessionsRequest(), metadata=ALICE)).sessions == []


async def test_context_growing_past_the_limit_is_resource_exhausted(sessions) -> None:
    created = await create(sessions, context=ctx(a="x" * 2500))
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.UpdateContext(
            pb.UpdateContextRequest(session_id=created.id, context=ctx(b="y" * 2500)),
            metadata=ALICE,
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value)["ErrorInfo"].reason == "CONTEXT_TOO_LARGE"
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.UpdateContext(
            pb.UpdateContextRequest(session_id=created.id, context=ctx(b="y" * 5000)),
            metadata=ALICE,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.UpdateContext(
            pb.UpdateContextRequest(session_id=created.id, context=ctx(), expected_version=0),
            metadata=ALICE,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got = (
        await sessions.GetSession(pb.GetSessionRequest(session_id=created.id), metadata=ALICE)
    ).session
    assert (got.version, set(got.context.keys())) == (1, {"a"})


async def test_sessions_expire_after_ttl_and_use_slides_the_expiry(sessions) -> None:
    idle = await create(sessions, ttl=secs(1))
    used = await create(sessions, ttl=secs(1))

    async def idle_gone() -> None:
        # Reading `idle` would slide its expiry too: watch the listing, which does not.
        await sessions.TouchSession(pb.TouchSessionRequest(session_id=used.id), metadata=ALICE)
        listed = await sessions.ListSessions(pb.ListSessionsRequest(), metadata=ALICE)
        assert idle.id not in [s.id for s in listed.sessions]

    await assert_eventually(idle_gone, timeout=5, interval=0.3)
    with pytest.raises(aio.AioRpcError) as caught:
        await sessions.GetSession(pb.GetSessionRequest(session_id=idle.id), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    touched = await sessions.TouchSession(
        pb.TouchSessionRequest(session_id=used.id, ttl=secs(120)), metadata=ALICE
    )
    assert touched.ttl.seconds == 120
    got = (
        await sessions.GetSession(pb.GetSessionRequest(session_id=used.id), metadata=ALICE)
    ).session
    assert got.ttl.seconds == 120
    listed = await sessions.ListSessions(pb.ListSessionsRequest(), metadata=ALICE)
    assert [s.id for s in listed.sessions] == [used.id], "expired sessions leave the listing"


async def test_listing_pages_newest_first_without_gaps_or_duplicates(sessions) -> None:
    who = identity("pager", "acme")
    ids = [(await create(sessions, who, title=f"s{i}")).id for i in range(7)]
    expired = ids[3]
    await sessions.ExpireSession(pb.ExpireSessionRequest(session_id=expired), metadata=who)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await sessions.ListSessions(
            pb.ListSessionsRequest(page_size=2, page_token=token), metadata=who
        )
        pages += 1
        assert len(page.sessions) <= 2
        seen += [s.id for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [i for i in reversed(ids) if i != expired]
    assert pages == 3


async def test_sessions_created_within_one_millisecond_still_list_newest_first(
    sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    from session_svc import store

    frozen = store._now_ms()
    monkeypatch.setattr(store, "_now_ms", lambda: frozen)
    who = identity("burst", "acme")
    ids = [(await create(sessions, who, title=f"b{i}")).id for i in range(6)]
    seen: list[str] = []
    token = ""
    while True:
        page = await sessions.ListSessions(
            pb.ListSessionsRequest(page_size=4, page_token=token), metadata=who
        )
        seen += [s.id for s in page.sessions]
        assert {s.created_at.ToMilliseconds() for s in page.sessions} == {frozen}
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))


async def test_listing_rejects_foreign_page_tokens_and_negative_sizes(sessions) -> None:
    for request in [
        pb.ListSessionsRequest(page_token="garbage"),
        pb.ListSessionsRequest(page_token="eyJrIjoidGFza3MiLCJjIjoieCJ9"),  # another list's kind
        pb.ListSessionsRequest(page_token="eyJrIjoic2Vzc2lvbnMiLCJjIjoiKSJ9"),  # bad cursor
        pb.ListSessionsRequest(page_size=-1),
    ]:
        with pytest.raises(aio.AioRpcError) as caught:
            await sessions.ListSessions(request, metadata=ALICE)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sessions_per_user_are_bounded(sessions) -> None:
    who = identity("hoarder", "acme")
    for _ in range(25):
        await create(sessions, who)
    with pytest.raises(aio.AioRpcError) as caught:
        await create(sessions, who)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value)["ErrorInfo"].reason == "TOO_MANY_SESSIONS"
    await create(sessions, identity("someone-else", "acme"))
