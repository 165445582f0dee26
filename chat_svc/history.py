"""Chat history in ClickHouse through clickhouse-connect: chDB embedded or a server, same code.

The schema lives in ``schema/NNN_*.sql`` and is applied once at start, in order,
recorded in ``schema_migrations`` (applying twice changes nothing). chDB runs one
engine per process and has no async client, so every call runs on one worker
thread. Writes go through :class:`HistoryWriter`: batched off the request path,
retried while ClickHouse is away, flushed at shutdown, bounded in memory, and
loud about anything it had to drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.insert import InsertContext

from mesh.errors import DependencyUnavailable

log = logging.getLogger("opsmesh.history")

SCHEMA_DIR = Path(__file__).parent / "schema"
COLUMNS = [
    "session_id",
    "timestamp",
    "user_id",
    "org_id",
    "message_type",
    "content",
    "metadata",
    "message_id",
    "incomplete",
]


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    session_id: str
    user_id: str
    org_id: str
    role: str
    """user, assistant or system (the seed's message_type)."""
    content: str
    timestamp: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    incomplete: bool = False

    def row(self) -> list[Any]:
        return [
            uuid.UUID(self.session_id),
            self.timestamp,
            self.user_id,
            self.org_id,
            self.role,
            self.content,
            self.metadata,
            uuid.UUID(self.message_id),
            self.incomplete,
        ]


def connect_clickhouse(dsn: str) -> Client:
    """A blocking clickhouse-connect client: chDB in-process (``chdb://PATH``) or a server."""
    if dsn.startswith("chdb://"):
        Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=dsn)


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]


class HistoryStore:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        # chDB: one engine per process and blocking calls, so one thread owns the client.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")
        self._client: Client | None = None
        # The insert's column types, read from the table once: without it every batch would
        # cost a DESCRIBE query first (a fifth of an insert's CPU in embedded chDB).
        self._insert_context: InsertContext | None = None

    async def _run(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, function, *args)
        except DependencyUnavailable:
            raise
        except Exception as error:
            raise DependencyUnavailable("clickhouse", error) from error

    def _connected(self) -> Client:
        if self._client is None:
            self._client = connect_clickhouse(self._dsn)
        return self._client

    def _migrate(self) -> list[str]:
        client = self._connected()
        client.command(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
            "ENGINE = MergeTree ORDER BY version"
        )
        done = {row[0] for row in client.query("SELECT version FROM schema_migrations").result_rows}
        applied = []
        for path in sorted(SCHEMA_DIR.glob("*.sql")):
            version = int(path.name.split("_", 1)[0])
            if version in done:
                continue
            for statement in _statements(path.read_text()):
                client.command(statement)
            client.insert(
                "schema_migrations", [[version, path.name]], column_names=["version", "name"]
            )
            applied.append(path.name)
        self._insert_context = None  # the columns may have changed
        return applied

    async def migrate(self) -> list[str]:
        """Applies the schema files not applied yet; their names."""
        applied: list[str] = await self._run(self._migrate)
        if applied:
            log.info("history schema migrated: %s", ", ".join(applied))
        return applied

    async def insert(self, messages: Sequence[Message]) -> None:
        rows = [message.row() for message in messages]

        def insert() -> None:
            client = self._connected()
            if self._insert_context is None:
                self._insert_context = client.create_insert_context(
                    "chat_history", column_names=COLUMNS
                )
            self._insert_context.data = rows
            try:
                client.insert(context=self._insert_context)
            finally:
                self._insert_context.data = None  # holds no batch between inserts

        await self._run(insert)

    async def page(
        self,
        *,
        org_id: str,
        user_id: str,
        session_id: str,
        limit: int,
        newest_first: bool,
        after: tuple[datetime, str] | None,
    ) -> list[Message]:
        order = "DESC" if newest_first else "ASC"
        comparison = "<" if newest_first else ">"
        parameters: dict[str, Any] = {
            "org": org_id,
            "user": user_id,
            "session": session_id,
            "limit": limit,
        }
        cursor = ""
        if after is not None:
            cursor = (
                f"AND (timestamp, message_id) {comparison} "
                "({at:DateTime64(3, 'UTC')}, {mid:UUID})"
            )
            parameters.update(at=after[0], mid=after[1])
        # Only fixed fragments are formatted in; every value is a bound parameter.
        query = (
            "SELECT message_id, session_id, user_id, org_id, message_type, content, "  # noqa: S608
            "toJSONString(metadata), timestamp, incomplete FROM chat_history "
            "WHERE org_id = {org:String} AND user_id = {user:String} "
            f"AND session_id = {{session:UUID}} {cursor} "
            f"ORDER BY timestamp {order}, message_id {order} LIMIT {{limit:UInt32}}"
        )

        def run() -> list[Message]:
            result = self._connected().query(query, parameters=parameters)
            return [
                Message(
                    message_id=str(row[0]),
                    session_id=str(row[1]),
                    user_id=row[2],
                    org_id=row[3],
                    role=row[4],
                    content=row[5],
                    metadata=json.loads(row[6]),
                    timestamp=row[7].replace(tzinfo=UTC) if row[7].tzinfo is None else row[7],
                    incomplete=bool(row[8]),
                )
                for row in result.result_rows
            ]

        messages: list[Message] = await self._run(run)
        return messages

    async def ping(self) -> None:
        await self._run(lambda: self._connected().command("SELECT 1"))

    async def close(self) -> None:
        def close() -> None:
            if self._client is not None:
                self._client.close()

        await self._run(close)
        self._thread.shutdown(wait=True)


