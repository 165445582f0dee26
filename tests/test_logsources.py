"""Log sources, pattern mining and the troubleshooting tools, against real engines.

The same log lines are written twice: to JSON files through the real
:class:`mesh.logs.JsonFormatter` (with the caller's principal in the context, as an
RPC handler logs) and into a real chDB table with the OpenTelemetry ClickHouse
exporter's DDL. Every search expectation runs against both sources.
``explain_task_failure`` runs against a real task_svc and worker on a real
nats-server, reading the worker's own log lines.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from chat_svc.agents.tools import Tool, ToolContext, ToolFailure, ToolOutput
from chat_svc.agents.troubleshooting import relative, troubleshooting_tools
from chat_svc.logpatterns import mine_patterns
from chat_svc.logsources import (
    ClickHouseLogs,
    JsonFileLogs,
    LogQuery,
    LogRecord,
    LogSource,
    open_log_source,
    parse_json_line,
)
from devtools.servers import NatsServer
from mesh.context import Principal, principal_var, request_id_var
from mesh.logs import JsonFormatter
from opsmesh.task.v1 import task_pb2 as pb
from tests.helpers import assert_eventually, identity
from tests.taskkit import Script, ScriptedHandler, running_worker, task_stack

BASE = (datetime.now(UTC) - timedelta(minutes=10)).replace(microsecond=0)
HOUR_AGO = BASE - timedelta(hours=1)
ALICE = Principal("alice", "acme")
BOB = Principal("bob", "globex")

# The exporter's default otel_logs DDL (opentelemetry-collector-contrib clickhouseexporter).
OTEL_LOGS_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TimestampTime DateTime DEFAULT toDateTime(Timestamp),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    TraceFlags UInt8,
    SeverityText LowCardinality(String) CODEC(ZSTD(1)),
    SeverityNumber UInt8,
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    Body String CODEC(ZSTD(1)),
    ResourceSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeSchemaUrl LowCardinality(String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion LowCardinality(String) CODEC(ZSTD(1)),
    ScopeAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    LogAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_key mapKeys(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_log_attr_value mapValues(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 1
) ENGINE = MergeTree()
PARTITION BY toDate(TimestampTime)
ORDER BY (ServiceName, TimestampTime, Timestamp)
TTL TimestampTime + toIntervalDay(180)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""


@dataclass(frozen=True)
class Line:
    at: datetime
    service: str
    level: int
    message: str
    principal: Principal | None = None
    request_id: str | None = None
    task_id: str | None = None
    org_extra: str | None = None
    """An org passed as a log extra (a worker acting for a task), not through a principal."""

    @property
    def org(self) -> str | None:
        return self.org_extra or (self.principal.org_id if self.principal else None)


SEED = [
    Line(BASE - timedelta(hours=3), "chat_svc", logging.INFO, "ancient line", ALICE),
    Line(BASE - timedelta(seconds=1), "chat_svc", logging.INFO, "startup complete"),
    Line(BASE, "chat_svc", logging.INFO, "session opened", ALICE, "r-1"),
    *[
        Line(
            BASE + timedelta(seconds=n),
            "chat_svc",
            logging.ERROR,
            f"connection to 10.0.0.{n} refused",
            ALICE,
            "r-2",
        )
        for n in range(1, 31)
    ],
    Line(BASE + timedelta(seconds=40), "chat_svc", logging.WARNING, "Slow reply", BOB, "r-3"),
    Line(BASE + timedelta(seconds=41), "chat_svc", logging.DEBUG, "token counted", ALICE),
    Line(
        BASE + timedelta(seconds=50),
        "task_worker",
        logging.ERROR,
        "task t-1 failed for good: smtp down",
        task_id="t-1",
        org_extra="acme",
    ),
    Line(BASE + timedelta(seconds=51), "task_worker", logging.CRITICAL, "worker lost its lease"),
    Line(
        BASE + timedelta(seconds=52),
        "task_worker",
        logging.WARNING,
        "task t-9 retrying",
        task_id="t-9",
        org_extra="globex",
    ),
]
RECENT = [line for line in SEED if line.at >= HOUR_AGO]


def write_json_logs(directory: Path, lines: list[Line]) -> None:
    """Logs each line through a logger with the real JsonFormatter, one file per service."""
    directory.mkdir(parents=True, exist_ok=True)
    handlers: dict[str, logging.FileHandler] = {}
    logger = logging.getLogger(f"test.logsources.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        for line in lines:
            handler = handlers.get(line.service)
            if handler is None:
                handler = logging.FileHandler(directory / f"{line.service}.log")
                handler.setFormatter(JsonFormatter(service=line.service))
                handlers[line.service] = handler
            extra = {
                key: value
                for key, value in (("task_id", line.task_id), ("org_id", line.org_extra))
                if value
            }
            record = logger.makeRecord(
                logger.name, line.level, __file__, 0, line.message, (), None, extra=extra
            )
            record.created = line.at.timestamp()
            principal_token = principal_var.set(line.principal)
            request_token = request_id_var.set(line.request_id)
            try:
                handler.handle(record)
            finally:
                request_id_var.reset(request_token)
                principal_var.reset(principal_token)
            if line.message == "session opened":
                handler.stream.write("a line some other program wrote\n{not json either\n[1, 2]\n")
    finally:
        for handler in handlers.values():
            handler.close()
    (directory / "nats.log").write_text("[123] 2025/01/01 nats-server started\n")


_SEVERITY = {
    logging.DEBUG: ("DEBUG", 5),
    logging.INFO: ("INFO", 9),
    logging.WARNING: ("WARN", 13),
    logging.ERROR: ("ERROR", 17),
    logging.CRITICAL: ("FATAL", 21),
}


def insert_otel_logs(dsn: str, table: str, lines: list[Line]) -> None:
    """The same lines as the collector's exporter stores them."""
    client = clickhouse_connect.get_client(dsn=dsn)
    try:
        client.command(OTEL_LOGS_DDL.format(table=table))
        rows = []
        for line in lines:
            text, number = _SEVERITY[line.level]
            resource = {"service.name": line.service}
            attributes = {}
            for key, value in (("request_id", line.request_id), ("task_id", line.task_id)):
                if value:
                    attributes[key] = value
            if line.org is not None:
                # One organization only as a resource attribute: the fallback is read too.
                target = resource if line.org == "globex" else attributes
                target["org_id"] = line.org
            rows.append(
                [line.at, line.service, text, number, line.message, resource, attributes, "ab12"]
            )
        client.insert(
            table,
            rows,
            column_names=[
                "Timestamp",
                "ServiceName",
                "SeverityText",
                "SeverityNumber",
                "Body",
                "ResourceAttributes",
                "LogAttributes",
                "TraceId",
            ],
        )
    finally:
        client.close()


