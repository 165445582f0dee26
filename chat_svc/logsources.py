"""Where the troubleshooting agent reads logs: one interface, two stores.

:class:`JsonFileLogs` reads the dev stack's own JSON log files (one object a line,
written by :class:`mesh.logs.JsonFormatter`); :class:`ClickHouseLogs` reads the
OpenTelemetry collector's ClickHouse exporter table (``otel_logs``). Both answer the
same :class:`LogQuery` newest first, and both are scoped by the ``org_id`` the
*caller* passes: the query itself never names an organization, so whatever fills in a
query (a model's tool arguments) cannot widen what is read. ``org_id=None`` reads
platform-wide; deciding who may do that is the caller's job.

Nothing here blocks the event loop: files are read on a thread, tail first and within
a byte budget (a log file can be gigabytes), and ClickHouse (chDB has no async client)
is called on one worker thread per source.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from clickhouse_connect.driver.client import Client

from chat_svc.history import connect_clickhouse
from mesh.errors import DependencyUnavailable

Level = Literal["debug", "info", "warning", "error", "critical"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error", "critical")
_RANK: dict[str, int] = {level: rank for rank, level in enumerate(LEVELS)}
_LEVEL_ALIASES = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "information": "info",
    "notice": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "err": "error",
    "critical": "critical",
    "fatal": "critical",
    "crit": "critical",
}
_MAX_ATTRIBUTE_CHARS = 2000
_MAX_MESSAGE_CHARS = 8000
# Fields of a JSON line that LogRecord carries as its own attributes.
_OWN_FIELDS = frozenset({"time", "level", "service", "message", "request_id", "task_id", "org_id"})


def normalize_level(text: str) -> str:
    """``WARN``, ``Warning`` and ``warning`` are the same level; unknown names stay as they are."""
    lowered = text.strip().lower()
    return _LEVEL_ALIASES.get(lowered, lowered)


def level_rank(level: str) -> int:
    """Order of a (normalized) level; an unknown level counts as info rather than vanishing."""
    return _RANK.get(level, _RANK["info"])


@dataclass(frozen=True, kw_only=True)
class LogQuery:
    """What to look for. No organization: the scope is the caller's, passed beside the query."""

    service: str | None = None
    min_level: Level | None = None
    since: datetime | None = None
    until: datetime | None = None
    request_id: str | None = None
    task_id: str | None = None
    text: str | None = None
    """Case-insensitive substring of the message."""
    limit: int = 50

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1, not {self.limit}")
        if self.min_level is not None and self.min_level not in _RANK:
            raise ValueError(f"unknown level {self.min_level!r}: expected one of {LEVELS}")
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"{name} must be timezone-aware")

    def matches(self, record: LogRecord) -> bool:
        """The filters (not the scope) applied to one record, as the file source does."""
        if self.service is not None and record.service != self.service:
            return False
        if self.min_level is not None and level_rank(record.level) < _RANK[self.min_level]:
            return False
        if self.since is not None and record.time < self.since:
            return False
        if self.until is not None and record.time > self.until:
            return False
        if self.request_id is not None and record.request_id != self.request_id:
            return False
        if self.task_id is not None and record.task_id != self.task_id:
            return False
        return self.text is None or self.text.casefold() in record.message.casefold()