def merged(
    stored: Sequence[Message],
    unwritten: Sequence[Message],
    *,
    limit: int,
    newest_first: bool,
    after: tuple[datetime, str] | None,
) -> list[Message]:
    """A page of the history from ClickHouse's page and the messages not written to it yet.

    ``stored`` is ClickHouse's first ``limit`` messages after ``after``; the page of both is
    the first ``limit`` of their union, each message once (one may be in both while its batch
    is being written).
    """

    def key(message: Message) -> tuple[datetime, str]:
        return (message.timestamp, message.message_id)

    if after is not None:
        unwritten = [m for m in unwritten if (key(m) < after if newest_first else key(m) > after)]
    if not unwritten:
        return list(stored)
    by_id = {m.message_id: m for m in stored}
    by_id.update((m.message_id, m) for m in unwritten)
    return sorted(by_id.values(), key=key, reverse=newest_first)[:limit]


class HistoryWriter:
    """Writes messages in batches, off the request path; never blocks a stream on ClickHouse.

    A batch goes at least every ``flush_interval`` (a second by default: ClickHouse advises
    about one insert per second, since every insert is a part its background merges rewrite;
    with embedded chDB those merges run in this process). Reads merge what is still waiting
    (:meth:`unwritten`), so a client sees its answer in the history at once.
    """

    def __init__(
        self,
        store: HistoryStore,
        *,
        max_pending: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        retry_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._pending: list[Message] = []
        self._max_pending = max_pending
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_interval = retry_interval
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def add(self, *messages: Message) -> None:
        room = self._max_pending - len(self._pending)
        if room < len(messages):
            lost = messages[room:] if room > 0 else messages
            self.dropped += len(lost)
            log.error(
                "history buffer full (%d messages waiting for ClickHouse): %d messages NOT "
                "stored: %s",
                len(self._pending),
                len(lost),
                ", ".join(m.message_id for m in lost),
            )
            messages = messages[: max(room, 0)]
        self._pending.extend(messages)
        if len(self._pending) >= self._batch_size:
            self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def unwritten(self, *, org_id: str, user_id: str, session_id: str) -> list[Message]:
        """The session's messages still waiting for ClickHouse (a read sees its own writes)."""
        return [
            m
            for m in self._pending
            if m.session_id == session_id and m.user_id == user_id and m.org_id == org_id
        ]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="history-writer")

    async def _flush_once(self) -> bool:
        batch = self._pending[: self._batch_size]
        if not batch:
            return True
        try:
            await self._store.insert(batch)
        except DependencyUnavailable as error:
            log.warning("history write of %d messages failed, retrying: %s", len(batch), error)
            return False
        del self._pending[: len(batch)]
        return True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._flush_interval)
            self._wakeup.clear()
            while self._pending:
                if not await self._flush_once():
                    await asyncio.sleep(self._retry_interval)
                    break

    async def close(self, within: float = 10.0) -> None:
        """Stops the loop and writes what is left, trying for ``within`` seconds."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        deadline = asyncio.get_running_loop().time() + within
        while self._pending and asyncio.get_running_loop().time() < deadline:
            if not await self._flush_once():
                await asyncio.sleep(min(self._retry_interval, 0.5))
        if self._pending:
            log.error(
                "shutting down with %d history messages NOT stored: %s",
                len(self._pending),
                ", ".join(m.message_id for m in self._pending),
            )