def table_rows(dsn: str, table: str) -> int:
    client = clickhouse_connect.get_client(dsn=dsn)
    try:
        return int(client.query(f"SELECT count() FROM {table}").result_rows[0][0])  # noqa: S608
    finally:
        client.close()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("logs")
    write_json_logs(directory, SEED)
    return directory


@pytest.fixture(scope="module")
def otel_table(history_dsn: str) -> str:
    table = f"otel_logs_{uuid.uuid4().hex[:8]}"
    insert_otel_logs(history_dsn, table, SEED)
    return table


@pytest.fixture(params=["files", "clickhouse"])
async def source(
    request: pytest.FixtureRequest, log_dir: Path, otel_table: str, history_dsn: str
) -> AsyncIterator[LogSource]:
    logs: LogSource
    if request.param == "files":
        logs = JsonFileLogs(log_dir)
    else:
        logs = ClickHouseLogs(history_dsn, table=otel_table)
    yield logs
    await logs.close()


def messages(records: list[LogRecord]) -> list[str]:
    return [record.message for record in records]


async def search(source: LogSource, org_id: str | None = None, **filters: Any) -> list[LogRecord]:
    filters.setdefault("since", HOUR_AGO)
    filters.setdefault("limit", 200)
    return await source.search(LogQuery(**filters), org_id=org_id)


# --- the JSON lines the formatter writes ---------------------------------------------------


def test_json_lines_carry_the_callers_org_and_user_and_task_extras(log_dir: Path) -> None:
    lines = (log_dir / "chat_svc.log").read_text().splitlines()
    opened = next(parse_json_line(line) for line in lines if "session opened" in line)
    assert opened is not None
    assert (opened.org_id, opened.request_id) == ("acme", "r-1")
    assert opened.attributes["user_id"] == "alice"
    assert opened.time == BASE
    anonymous = next(parse_json_line(line) for line in lines if "startup complete" in line)
    assert anonymous is not None
    assert anonymous.org_id is None
    assert "user_id" not in anonymous.attributes
    worker = parse_json_line((log_dir / "task_worker.log").read_text().splitlines()[0])
    assert worker is not None
    assert (worker.org_id, worker.task_id, worker.level) == ("acme", "t-1", "error")
    assert parse_json_line("a line some other program wrote") is None
    assert parse_json_line("[1, 2]") is None


