"""Pure units of the shared runtime and the session service."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2

from devtools.servers import ManagedProcess, ServerStartError, find_binary
from identity_svc.config import IdentitySettings
from mesh.auth import authenticator_from_mode
from mesh.context import Principal, current_principal, request_id_var
from mesh.errors import DependencyUnavailable, InvalidArgument, to_status
from mesh.logs import JsonFormatter, configure_logging
from mesh.pagination import decode_token, encode_token, page_size
from mesh.redisconn import RedisSettings, connect_redis
from mesh.settings import EnvReader, ServerSettings, SettingsError
from session_svc.config import SessionSettings
from session_svc.context_patch import merge_patch


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


def test_env_reader_collects_every_problem() -> None:
    env = EnvReader(
        {"A": "x", "B": "99999", "C": "soon", "D": "maybe", "E": "purple", "F": "inf", "G": "2.5m"}
    )
    assert env.integer("A", 1, minimum=0, maximum=10) == 1
    assert env.integer("B", 1, minimum=0, maximum=10) == 1
    assert env.seconds("C", 3.0, minimum=0, maximum=10) == 3.0
    assert env.boolean("D", False) is False
    assert env.string("E", "red", choices=("red", "blue")) == "red"
    assert env.seconds("F", 1.0, minimum=0, maximum=10) == 1.0
    assert env.seconds("G", 1.0, minimum=0, maximum=1000) == 150.0
    assert env.seconds("G", 1.0, minimum=0, maximum=10) == 1.0
    with pytest.raises(SettingsError) as caught:
        env.check()
    names = [p.split("=")[0] for p in caught.value.problems]
    assert names == ["A", "B", "C", "D", "E", "F", "G"]
    assert "expected a duration from 0s to 10s" in str(caught.value)


def test_env_reader_parses_units_and_booleans() -> None:
    env = EnvReader({"MS": "250ms", "H": "1h", "D": "1d", "T": "YES", "F": "off", "EMPTY": " "})
    assert env.seconds("MS", 0, minimum=0, maximum=10) == 0.25
    assert env.seconds("H", 0, minimum=0, maximum=1e6) == 3600
    assert env.seconds("D", 0, minimum=0, maximum=1e6) == 86400
    assert env.boolean("T", False) is True
    assert env.boolean("F", True) is False
    assert env.string("EMPTY", "default") == "default"
    env.check()


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


def test_server_settings_from_env() -> None:
    env = EnvReader({"OPSMESH_HOST": "0.0.0.0", "OPSMESH_ACCESS_LOG": "true"})
    settings = ServerSettings.from_env(env, default_port=1234)
    assert (settings.host, settings.port, settings.access_log) == ("0.0.0.0", 1234, True)


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
    env = EnvReader({"OPSMESH_REDIS_URL": "http://x"})
    RedisSettings.from_env(env, default_url="redis://127.0.0.1:1/0")
    with pytest.raises(SettingsError, match="expected a redis://"):
        env.check()


def test_free_ports_stay_out_of_the_ephemeral_range_and_are_not_handed_out_twice() -> None:
    from devtools.servers import _ephemeral_range, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    # Outgoing connections and port-0 servers take ephemeral ports: a stack's own traffic
    # must never grab a port picked for one of its servers before that server binds it.
    assert max(ports) < _ephemeral_range()[0]


def test_the_task_stream_replica_count_is_a_validated_setting() -> None:
    from mesh.settings import EnvReader, SettingsError
    from task_svc.config import _topology

    env = EnvReader({"OPSMESH_TASK_REPLICAS": "3"})
    assert _topology(env).replicas == 3
    assert _topology(EnvReader({})).replicas == 1
    refused = EnvReader({"OPSMESH_TASK_REPLICAS": "7"})
    _topology(refused)
    with pytest.raises(SettingsError):
        refused.check()
