"""Servers answer only with the error reasons the contract declares (proto/opsmesh/errors/v1).

Statically: every ``reason=`` given to an error and every ``default_reason`` in the services'
code is a generated ``ErrorReason`` constant the contract declares, never a free string.
At run time: ``to_status`` refuses an undeclared reason (raises in the tests, falls back to the
generic reason of the status code, with an error logged, in production).
"""

from __future__ import annotations

import ast
import importlib
import logging
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from mesh import errors
from mesh.errors import (
    FailedPrecondition,
    NotFound,
    OpsmeshError,
    UndeclaredReason,
    checked_reason,
    declared_reasons,
    reason_name,
    to_status,
)
from opsmesh.errors.v1 import errors_pb2
from tests.helpers import PRODUCT_PACKAGES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = PRODUCT_PACKAGES
PROTO = ROOT / "proto" / "opsmesh" / "errors" / "v1" / "errors.proto"


def _error_classes() -> Iterator[type[OpsmeshError]]:
    pending: list[type[OpsmeshError]] = [OpsmeshError]
    while pending:
        cls = pending.pop()
        yield cls
        pending.extend(cls.__subclasses__())


_REASON_LIKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+|[A-Z]{4,}")


def _constant(node: ast.expr) -> str | None:
    """``ERROR_REASON_X`` for ``errors_pb2.ERROR_REASON_X`` / ``ERROR_REASON_X``, else None."""
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return name if isinstance(name, str) and name.startswith(errors.REASON_PREFIX) else None


def reason_problems(source: str, error_names: frozenset[str], where: str = "") -> list[str]:
    """What in ``source`` could make a server answer with a reason errors.proto lacks."""
    known = set(errors_pb2.ErrorReason.keys())
    problems: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        values: list[ast.expr] = []
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else None
            called = node.func.id if isinstance(node.func, ast.Name) else called
            if called in error_names:
                values = [kw.value for kw in node.keywords if kw.arg == "reason"]
                # A reason passed by position (a helper's second argument), as a free string.
                values += [
                    arg
                    for arg in node.args[1:]
                    if isinstance(arg, ast.Constant) and _REASON_LIKE.fullmatch(str(arg.value))
                ]
        elif isinstance(node, ast.arguments):  # def f(..., reason=<default>)
            positional = [*node.posonlyargs, *node.args]
            with_defaults = positional[len(positional) - len(node.defaults) :]
            pairs = [*zip(with_defaults, node.defaults, strict=True)]
            pairs += [
                (a, d)
                for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)
                if d is not None
            ]
            values = [default for arg, default in pairs if arg.arg == "reason"]
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", None) == "default_reason" for t in targets) and node.value:
                values = [node.value]
        for value in values:  # a generated constant, a variable holding one, or None (default)
            constant = _constant(value)
            passed_on = isinstance(value, ast.Name) or (
                isinstance(value, ast.Constant) and value.value is None
            )
            if constant is None and not passed_on:
                problems.add(f"{where}:{value.lineno}: {ast.unparse(value)} is no ErrorReason")
            elif constant == "ERROR_REASON_UNSPECIFIED":
                problems.add(f"{where}:{value.lineno}: ERROR_REASON_UNSPECIFIED is never sent")
        constant = _constant(node) if isinstance(node, ast.Attribute | ast.Name) else None
        if constant is not None and constant not in known:
            problems.add(f"{where}:{node.lineno}: {constant} is not declared in errors.proto")
    return sorted(problems)