# --- both sources ---------------------------------------------------------------------------


async def test_newest_first_and_limit(source: LogSource) -> None:
    everything = await search(source)
    assert len(everything) == len(RECENT)
    assert (
        messages(everything) == [line.message for line in sorted(RECENT, key=lambda x: x.at)][::-1]
    )
    times = [record.time for record in everything]
    assert times == sorted(times, reverse=True)
    assert all(record.time.tzinfo is not None for record in everything)
    newest = await search(source, limit=3)
    assert messages(newest) == ["task t-9 retrying", "worker lost its lease", messages(newest)[2]]
    assert messages(newest) == messages(everything)[:3]


async def test_filters(source: LogSource) -> None:
    assert len(await search(source, service="task_worker")) == 3
    assert len(await search(source, service="nats")) == 0
    errors = await search(source, min_level="error")
    assert len(errors) == 32
    assert {record.level for record in errors} == {"error", "critical"}
    assert messages(await search(source, min_level="critical")) == ["worker lost its lease"]
    warnings = await search(source, min_level="warning")
    assert {record.level for record in warnings} == {"warning", "error", "critical"}
    assert len(warnings) == 34
    window = await search(
        source, since=BASE + timedelta(seconds=10), until=BASE + timedelta(seconds=20)
    )
    assert messages(window) == [f"connection to 10.0.0.{n} refused" for n in range(20, 9, -1)]
    assert {record.request_id for record in await search(source, request_id="r-2")} == {"r-2"}
    assert len(await search(source, request_id="r-2")) == 30
    tagged = await search(source, task_id="t-1")
    assert messages(tagged) == ["task t-1 failed for good: smtp down"]
    assert tagged[0].task_id == "t-1"
    assert messages(await search(source, text="Connection To 10.0.0.7 REFUSED")) == [
        "connection to 10.0.0.7 refused"
    ]
    assert messages(await search(source, text="ANCIENT")) == []
    assert messages(await search(source, text="ANCIENT", since=None)) == ["ancient line"]
    combined = await search(source, service="chat_svc", min_level="warning", request_id="r-3")
    assert messages(combined) == ["Slow reply"]


async def test_an_org_reads_only_its_own_lines(source: LogSource) -> None:
    acme = await search(source, org_id="acme")
    assert len(acme) == 33
    assert {record.org_id for record in acme} == {"acme"}
    globex = await search(source, org_id="globex")
    assert messages(globex) == ["task t-9 retrying", "Slow reply"]
    assert await search(source, org_id="initech") == []
    assert await search(source, org_id="acme", request_id="r-3") == []
    assert await search(source, org_id="acme", min_level="critical") == []
    # Platform-wide only when asked: lines of no organization appear only then.
    everywhere = await search(source, org_id=None)
    assert {record.org_id for record in everywhere} == {"acme", "globex", None}
    with pytest.raises(ValueError, match="org_id"):
        await search(source, org_id="")


async def test_sql_shaped_arguments_are_plain_text(
    source: LogSource, otel_table: str, history_dsn: str
) -> None:
    for text in ("' OR '1'='1", "x'); DROP TABLE " + otel_table + "; --", "%", "\\", "{text}"):
        assert await search(source, text=text) == []
    assert await search(source, service="chat_svc' OR 1=1 --") == []
    assert await search(source, request_id="') OR 1=1 --", org_id="acme") == []
    assert await search(source, task_id="t-1' OR ''='", org_id="globex") == []
    assert table_rows(history_dsn, otel_table) == len(SEED)


