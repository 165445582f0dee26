"""task_svc.bucketstream against a real nats-server: the listing behind ListTasks and the reaper."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from devtools.servers import NatsServer
from mesh.errors import DependencyUnavailable
from task_svc.bucketstream import BucketStream
from tests.helpers import assert_eventually

Bucket = tuple[KeyValue, BucketStream]


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
async def bucket(client: Client) -> AsyncIterator[Bucket]:
    name = f"ki{uuid.uuid4().hex[:10]}"
    js = client.jetstream(timeout=2.0)
    kv = await js.create_key_value(bucket=name, history=1)
    yield kv, BucketStream(client, name, timeout=2.0)
    await js.delete_key_value(name)


async def test_a_lone_key_is_listed_every_time(bucket: Bucket) -> None:
    # A KV watch listed this bucket as empty about once in 500 runs (its end-of-values
    # marker overtook the value), which is how ListTasks lost a task just published.
    kv, stream = bucket
    await kv.put("t.org.1", b"x")
    for _ in range(600):
        assert await stream.keys("t.org.*") == ["t.org.1"]


async def test_only_the_pattern_is_listed_and_tombstones_are_named(
    bucket: Bucket,
) -> None:
    kv, stream = bucket
    for key in ("t.a.1", "t.a.2", "t.b.1", "o.a.1", "t.a.3"):
        await kv.put(key, b"x")
    await kv.delete("t.a.2")
    await kv.purge("t.a.3")
    # Removed keys keep a tombstone message: callers reading values skip them.
    assert sorted(await stream.keys("t.a.*")) == ["t.a.1", "t.a.2", "t.a.3"]
    assert await stream.keys("t.b.*") == ["t.b.1"]
    assert await stream.keys("t.c.*") == []
    assert sorted(await stream.keys("*.a.*")) == ["o.a.1", "t.a.1", "t.a.2", "t.a.3"]


async def test_a_missing_bucket_is_an_error_not_an_empty_list(client: Client) -> None:
    stream = BucketStream(client, f"absent{uuid.uuid4().hex[:8]}", timeout=2.0)
    with pytest.raises(nats.js.errors.NotFoundError):
        await stream.keys("t.*.*")


async def test_no_jetstream_answer_is_unavailable(client: Client) -> None:
    # JetStream not answering (here: its API subject pointed where nobody listens) is an
    # outage like any other, UNAVAILABLE to the caller.
    stream = BucketStream(client, "ki-timeout", timeout=0.2)
    stream._info = "nobody.listens.here"
    with pytest.raises(DependencyUnavailable):
        await stream.keys("t.*.*")


async def test_entries_are_the_last_values_tombstones_included(bucket: Bucket) -> None:
    kv, stream = bucket
    assert await stream.entries(kv, "o.*.*") == []
    await kv.put("o.a.1", b"first")
    for attempt in range(300):  # the race the index closes: never an empty answer
        (entry,) = await stream.entries(kv, "o.*.*")
        assert (entry.key, entry.value) == ("o.a.1", b"first"), attempt
    await kv.put("o.a.1", b"second")
    await kv.put("o.a.2", b"x")
    await kv.put("o.b.1", b"y")
    await kv.delete("o.a.2")
    await kv.put("t.a.1", b"not a marker")
    got = {entry.key: (entry.value, entry.operation) for entry in await stream.entries(kv, "o.*.*")}
    assert got == {"o.a.1": (b"second", None), "o.a.2": (b"", "DEL"), "o.b.1": (b"y", None)}


async def test_removal_up_to_a_revision_leaves_no_tombstone_and_keeps_later_ones(
    bucket: Bucket,
) -> None:
    kv, stream = bucket
    await kv.put("t.a.1", b"a record, not under the pattern")
    old = await kv.put("o.a.1", b"x")
    await kv.put("o.a.2", b"x")
    await kv.delete("o.a.2")
    cut = await kv.put("o.a.3", b"live")
    later = await kv.put("o.a.1", b"written again")
    await stream.remove("o.>", up_to=cut - 1)
    assert sorted(await stream.keys(">")) == ["o.a.1", "o.a.3", "t.a.1"]  # no tombstone left
    entry = await kv.get("o.a.1")
    assert (entry.value, entry.revision) == (b"written again", later)
    assert old < cut
    with pytest.raises(ValueError, match="no revision 0"):
        await stream.remove("o.>", up_to=0)  # JetStream would read it as "everything"


async def test_an_unconfirmed_delete_lands_only_on_its_revision(
    client: Client, bucket: Bucket
) -> None:
    kv, stream = bucket
    stale = await kv.put("o.a.1", b"publish")
    await kv.put("o.a.1", b"queued")
    gone = await kv.put("o.a.2", b"x")
    await stream.delete_unconfirmed("o.a.1", last=stale)  # written again since: kept
    await stream.delete_unconfirmed("o.a.2", last=gone)
    await client.flush()

    async def deleted() -> None:
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("o.a.2")

    await assert_eventually(deleted, timeout=5)
    assert (await kv.get("o.a.1")).value == b"queued"


async def test_a_watch_that_finds_nothing_looks_again(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The index named a key that was removed before the watch began: no entry will come.
    kv, stream = bucket
    revision = await kv.put("o.a.1", b"x")
    real_keys = stream.keys
    looks: list[int] = []

    async def keys_then_removed(pattern: str) -> list[str]:
        found = await real_keys(pattern)
        looks.append(len(found))
        if len(looks) == 1:
            await stream.remove("o.a.1", up_to=revision)
        return found

    monkeypatch.setattr(stream, "keys", keys_then_removed)
    stream._timeout = 0.3
    assert await stream.entries(kv, "o.*.*") == []
    assert looks == [1, 0]
