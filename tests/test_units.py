"""Pure units of the shared runtime and the session service."""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from chat_svc.config import ChatSettings
from devtools.servers import ManagedProcess, ServerStartError, find_binary
from edgeinfo_svc.server import EdgeInfoSettings
from identity_svc.config import IdentitySettings
from mesh.auth import authenticator_from_mode
from mesh.context import Principal, current_principal, request_id_var
from mesh.errors import DependencyUnavailable, InvalidArgument, to_status
from mesh.logs import JsonFormatter, configure_logging
from mesh.pagination import decode_token, encode_token, page_size
from mesh.redisconn import RedisSettings, connect_redis
from mesh.settings import (
    ServerSettings,
    SettingsError,
    boolean,
    choice,
    declared_settings,
    fixed,
    integer,
    load,
    nested,
    port_number,
    required,
    seconds,
    setting,
    string,
    words,
)
from notify_svc.config import NotifySettings
from ratelimit_svc.server import RateLimitSettings
from session_svc.config import SessionSettings
from session_svc.context_patch import merge_patch
from task_svc.config import TaskSettings, Topology, WorkerSettings
from webui.server import WebSettings


def struct(value: dict[str, object]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


# RFC 7396 appendix A: target, patch, result.
RFC7396_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ({"a": "foo"}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7396_EXAMPLES)
def test_merge_patch_matches_rfc7396(target, patch, expected) -> None:
    merged = struct(target)
    merge_patch(merged, struct(patch))
    assert json_format.MessageToDict(merged) == expected


def _alphanumeric(raw: str) -> str:
    if not raw.isalnum():
        raise ValueError("expected letters and digits")
    return raw


@dataclass(frozen=True, kw_only=True)
class _Units:
    ms: float = seconds("T_MS", 0.0, minimum=0, maximum=10)
    hour: float = seconds("T_H", 0.0, minimum=0, maximum=1e6)
    day: float = seconds("T_D", 0.0, minimum=0, maximum=1e6)
    short: float = seconds("T_SHORT", 1.0, minimum=0, maximum=10)
    yes: bool = boolean("T_YES", False)
    off: bool = boolean("T_OFF", True)
    blank: str = string("T_BLANK", "default")
    token: str = setting("T_TOKEN", "", _alphanumeric, secret=True)


def test_settings_parse_units_and_booleans_and_blank_means_the_default() -> None:
    environ = {"T_MS": "250ms", "T_H": "1h", "T_D": "1d", "T_YES": "YES", "T_OFF": "off"}
    assert load(_Units, {**environ, "T_BLANK": " "}) == _Units(
        ms=0.25, hour=3600, day=86400, yes=True, off=False
    )


def test_bad_numbers_and_durations_are_reported_but_secrets_never_repeated() -> None:
    environ = {"T_MS": "inf", "T_H": "soon", "T_SHORT": "2.5m", "T_TOKEN": "hunter2!"}
    with pytest.raises(SettingsError) as caught:
        load(_Units, environ)
    assert [problem.split("=")[0].split(":")[0] for problem in caught.value.problems] == [
        "T_MS",
        "T_H",
        "T_SHORT",
        "T_TOKEN",
    ]
    assert "T_SHORT='2.5m': expected a duration from 0s to 10s" in str(caught.value)
    assert "T_TOKEN: expected letters and digits" in str(caught.value)
    assert "hunter2" not in str(caught.value)


REQUIRED_IDENTITY_ENV = {
    "OPSMESH_JWT_KEYS_DIR": "/var/lib/opsmesh/keys",
    "OPSMESH_JWT_ISSUER": "https://opsmesh.example",
}


def test_session_settings_defaults_and_cross_checks() -> None:
    settings = SessionSettings.from_env({})  # sessions only: no keys, no issuer needed
    assert settings.server.port == 50051
    assert settings.server.metrics_port == 9151
    # Production's defaults, not the dev stack's (make up sets its own ports and paths).
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.limits.default_ttl == 3600
    assert settings.auth.revocation_feed_url == ""  # the service's own Redis
    with pytest.raises(SettingsError, match="OPSMESH_SESSION_TTL=10s must lie within"):
        SessionSettings.from_env({"OPSMESH_SESSION_TTL": "10s", "OPSMESH_SESSION_MIN_TTL": "1m"})
    with pytest.raises(SettingsError, match="OPSMESH_REDIS_SENTINELS"):
        SessionSettings.from_env({"OPSMESH_REDIS_SENTINELS": "host-without-port"})
    with pytest.raises(SettingsError, match="OPSMESH_REVOCATION_FEED_URL"):
        SessionSettings.from_env({"OPSMESH_REVOCATION_FEED_URL": "http://issuer"})
    sentinel = SessionSettings.from_env(
        {"OPSMESH_REDIS_SENTINELS": "s1:26379, [::1]:26380", "OPSMESH_REDIS_PASSWORD": "pw"}
    )
    assert sentinel.redis.sentinels == (("s1", 26379), ("::1", 26380))
    assert sentinel.redis.password == "pw"
    assert connect_redis(sentinel.redis) is not None


def test_identity_settings_defaults_and_cross_checks() -> None:
    settings = IdentitySettings.from_env(REQUIRED_IDENTITY_ENV)
    assert (settings.server.port, settings.server.metrics_port) == (50058, 9158)
    assert settings.issuer.http_port == 8090
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.oauth.clients == {}
    with pytest.raises(SettingsError) as missing:
        IdentitySettings.from_env({})
    assert "OPSMESH_JWT_KEYS_DIR is required" in str(missing.value)
    assert "OPSMESH_JWT_ISSUER is required" in str(missing.value)
    assert (
        IdentitySettings.from_env(
            {"OPSMESH_JWT_KEYS_DIR": "/k", "OPSMESH_IDENTITY_HTTP_PORT": "0"}
        ).auth.issuer
        == ""
    )  # no OAuth endpoints: no issuer needed


def test_server_settings_take_their_port_from_the_use_site() -> None:
    environ = {"OPSMESH_HOST": "0.0.0.0", "OPSMESH_ACCESS_LOG": "true"}
    settings = load(ServerSettings, environ, port=1234)
    assert (settings.host, settings.port, settings.access_log) == ("0.0.0.0", 1234, True)
    assert load(ServerSettings, {**environ, "OPSMESH_GRPC_PORT": "99"}, port=1234).port == 99
    with pytest.raises(SettingsError, match="OPSMESH_GRPC_PORT is required"):
        load(ServerSettings, environ)  # no service gave it a default


@dataclass(frozen=True, kw_only=True)
class _Inner:
    port: int = port_number("T_INNER_PORT", 1)
    ratio: float = fixed(0.5, why="not configurable")


@dataclass(frozen=True, kw_only=True)
class _Declared:
    name: str = required("T_NAME", str, doc="what it is called")
    mode: str = choice("T_MODE", "a", ("a", "b"))
    count: int = integer("T_COUNT", 3, minimum=0, maximum=9)
    wait: float = seconds("T_WAIT", 1.0, minimum=0, maximum=600)
    loud: bool = boolean("T_LOUD", False)
    tags: tuple[str, ...] = words("T_TAGS")
    inner: _Inner = nested(_Inner, port=2)

    def check(self, problems: list[str]) -> None:
        if self.loud and self.mode == "b":
            problems.append("T_LOUD does not go with T_MODE=b")


def test_declared_settings_are_read_with_defaults_units_and_use_site_defaults() -> None:
    settings = load(
        _Declared, {"T_NAME": " n ", "T_WAIT": "250ms", "T_TAGS": "x, y z", "T_LOUD": ""}
    )
    assert settings == _Declared(name="n", wait=0.25, tags=("x", "y", "z"), inner=_Inner(port=2))
    assert load(_Declared, {"T_NAME": "n", "T_INNER_PORT": "7", "T_WAIT": "5m"}).inner.port == 7
    assert load(_Declared, {"T_NAME": "n", "T_WAIT": "5m"}).wait == 300
    assert _Declared(name="n").inner.port == 2  # constructed directly: the use site's default


def test_declared_settings_report_every_problem_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load(
            _Declared,
            {
                "T_MODE": "c",
                "T_COUNT": "10",
                "T_WAIT": "soon",
                "T_LOUD": "maybe",
                "T_INNER_PORT": "x",
            },
        )
    assert [problem.split("=")[0].split(" ")[0] for problem in caught.value.problems] == [
        "T_NAME",
        "T_MODE",
        "T_COUNT",
        "T_WAIT",
        "T_LOUD",
        "T_INNER_PORT",
    ]
    assert "T_NAME is required: what it is called" in str(caught.value)
    with pytest.raises(SettingsError, match="T_LOUD does not go with T_MODE=b"):
        load(_Declared, {"T_NAME": "n", "T_MODE": "b", "T_LOUD": "yes"})


def test_a_settings_field_without_a_declaration_is_refused() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Undeclared:
        port: int = 1

    with pytest.raises(TypeError, match=r"Undeclared\.port declares no setting"):
        load(Undeclared, {})
    with pytest.raises(TypeError, match=r"Undeclared\.port declares no setting"):
        declared_settings(Undeclared)


SERVICE_SETTINGS = [
    ChatSettings,
    NotifySettings,
    TaskSettings,
    WorkerSettings,
    RateLimitSettings,
    EdgeInfoSettings,
    WebSettings,
    SessionSettings,
    IdentitySettings,
]


@pytest.mark.parametrize("settings", SERVICE_SETTINGS, ids=lambda cls: cls.__name__)
def test_every_setting_of_a_service_is_declared_once(settings: type[object]) -> None:
    variables = [declared.spec.variable for declared in declared_settings(settings)]
    assert variables
    assert sorted(name for name in set(variables) if variables.count(name) > 1) == []


def test_error_status_carries_error_info_field_violation_and_retry_info() -> None:
    status = to_status(InvalidArgument("bad id", field="session_id"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "bad id"
    ((key, blob),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    decoded = status_pb2.Status.FromString(blob)
    info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    decoded.details[0].Unpack(info)
    decoded.details[1].Unpack(bad_request)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "opsmesh.dev")
    assert bad_request.field_violations[0].field == "session_id"

    unavailable = to_status(DependencyUnavailable("redis", ConnectionError("refused")))
    assert unavailable.code == grpc.StatusCode.UNAVAILABLE
    assert "redis is unavailable" in unavailable.details
    assert "ConnectionError: refused" in unavailable.details
    retry = error_details_pb2.RetryInfo()
    status_pb2.Status.FromString(unavailable.trailing_metadata[0][1]).details[1].Unpack(retry)
    assert retry.retry_delay.seconds == 1


def test_page_tokens_round_trip_and_reject_tampering() -> None:
    token = encode_token("sessions", "cursor-1")
    assert decode_token(token, "sessions") == "cursor-1"
    assert decode_token("", "sessions") is None
    for bad in ("%%%", "bm90IGpzb24", encode_token("tasks", "cursor-1")):
        with pytest.raises(InvalidArgument):
            decode_token(bad, "sessions")
    assert page_size(0, default=50, maximum=200) == 50
    assert page_size(500, default=50, maximum=200) == 200
    with pytest.raises(InvalidArgument):
        page_size(-1, default=50, maximum=200)


def test_json_logs_carry_request_id_extras_and_exceptions() -> None:
    formatter = JsonFormatter(service="unit")
    token = request_id_var.set("req-9")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.getLogger("x").makeRecord(
                "x",
                logging.ERROR,
                __file__,
                1,
                "failed %s",
                ("here",),
                sys.exc_info(),
                extra={"grpc_method": "/a/B"},
            )
        entry = json.loads(formatter.format(record))
    finally:
        request_id_var.reset(token)
    assert entry["message"] == "failed here"
    assert entry["request_id"] == "req-9"
    assert entry["grpc_method"] == "/a/B"
    assert entry["service"] == "unit"
    assert "ValueError: boom" in entry["exception"]


def test_text_logs_prefix_the_request_id(capsys) -> None:
    configure_logging(service="unit", level="INFO", fmt="text")
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("unit").info("hello %s", "world")
    finally:
        request_id_var.reset(token)
        configure_logging(service="unit", level="WARNING", fmt="json")
    assert "[req-7] hello world" in capsys.readouterr().err


def test_principal_context_and_auth_modes() -> None:
    with pytest.raises(RuntimeError):
        current_principal()
    assert Principal("u", "o", frozenset({"admin"})).has_role("admin")
    with pytest.raises(ValueError, match="unknown auth mode"):
        authenticator_from_mode("none")


def test_missing_binary_names_the_package(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("devtools.servers.Path.exists", lambda self: False)
    with pytest.raises(ServerStartError, match="apt-get install redis-server"):
        find_binary("redis-server")


def test_process_that_exits_or_never_gets_ready_fails_with_its_log(tmp_path: Path) -> None:
    exits = ManagedProcess(
        "exits",
        [sys.executable, "-c", "print('no config here'); raise SystemExit(3)"],
        log_path=tmp_path / "exits.log",
        ready=re.compile("never"),
    )
    with pytest.raises(ServerStartError, match=r"exited with code 3(?s:.*)no config here"):
        exits.start()
    hangs = ManagedProcess(
        "hangs",
        [sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(60)"],
        log_path=tmp_path / "hangs.log",
        ready=re.compile("never"),
    )
    with pytest.raises(ServerStartError, match=r"not ready after 0\.5s"):
        hangs.start(timeout=0.5)
    assert not hangs.running()
    assert hangs.stop() == hangs.process.returncode


def test_redis_settings_reject_non_redis_urls() -> None:
    with pytest.raises(SettingsError, match="expected a redis://"):
        load(RedisSettings, {"OPSMESH_REDIS_URL": "http://x"})


def test_free_ports_stay_out_of_the_ephemeral_range_and_are_not_handed_out_twice() -> None:
    from devtools.servers import _ephemeral_range, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    # Outgoing connections and port-0 servers take ephemeral ports: a stack's own traffic
    # must never grab a port picked for one of its servers before that server binds it.
    assert max(ports) < _ephemeral_range()[0]


def test_the_task_stream_replica_count_is_a_validated_setting() -> None:
    assert load(Topology, {"OPSMESH_TASK_REPLICAS": "3"}).replicas == 3
    assert load(Topology, {}).replicas == 1
    with pytest.raises(SettingsError, match="OPSMESH_TASK_REPLICAS"):
        load(Topology, {"OPSMESH_TASK_REPLICAS": "7"})