def test_queries_validate_themselves() -> None:
    with pytest.raises(ValueError, match="limit"):
        LogQuery(limit=0)
    with pytest.raises(ValueError, match="timezone"):
        LogQuery(since=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="level"):
        LogQuery(min_level="loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="table"):
        ClickHouseLogs("chdb:///nowhere", table="otel_logs; DROP TABLE x")


# --- the file source's budget ---------------------------------------------------------------


async def test_a_huge_file_is_read_from_its_end_within_the_budget(tmp_path: Path) -> None:
    directory = tmp_path / "huge"
    old = [Line(BASE - timedelta(minutes=5), "chat_svc", logging.ERROR, "the oldest error", ALICE)]
    write_json_logs(directory, old)
    filler = (b'{"time": "not a time", "level": "INFO", "message": "' + b"x" * 200 + b'"}\n') * (
        100_000
    )  # about 24 MB of lines that are not records
    with (directory / "chat_svc.log").open("ab") as file:
        file.write(filler)
    newest = [
        Line(BASE + timedelta(seconds=n), "chat_svc", logging.ERROR, f"fresh error {n}", ALICE)
        for n in range(5)
    ]
    write_json_logs(directory / "tail", newest)
    with (directory / "chat_svc.log").open("ab") as file:
        file.write((directory / "tail" / "chat_svc.log").read_bytes())
    size = (directory / "chat_svc.log").stat().st_size
    assert size > 20_000_000

    logs = JsonFileLogs(directory, max_bytes_per_file=1_000_000, block_size=64 * 1024)
    found = await logs.search(LogQuery(min_level="error", limit=3), org_id="acme")
    assert messages(found) == ["fresh error 4", "fresh error 3", "fresh error 2"]
    assert logs.bytes_read <= 64 * 1024 + len("[123] 2025/01/01 nats-server started\n")

    everything = await logs.search(LogQuery(limit=200), org_id="acme")
    assert messages(everything) == [f"fresh error {n}" for n in range(4, -1, -1)]
    assert logs.bytes_read <= 1_000_000 + 100  # the budget, not the file
    # With a budget as large as the file, the first line is reached (the budget is the limit).
    whole = JsonFileLogs(directory, max_bytes_per_file=size)
    assert "the oldest error" in messages(await whole.search(LogQuery(limit=200), org_id="acme"))


async def test_a_window_stops_reading_at_older_lines(tmp_path: Path) -> None:
    lines = [
        Line(BASE - timedelta(hours=9) + timedelta(seconds=n), "chat_svc", logging.INFO, f"old {n}")
        for n in range(20_000)
    ] + [Line(BASE, "chat_svc", logging.INFO, "new")]
    write_json_logs(tmp_path / "w", lines)
    logs = JsonFileLogs(tmp_path / "w")
    found = await logs.search(LogQuery(since=BASE - timedelta(minutes=1)), org_id=None)
    assert messages(found) == ["new"]
    assert logs.bytes_read < (tmp_path / "w" / "chat_svc.log").stat().st_size / 4


# --- patterns -------------------------------------------------------------------------------


async def test_patterns_count_lines_of_one_template(source: LogSource) -> None:
    records = await search(source, org_id="acme")
    patterns = mine_patterns(records, top=3)
    top = patterns[0]
    assert (top.template, top.count, top.level) == ("connection to <IP> refused", 30, "error")
    assert (top.first_seen, top.last_seen) == (
        BASE + timedelta(seconds=1),
        BASE + timedelta(seconds=30),
    )
    assert top.example == "connection to 10.0.0.30 refused"
    assert top.services == ("chat_svc",)
    assert len(patterns) == 3
    assert all(pattern.count == 1 for pattern in patterns[1:])


def test_patterns_mask_ids_numbers_and_sort_by_count() -> None:
    def record(message: str, seconds: int, level: str = "info") -> LogRecord:
        return LogRecord(
            time=BASE + timedelta(seconds=seconds), service="s", level=level, message=message
        )

    records = [
        *(record(f"task {uuid.uuid4()} took {n * 7}ms", n) for n in range(4)),
        *(record(f"object 0x{n:08x}ff evicted after {n}.5s", n, "warning") for n in range(6)),
        record("disk full", 1, "critical"),
    ]
    patterns = mine_patterns(records, top=10)
    assert [(p.template, p.count) for p in patterns] == [
        ("object <HEX> evicted after <NUM>", 6),
        ("task <UUID> took <NUM>", 4),
        ("disk full", 1),
    ]
    assert patterns[2].level == "critical"
    assert mine_patterns(records, top=1)[0].count == 6
    assert mine_patterns([], top=5) == []
    with pytest.raises(ValueError, match="top"):
        mine_patterns(records, top=0)


# --- open_log_source ------------------------------------------------------------------------


async def test_open_log_source_by_spec(tmp_path: Path, history_dsn: str) -> None:
    files = open_log_source(f"files://{tmp_path}")
    assert isinstance(files, JsonFileLogs)
    assert files.directory == tmp_path
    assert await files.search(LogQuery(), org_id=None) == []
    await files.close()
    for spec in (history_dsn, "http://clickhouse:8123/logs", "clickhouse://ch:9000/logs"):
        clickhouse = open_log_source(spec)
        assert isinstance(clickhouse, ClickHouseLogs)
        await clickhouse.close()
    assert open_log_source("") is None
    assert open_log_source("  ") is None
    with pytest.raises(ValueError, match="OPSMESH_LOGS_SOURCE"):
        open_log_source("s3://bucket/logs")
    with pytest.raises(ValueError, match="directory"):
        open_log_source("files://")


async def test_an_unreachable_clickhouse_is_a_tool_failure() -> None:
    logs = ClickHouseLogs("http://127.0.0.1:1/nothing")
    tools = by_name(troubleshooting_tools(logs, None))
    with pytest.raises(ToolFailure, match="log source is unavailable"):
        await call(tools["search_logs"], ACME, {})
    await logs.close()


# --- the tools ------------------------------------------------------------------------------

ACME = ToolContext(principal=ALICE)
GLOBEX = ToolContext(principal=BOB)
OPERATOR = ToolContext(principal=Principal("olga", "acme", frozenset({"platform:operator"})))


def by_name(tools: list[Tool[Any]]) -> dict[str, Tool[Any]]:
    return {t.name: t for t in tools}


async def call(tool: Tool[Any], context: ToolContext, arguments: dict[str, Any]) -> ToolOutput:
    return await tool.run(tool.parse(arguments), context)


async def test_tool_set_follows_the_configured_backends(log_dir: Path) -> None:
    logs = JsonFileLogs(log_dir)
    assert set(by_name(troubleshooting_tools(logs, None))) == {"search_logs", "log_patterns"}
    assert troubleshooting_tools(None, None) == []
    for declared in troubleshooting_tools(logs, None):
        assert not declared.changes_state
        properties = declared.schema()["function"]["parameters"]["properties"]
        assert "org_id" not in properties
        assert {"service", "level", "since", "request_id", "task_id", "text"} <= set(properties)


async def test_search_logs_tool_is_scoped_by_the_caller(source: LogSource) -> None:
    tools = by_name(troubleshooting_tools(source, None))
    mine = await call(tools["search_logs"], ACME, {"level": "warning"})
    assert mine.data is not None
    records = mine.data["records"]
    assert len(records) == 31
    assert {record["org_id"] for record in records} == {"acme"}
    assert "Slow reply" not in mine.text
    assert "lost its lease" not in mine.text
    assert "organization acme" in mine.text
    assert "ERROR chat_svc request=r-2: connection to 10.0.0.30 refused" in mine.text

    theirs = await call(tools["search_logs"], GLOBEX, {})
    assert theirs.data is not None
    assert [r["message"] for r in theirs.data["records"]] == ["task t-9 retrying", "Slow reply"]

    platform = await call(tools["search_logs"], OPERATOR, {"level": "critical"})
    assert platform.data is not None
    assert [r["message"] for r in platform.data["records"]] == ["worker lost its lease"]
    assert "platform-wide" in platform.text

    limited = await call(tools["search_logs"], OPERATOR, {"limit": 2})
    assert limited.data is not None
    assert len(limited.data["records"]) == 2
    older = await call(tools["search_logs"], ACME, {"since": "4h", "text": "ancient"})
    assert "ancient line" in older.text
    recent = await call(tools["search_logs"], ACME, {"text": "ancient"})
    assert "No matching lines." in recent.text


async def test_tool_arguments_cannot_widen_the_scope_or_the_limits(log_dir: Path) -> None:
    search_logs = by_name(troubleshooting_tools(JsonFileLogs(log_dir), None))["search_logs"]
    for arguments in (
        {"org_id": "globex"},
        {"limit": 201},
        {"limit": 0},
        {"since": "yesterday"},
        {"since": "-1h"},
        {"level": "loud"},
        {"service": "a b"},
        {"text": "x" * 201},
    ):
        with pytest.raises(ToolFailure, match="invalid arguments"):
            search_logs.parse(arguments)
    with pytest.raises(ToolFailure, match="31d"):
        await call(search_logs, ACME, {"since": "32d"})
    assert relative("1h30m") == timedelta(minutes=90)


async def test_log_patterns_tool(source: LogSource) -> None:
    log_patterns = by_name(troubleshooting_tools(source, None))["log_patterns"]
    output = await call(log_patterns, ACME, {"level": "error"})
    assert output.data is not None
    assert output.data["lines"] == 31
    top = output.data["patterns"][0]
    assert (top["template"], top["count"]) == ("connection to <IP> refused", 30)
    assert "30x ERROR (chat_svc) connection to <IP> refused" in output.text
    assert "lost its lease" not in output.text
    operator = await call(log_patterns, OPERATOR, {"level": "critical"})
    assert "worker lost its lease" in operator.text


async def test_tool_text_is_bounded(tmp_path: Path) -> None:
    lines = [
        Line(BASE + timedelta(seconds=n), "chat_svc", logging.ERROR, f"{n} " + "y" * 5000, ALICE)
        for n in range(200)
    ]
    write_json_logs(tmp_path / "big", lines)
    tools = by_name(troubleshooting_tools(JsonFileLogs(tmp_path / "big"), None))
    output = await call(tools["search_logs"], ACME, {"limit": 200, "since": "1d"})
    assert len(output.text) <= 6000
    assert output.text.endswith("(cut)")
    assert output.data is not None
    assert len(output.data["records"]) == 200
    patterns = await call(tools["log_patterns"], ACME, {"since": "1d"})
    assert len(patterns.text) <= 6000


# --- explain_task_failure against a real task service and worker ----------------------------


@pytest.fixture
def worker_log_dir(tmp_path: Path) -> Iterator[Path]:
    """The worker's own log lines, as the dev stack writes them: JSON, one file per service."""
    directory = tmp_path / "run-logs"
    directory.mkdir()
    handler = logging.FileHandler(directory / "task_worker.log")
    handler.setFormatter(JsonFormatter(service="task_worker"))
    worker_log = logging.getLogger("opsmesh.worker")
    previous = worker_log.level
    worker_log.addHandler(handler)
    worker_log.setLevel(logging.INFO)
    yield directory
    worker_log.removeHandler(handler)
    worker_log.setLevel(previous)
    handler.close()


async def test_explain_task_failure_correlates_record_attempts_and_logs(
    nats_server: NatsServer, worker_log_dir: Path
) -> None:
    alice = identity("alice", "acme")
    nid = str(uuid.uuid4())
    handler = ScriptedHandler(scripts={nid: Script(always_fail=True)})
    async with task_stack(nats_server.url) as stack:
        task = (
            await stack.stub.PublishEmailTask(
                pb.PublishEmailTaskRequest(payload=pb.EmailTaskPayload(notification_id=nid)),
                metadata=alice,
            )
        ).task
        async with running_worker(stack, handler):

            async def failed() -> pb.Task:
                found = (
                    await stack.stub.GetTask(pb.GetTaskRequest(task_id=task.id), metadata=alice)
                ).task
                assert found.status == pb.TASK_STATUS_FAILED
                return found

            await assert_eventually(failed, timeout=20)

        tools = by_name(troubleshooting_tools(JsonFileLogs(worker_log_dir), stack.stub))
        explain = tools["explain_task_failure"]
        context = ToolContext(principal=ALICE, metadata=alice)
        output = await call(explain, context, {"task_id": task.id})
        text = output.text
        assert f"Task {task.id}: email task, failed, 3 attempt(s) of at most 3." in text
        assert "gave up after 3 attempts" in text
        for number in (1, 2, 3):
            assert f"- attempt {number} on w1, started" in text
        assert "ConnectionError: smtp down (call 1)" in text
        assert "failed for good after 3 attempts" in text
        assert "retrying in" in text
        assert "Top log patterns:" in text
        assert len(text) <= 6000
        assert output.data is not None
        assert output.data["task"]["status"] == "failed"
        assert len(output.data["task"]["attempts"]) == 3
        assert {r["task_id"] for r in output.data["records"]} == {task.id}
        assert {r["org_id"] for r in output.data["records"]} == {"acme"}
        assert [r["level"] for r in output.data["records"]] == ["error", "warning", "warning"]
        assert output.data["patterns"]

        # Another organization's user cannot read it, nor its logs; an unknown id is no task.
        eve = ToolContext(
            principal=Principal("eve", "evilcorp"), metadata=identity("eve", "evilcorp")
        )
        with pytest.raises(ToolFailure, match="not found"):
            await call(explain, eve, {"task_id": task.id})
        with pytest.raises(ToolFailure, match="not found"):
            await call(explain, context, {"task_id": str(uuid.uuid4())})
        evil_search = await call(tools["search_logs"], eve, {"task_id": task.id})
        assert "No matching lines." in evil_search.text

        # Without a log source the record alone is explained.
        bare = by_name(troubleshooting_tools(None, stack.stub))
        assert set(bare) == {"explain_task_failure"}
        alone = await call(bare["explain_task_failure"], context, {"task_id": task.id})
        assert "No log source is configured" in alone.text
        assert "gave up after 3 attempts" in alone.text