@dataclass(frozen=True, kw_only=True)
class LogRecord:
    time: datetime
    """Aware (UTC)."""
    service: str
    level: str
    """Normalized: debug, info, warning, error or critical (or the source's own word)."""
    message: str
    request_id: str | None = None
    task_id: str | None = None
    org_id: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for clients (``ToolOutput.data``)."""
        return {
            "time": self.time.isoformat(),
            "service": self.service,
            "level": self.level,
            "message": self.message,
            "request_id": self.request_id,
            "task_id": self.task_id,
            "org_id": self.org_id,
            "attributes": dict(self.attributes),
        }


class LogSource(Protocol):
    async def search(self, query: LogQuery, *, org_id: str | None) -> list[LogRecord]:
        """Records matching ``query``, newest first, at most ``query.limit``.

        ``org_id`` scopes the search to that organization's records; ``None`` reads every
        record, those of no organization included (platform-wide: operators only).
        """
        ...

    async def close(self) -> None: ...


def _check_scope(org_id: str | None) -> None:
    # An empty org would match the records of no organization: never what a scoped caller means.
    if org_id is not None and not org_id:
        raise ValueError("org_id must be None (platform-wide) or an organization id")


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonFileLogs:
    """The JSON log files in ``directory`` (``*.log``, ``*.jsonl``), read tail first.

    Each file is read backwards in ``block_size`` blocks until ``query.limit`` matches are
    found, a record older than ``query.since`` (less a little slack for lines written out
    of order) is reached, or ``max_bytes_per_file`` is spent. Lines that are not JSON
    log objects (another program's output, a line cut by the budget) are skipped.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes_per_file: int = 32 * 1024 * 1024,
        block_size: int = 64 * 1024,
        max_line_bytes: int = 1024 * 1024,
        out_of_order_seconds: float = 60.0,
    ) -> None:
        self.directory = Path(directory)
        self._max_bytes = max_bytes_per_file
        self._block_size = block_size
        self._max_line = max_line_bytes
        self._slack = out_of_order_seconds
        self.bytes_read = 0
        """Bytes read by the last search (how the budget is observed)."""

    async def search(self, query: LogQuery, *, org_id: str | None) -> list[LogRecord]:
        _check_scope(org_id)
        return await asyncio.to_thread(self._search, query, org_id)

    async def close(self) -> None:
        """Nothing to release: every search opens and closes its files."""

    def _search(self, query: LogQuery, org_id: str | None) -> list[LogRecord]:
        self.bytes_read = 0
        found: list[LogRecord] = []
        for path in self._files():
            found += self._search_file(path, query, org_id)
        found.sort(key=lambda record: record.time, reverse=True)
        return found[: query.limit]

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(
            path
            for path in self.directory.iterdir()
            if path.suffix in (".log", ".jsonl") and path.is_file()
        )

    def _search_file(self, path: Path, query: LogQuery, org_id: str | None) -> list[LogRecord]:
        found: list[LogRecord] = []
        oldest = query.since.timestamp() - self._slack if query.since is not None else None
        try:
            lines = self._lines_backwards(path)
            for line in lines:
                record = parse_json_line(line)
                if record is None:
                    continue
                if oldest is not None and record.time.timestamp() < oldest:
                    break
                if org_id is not None and record.org_id != org_id:
                    continue
                if query.matches(record):
                    found.append(record)
                    if len(found) >= query.limit:
                        break
        except OSError:
            return found  # a file rotated away or unreadable: the others still answer
        return found

    def _lines_backwards(self, path: Path) -> Iterator[bytes]:
        """The file's lines, last first, until the byte budget is spent."""
        with path.open("rb") as file:
            position = file.seek(0, os.SEEK_END)
            stop = max(0, position - self._max_bytes)
            carry = b""
            while position > stop:
                size = min(self._block_size, position - stop)
                position -= size
                file.seek(position)
                block = file.read(size)
                self.bytes_read += len(block)
                parts = (block + carry).split(b"\n")
                # The first part may continue in the block before this one.
                carry = parts[0]
                for line in reversed(parts[1:]):
                    if line:
                        yield line
                if len(carry) > self._max_line:
                    carry = b""  # an absurdly long line: not a log record we can show
            if position == 0 and carry:
                yield carry  # the file's first line (a line cut by the budget is dropped)