def _sources() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_the_scan_catches_free_strings_and_undeclared_constants() -> None:
    names = frozenset({"NotFound", "Unauthenticated", "OpsmeshError"})
    bad = (
        'raise NotFound("gone", reason="GONE")\n'
        "raise errors.Unauthenticated('x', reason=errors_pb2.ERROR_REASON_SO_SORRY)\n"
        "class Mine(OpsmeshError):\n    default_reason = 'MINE'\n"
        "OpsmeshError('x', reason=errors_pb2.ERROR_REASON_UNSPECIFIED)\n"
        "def refuse(m, reason='INVALID_TOKEN'):\n    return Unauthenticated(m, reason=reason)\n"
        "raise refuse('token expired', 'TOKEN_EXPIRED')\n"
    )
    assert len(reason_problems(bad, names | {"refuse"})) == 6
    good = (
        "raise NotFound('gone', reason=errors_pb2.ERROR_REASON_TEMPLATE_NOT_FOUND)\n"
        "def refuse(m, reason=errors_pb2.ERROR_REASON_INVALID_TOKEN):\n"
        "    return Unauthenticated(m, reason=reason)\n"
        "record.update(decision=1, reason='a user typed this')\n"  # not an error
        "raise DependencyUnavailable('redis', 'connection refused')\n"
    )
    assert reason_problems(good, names | {"DependencyUnavailable"}) == []


def test_every_reason_in_the_code_is_declared_by_the_contract() -> None:
    names = frozenset(cls.__name__ for cls in _error_classes()) | {"_refuse"}
    problems = []
    for path in _sources():
        where = str(path.relative_to(ROOT))
        problems += reason_problems(path.read_text(encoding="utf-8"), names, where)
    assert problems == []


def test_every_error_class_defaults_to_a_declared_reason() -> None:
    for package in PACKAGES:  # every OpsmeshError subclass the services define
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
    classes = list(_error_classes())
    assert len(classes) >= 12
    for cls in classes:
        assert reason_name(cls.default_reason) in declared_reasons(), cls


def test_reason_strings_are_the_value_names_without_the_prefix() -> None:
    assert reason_name(errors_pb2.ERROR_REASON_VERSION_MISMATCH) == "VERSION_MISMATCH"
    assert "VERSION_MISMATCH" in declared_reasons()
    assert "UNSPECIFIED" not in declared_reasons()
    for bad in (errors_pb2.ERROR_REASON_UNSPECIFIED, 9999, "VERSION_MISMATCH", True):
        with pytest.raises(UndeclaredReason):
            reason_name(bad)  # type: ignore[arg-type]
    # The README and errors.proto name the same domain the servers send.
    assert f'"{errors.ERROR_DOMAIN}"' in PROTO.read_text(encoding="utf-8")


def _info(status: grpc.Status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(status.trailing_metadata[0][1]).details[0].Unpack(info)
    return info


def test_to_status_refuses_an_undeclared_reason_in_the_tests() -> None:
    assert errors.STRICT_REASONS  # tests/conftest.py
    with pytest.raises(UndeclaredReason):
        to_status(NotFound("gone", reason="GONE"))  # type: ignore[arg-type]
    with pytest.raises(UndeclaredReason):
        to_status(NotFound("gone", reason=errors_pb2.ERROR_REASON_UNSPECIFIED))
    declared = NotFound("no template", reason=errors_pb2.ERROR_REASON_TEMPLATE_NOT_FOUND)
    assert _info(to_status(declared)).reason == "TEMPLATE_NOT_FOUND"


def test_to_status_falls_back_to_the_generic_reason_in_production(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(errors, "STRICT_REASONS", False)
    error = FailedPrecondition("nope", reason=777)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="mesh.errors"):
        info = _info(to_status(error))
        assert checked_reason(error) == "FAILED_PRECONDITION"  # replaced: logged once
    assert (info.reason, info.domain) == ("FAILED_PRECONDITION", "opsmesh.dev")
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "undeclared error reason 777" in caplog.records[0].getMessage()

    class Odd(OpsmeshError):
        code = grpc.StatusCode.DATA_LOSS  # no generic reason: INTERNAL

    assert _info(to_status(Odd("x", reason="ODD"))).reason == "INTERNAL"  # type: ignore[arg-type]


def test_the_web_clients_enum_names_are_the_reason_strings() -> None:
    """protoc-gen-es drops the ERROR_REASON_ prefix: reasonOf() in ui/ sends the same strings."""
    generated = (ROOT / "gen/ts/opsmesh/errors/v1/errors_pb.ts").read_text(encoding="utf-8")
    members = set(re.findall(r"^  ([A-Z][A-Z0-9_]*) = \d+,$", generated, re.M))
    assert members == declared_reasons() | {"UNSPECIFIED"}
