"""The servicer toolkit in mesh/: ids, idempotency keys, time types, backoff, downstream calls;
and the layering it keeps: services import only mesh/ and gen/, never each other."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc import aio

from mesh.backoff import half_jitter
from mesh.downstream import Deadline, downstream_errors
from mesh.errors import DependencyUnavailable, InvalidArgument, NotFound
from mesh.protos import duration_from_millis, timestamp_from_datetime, timestamp_from_millis
from mesh.servicer import MAX_IDEMPOTENCY_KEY, check_idempotency_key, parse_uuid
from tests.helpers import PRODUCT_PACKAGES


def rpc_error(code: grpc.StatusCode, details: str = "boom") -> aio.AioRpcError:
    return aio.AioRpcError(
        code, aio.Metadata(), aio.Metadata(), details=details, debug_error_string=""
    )


def test_parse_uuid_returns_the_canonical_form() -> None:
    assert (
        parse_uuid("6BA7B810-9DAD-11D1-80B4-00C04FD430C8", "session_id")
        == "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
    )


def test_parse_uuid_names_the_field_and_the_kind_and_echoes_only_a_prefix() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_uuid("x" * 500, "task_id", kind="task id")
    assert caught.value.field == "task_id"
    assert caught.value.message == f"task_id {'x' * 64!r} is not a task id"


@pytest.mark.parametrize("key", ["", "k", "k" * MAX_IDEMPOTENCY_KEY])
def test_check_idempotency_key_accepts_short_printable_keys(key: str) -> None:
    check_idempotency_key(key)


@pytest.mark.parametrize("key", ["k" * (MAX_IDEMPOTENCY_KEY + 1), "a\nb", "a\x00b"])
def test_check_idempotency_key_refuses_long_or_unprintable_keys(key: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_idempotency_key(key)
    assert caught.value.field == "idempotency_key"


def test_time_types_keep_their_value() -> None:
    moment = datetime(2026, 11, 29, 6, 30, 1, 250000, tzinfo=UTC)
    assert timestamp_from_datetime(moment).ToDatetime(UTC) == moment
    assert timestamp_from_millis(1_700_000_000_123).ToMilliseconds() == 1_700_000_000_123
    assert duration_from_millis(90_500).ToMilliseconds() == 90_500


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (10, 4.0)])
def test_half_jitter_stays_in_the_upper_half_of_the_capped_ceiling(
    attempt: int, ceiling: float
) -> None:
    delays = [half_jitter(attempt, base=0.5, cap=4.0) for _ in range(200)]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 1


def test_deadlines_are_short_and_positive() -> None:
    assert 0 < Deadline.LOOKUP <= 10
    assert 0 < Deadline.QUEUE <= 10


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_downstream_errors_turn_transient_failures_into_dependency_unavailable(
    code: grpc.StatusCode,
) -> None:
    with pytest.raises(DependencyUnavailable) as caught, downstream_errors("task service"):
        raise rpc_error(code, "connection refused")
    assert caught.value.message.startswith("task service is unavailable")
    assert "connection refused" in caught.value.message


def test_downstream_errors_pass_client_errors_through_by_default() -> None:
    with pytest.raises(aio.AioRpcError) as caught, downstream_errors("task service"):
        raise rpc_error(grpc.StatusCode.PERMISSION_DENIED)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_downstream_errors_map_not_found_when_asked() -> None:
    def missing() -> NotFound:
        return NotFound("session s not found")

    with (
        pytest.raises(NotFound, match="session s not found"),
        downstream_errors("session service", not_found=missing),
    ):
        raise rpc_error(grpc.StatusCode.NOT_FOUND)


def test_downstream_errors_can_treat_every_failure_as_unavailable() -> None:
    with (
        pytest.raises(DependencyUnavailable),
        downstream_errors("session service", only_transient=False),
    ):
        raise rpc_error(grpc.StatusCode.INTERNAL)


def test_downstream_errors_leave_successful_calls_alone() -> None:
    with downstream_errors("task service"):
        answer = 42
    assert answer == 42


# What each copied helper looked like; the toolkit in mesh/ is now their only home.
_COPIED_HELPERS = {
    "servicer Context alias": re.compile(r"^Context: TypeAlias =", re.MULTILINE),
    "UUID parsing": re.compile(r"uuid\.UUID\(value\)"),
    "idempotency-key check": re.compile(r"printable characters"),
    "Timestamp/Duration building": re.compile(r"\.From(Milliseconds|Datetime)\("),
    "backoff formula": re.compile(r"2\.0 \*\*"),
    "inline downstream deadline": re.compile(r"timeout=5,"),
}
# ratelimit_svc/ still has its own Context alias; its owner moves it to mesh.servicer.
_SERVICE_PACKAGES = tuple(p for p in PRODUCT_PACKAGES if p.endswith("_svc"))


@pytest.mark.parametrize("helper", sorted(_COPIED_HELPERS))
def test_no_service_copies_a_toolkit_helper(helper: str) -> None:
    root = Path(__file__).resolve().parent.parent
    pattern = _COPIED_HELPERS[helper]
    copies = [
        str(path.relative_to(root))
        for package in _SERVICE_PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert copies == [], f"{helper} copied in {copies}: use the one in mesh/"


_ROOT = Path(__file__).resolve().parent.parent
_PRODUCT_PACKAGES = tuple(p for p in PRODUCT_PACKAGES if p != "mesh")


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_services_import_only_mesh_and_gen_never_each_other() -> None:
    crossings = [
        f"{path.relative_to(_ROOT)} imports {other}"
        for package in (*_PRODUCT_PACKAGES, "mesh")
        for path in sorted((_ROOT / package).rglob("*.py"))
        for other in sorted(_imported_packages(path) & {*_PRODUCT_PACKAGES, "devtools"})
        if other != package
    ]
    assert crossings == []


def test_no_module_outside_identity_svc_knows_identitys_private_keys() -> None:
    """Identity's Redis layout (``opsmesh:id:*``) is its own; others read the revocation feed
    (mesh/revocations.py), whose schema is the declared interface."""
    private = "opsmesh:id:"
    readers = [
        str(path.relative_to(_ROOT))
        for package in (*_PRODUCT_PACKAGES, "mesh", "devtools")
        if package != "identity_svc"
        for path in sorted((_ROOT / package).rglob("*.py"))
        if private in path.read_text(encoding="utf-8")
    ]
    assert readers == []
    assert private in (_ROOT / "identity_svc" / "oauth.py").read_text(encoding="utf-8")