def parse_json_line(line: bytes | str) -> LogRecord | None:
    """One line of :class:`mesh.logs.JsonFormatter` output as a record, or None."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    moment, level, message = entry.get("time"), entry.get("level"), entry.get("message")
    if not (isinstance(moment, str) and isinstance(level, str) and isinstance(message, str)):
        return None
    try:
        time = datetime.fromisoformat(moment)
    except ValueError:
        return None
    if time.tzinfo is None:
        time = time.replace(tzinfo=UTC)

    def text(name: str) -> str | None:
        value = entry.get(name)
        return str(value) if value is not None and value != "" else None

    attributes = {
        str(key): _bounded(value if isinstance(value, str) else json.dumps(value, default=str),
                           _MAX_ATTRIBUTE_CHARS)
        for key, value in entry.items()
        if key not in _OWN_FIELDS
    }  # fmt: skip
    return LogRecord(
        time=time,
        service=str(entry.get("service") or ""),
        level=normalize_level(level),
        message=_bounded(message, _MAX_MESSAGE_CHARS),
        request_id=text("request_id"),
        task_id=text("task_id"),
        org_id=text("org_id"),
        attributes=attributes,
    )


# OpenTelemetry severity numbers: the lowest number of each level's range.
_SEVERITY_NUMBER = {"debug": 5, "info": 9, "warning": 13, "error": 17, "critical": 21}
_SEVERITY_TEXTS = {
    "debug": ["TRACE", "DEBUG"],
    "info": ["INFO", "INFORMATION", "NOTICE"],
    "warning": ["WARN", "WARNING"],
    "error": ["ERROR", "ERR"],
    "critical": ["FATAL", "CRITICAL", "CRIT"],
}
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63})?")
_OTEL_OWN_ATTRIBUTES = frozenset({"request_id", "task_id", "org_id"})


class ClickHouseLogs:
    """The OpenTelemetry collector's ClickHouse exporter table (``otel_logs`` layout).

    The organization of a row is ``LogAttributes['org_id']``, else
    ``ResourceAttributes['org_id']``; request and task ids are log attributes. Every value
    of a query is a server-side parameter (``{name:Type}``); only fixed fragments and the
    table name (checked, from settings) are formatted into the SQL. chDB runs one engine
    per process; a second client on the same path (chat history's) shares it.
    """

    def __init__(self, dsn: str, *, table: str = "otel_logs") -> None:
        if _TABLE.fullmatch(table) is None:
            raise ValueError(f"not a table name: {table!r}")
        self._dsn = dsn
        self._table = table
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logs")
        self._client: Client | None = None

    def _connected(self) -> Client:
        if self._client is None:
            self._client = connect_clickhouse(self._dsn)
        return self._client

    async def search(self, query: LogQuery, *, org_id: str | None) -> list[LogRecord]:
        _check_scope(org_id)
        sql, parameters = self.sql(query, org_id=org_id)

        def run() -> list[LogRecord]:
            rows = self._connected().query(sql, parameters=parameters).result_rows
            return [_otel_record(row) for row in rows]

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, run)
        except Exception as error:
            raise DependencyUnavailable("clickhouse logs", error) from error

    def sql(self, query: LogQuery, *, org_id: str | None) -> tuple[str, dict[str, Any]]:
        """The SELECT for ``query`` and its bound parameters (fixed fragments only in the SQL)."""
        conditions: list[str] = []
        parameters: dict[str, Any] = {"limit": query.limit}
        if org_id is not None:
            conditions.append("org = {org:String}")
            parameters["org"] = org_id
        if query.service is not None:
            conditions.append("ServiceName = {service:String}")
            parameters["service"] = query.service
        if query.min_level is not None:
            # Exporters set SeverityNumber; a row without one is judged by its text.
            conditions.append(
                "(SeverityNumber >= {severity:UInt8} OR (SeverityNumber = 0 "
                "AND upper(SeverityText) IN {severities:Array(String)}))"
            )
            parameters["severity"] = _SEVERITY_NUMBER[query.min_level]
            parameters["severities"] = [
                word
                for level in LEVELS[_RANK[query.min_level] :]
                for word in _SEVERITY_TEXTS[level]
            ]
        if query.since is not None:
            conditions.append("Timestamp >= {since:DateTime64(6, 'UTC')}")
            parameters["since"] = query.since.astimezone(UTC)
        if query.until is not None:
            conditions.append("Timestamp <= {until:DateTime64(6, 'UTC')}")
            parameters["until"] = query.until.astimezone(UTC)
        if query.request_id is not None:
            conditions.append("LogAttributes['request_id'] = {request:String}")
            parameters["request"] = query.request_id
        if query.task_id is not None:
            conditions.append("LogAttributes['task_id'] = {task:String}")
            parameters["task"] = query.task_id
        if query.text is not None:
            conditions.append("positionCaseInsensitiveUTF8(Body, {text:String}) > 0")
            parameters["text"] = query.text
        where = " AND ".join(conditions) or "1"
        sql = (
            "SELECT toTimeZone(Timestamp, 'UTC'), ServiceName, SeverityText, "  # noqa: S608
            "SeverityNumber, Body, LogAttributes, TraceId, SpanId, "
            "if(LogAttributes['org_id'] != '', LogAttributes['org_id'], "
            "ResourceAttributes['org_id']) AS org "
            f"FROM {self._table} WHERE {where} "
            "ORDER BY Timestamp DESC LIMIT {limit:UInt32}"
        )
        return sql, parameters

    async def close(self) -> None:
        def close() -> None:
            if self._client is not None:
                self._client.close()
                self._client = None

        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, close)
        finally:
            self._thread.shutdown(wait=True)


def _severity_level(text: str, number: int) -> str:
    if text:
        return normalize_level(text)
    for level in reversed(LEVELS):
        if number >= _SEVERITY_NUMBER[level]:
            return level
    return "debug" if number else "info"


def _otel_record(row: Sequence[Any]) -> LogRecord:
    moment, service, severity, number, body, log_attributes, trace, span, org = row
    time: datetime = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    attributes = {
        str(key): _bounded(str(value), _MAX_ATTRIBUTE_CHARS)
        for key, value in dict(log_attributes).items()
        if key not in _OTEL_OWN_ATTRIBUTES
    }
    if trace:
        attributes["trace_id"] = str(trace)
    if span:
        attributes["span_id"] = str(span)
    return LogRecord(
        time=time.astimezone(UTC),
        service=str(service),
        level=_severity_level(str(severity), int(number)),
        message=_bounded(str(body), _MAX_MESSAGE_CHARS),
        request_id=log_attributes.get("request_id") or None,
        task_id=log_attributes.get("task_id") or None,
        org_id=str(org) or None,
        attributes=attributes,
    )


def open_log_source(spec: str) -> LogSource | None:
    """The log source ``OPSMESH_LOGS_SOURCE`` names; None when it is empty (no log tools)."""
    spec = spec.strip()
    if not spec:
        return None
    if spec.startswith("files://"):
        directory = spec.removeprefix("files://")
        if not directory:
            raise ValueError("OPSMESH_LOGS_SOURCE=files:// needs a directory: files://.run/logs")
        return JsonFileLogs(directory)
    if spec.startswith(("chdb://", "http://", "https://", "clickhouse://", "clickhouses://")):
        return ClickHouseLogs(spec)
    raise ValueError(
        f"OPSMESH_LOGS_SOURCE={spec!r}: expected files://DIR (JSON log files) or a ClickHouse "
        "DSN (chdb://PATH, http(s)://host:8123/db, clickhouse://...) with an otel_logs table"
    )
