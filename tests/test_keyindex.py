"""task_svc.keyindex against a real nats-server: the listing behind ListTasks and the reaper."""

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
from task_svc.keyindex import KeyIndex


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
async def bucket(client: Client) -> AsyncIterator[tuple[KeyValue, KeyIndex]]:
    name = f"ki{uuid.uuid4().hex[:10]}"
    js = client.jetstream(timeout=2.0)
    kv = await js.create_key_value(bucket=name, history=1)
    yield kv, KeyIndex(client, name, timeout=2.0)
    await js.delete_key_value(name)


async def test_a_lone_key_is_listed_every_time(bucket: tuple[KeyValue, KeyIndex]) -> None:
    # A KV watch listed this bucket as empty about once in 500 runs (its end-of-values
    # marker overtook the value), which is how ListTasks lost a task just published.
    kv, index = bucket
    await kv.put("t.org.1", b"x")
    for _ in range(600):
        assert await index.keys("t.org.*") == ["t.org.1"]


async def test_only_the_pattern_is_listed_and_tombstones_are_named(
    bucket: tuple[KeyValue, KeyIndex],
) -> None:
    kv, index = bucket
    for key in ("t.a.1", "t.a.2", "t.b.1", "o.a.1", "t.a.3"):
        await kv.put(key, b"x")
    await kv.delete("t.a.2")
    await kv.purge("t.a.3")
    # Removed keys keep a tombstone message: callers reading values skip them.
    assert sorted(await index.keys("t.a.*")) == ["t.a.1", "t.a.2", "t.a.3"]
    assert await index.keys("t.b.*") == ["t.b.1"]
    assert await index.keys("t.c.*") == []
    assert sorted(await index.keys("*.a.*")) == ["o.a.1", "t.a.1", "t.a.2", "t.a.3"]


async def test_a_missing_bucket_is_an_error_not_an_empty_list(client: Client) -> None:
    index = KeyIndex(client, f"absent{uuid.uuid4().hex[:8]}", timeout=2.0)
    with pytest.raises(nats.js.errors.NotFoundError):
        await index.keys("t.*.*")


async def test_no_jetstream_answer_is_unavailable(client: Client) -> None:
    # JetStream not answering (here: its API subject pointed where nobody listens) is an
    # outage like any other, UNAVAILABLE to the caller.
    index = KeyIndex(client, "ki-timeout", timeout=0.2)
    index._info = "nobody.listens.here"
    with pytest.raises(DependencyUnavailable):
        await index.keys("t.*.*")


async def test_entries_are_the_latest_values_without_removed_keys(
    bucket: tuple[KeyValue, KeyIndex],
) -> None:
    kv, index = bucket
    assert await index.entries(kv, "o.*.*") == []
    await kv.put("o.a.1", b"first")
    for attempt in range(300):  # the race the index closes: never an empty answer
        (entry,) = await index.entries(kv, "o.*.*")
        assert (entry.key, entry.value) == ("o.a.1", b"first"), attempt
    await kv.put("o.a.1", b"second")
    await kv.put("o.a.2", b"x")
    await kv.put("o.b.1", b"y")
    await kv.delete("o.a.2")
    await kv.put("t.a.1", b"not a marker")
    got = {entry.key: entry.value for entry in await index.entries(kv, "o.*.*")}
    assert got == {"o.a.1": b"second", "o.b.1": b"y"}
    await kv.purge("o.a.1")
    await kv.delete("o.b.1")
    assert await index.entries(kv, "o.*.*") == []  # only tombstones: still answered
