"""The template catalog: ids, descriptions and typed variables, from templates/catalog.toml.

Also checks template data against the declared variables, so a missing, unknown
or mistyped variable is an INVALID_ARGUMENT before anything renders or queues.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email

from mesh.context import Principal
from mesh.errors import InvalidArgument, NotFound
from notify_svc.authz import SENDER_ROLES, require_role
from opsmesh.errors.v1 import errors_pb2
from opsmesh.notify.v1 import notify_pb2

TEMPLATE_DIR = Path(__file__).parent / "templates"
DEFAULT_LOCALE = "en"
_MAX_STRING = 10_000
_MAX_LIST = 100

TYPES = {
    "string": notify_pb2.VARIABLE_TYPE_STRING,
    "number": notify_pb2.VARIABLE_TYPE_NUMBER,
    "boolean": notify_pb2.VARIABLE_TYPE_BOOLEAN,
    "url": notify_pb2.VARIABLE_TYPE_URL,
    "timestamp": notify_pb2.VARIABLE_TYPE_TIMESTAMP,
    "email": notify_pb2.VARIABLE_TYPE_EMAIL,
    "list": notify_pb2.VARIABLE_TYPE_LIST,
}


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    type: str
    required: bool
    description: str


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    id: str
    description: str
    variables: tuple[Variable, ...]
    locales: tuple[str, ...]
    sender_roles: frozenset[str]
    """The roles that may send it (catalog.toml's ``senders``, as roles)."""

    def check_sender(self, principal: Principal) -> None:
        """PERMISSION_DENIED unless ``principal`` may send this template."""
        require_role(principal, self.sender_roles, f"sending {self.id}")

    def to_proto(self) -> notify_pb2.Template:
        return notify_pb2.Template(
            id=self.id,
            description=self.description,
            locales=list(self.locales),
            variables=[
                notify_pb2.TemplateVariable(
                    name=v.name,
                    type=TYPES[v.type],
                    required=v.required,
                    description=v.description,
                )
                for v in self.variables
            ],
        )

    def check(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The data, checked and completed (absent optional variables are None)."""
        declared = {v.name: v for v in self.variables}
        unknown = sorted(set(data) - set(declared))
        if unknown:
            raise InvalidArgument(
                f"template {self.id} has no variable {unknown[0]!r}; it takes "
                + ", ".join(declared),
                field=f"data.{unknown[0]}",
            )
        checked: dict[str, Any] = {}
        for variable in self.variables:
            value = data.get(variable.name)
            if value is None:
                if variable.required:
                    raise InvalidArgument(
                        f"template {self.id} needs {variable.name} ({variable.type})",
                        field=f"data.{variable.name}",
                    )
                checked[variable.name] = None
                continue
            checked[variable.name] = _check_value(variable, value)
        return checked


def _invalid(variable: Variable, why: str) -> InvalidArgument:
    return InvalidArgument(f"data.{variable.name} must be {why}", field=f"data.{variable.name}")


def _check_value(variable: Variable, value: Any) -> Any:
    kind = variable.type
    if kind == "number":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _invalid(variable, "a number")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _invalid(variable, "true or false")
        return value
    if kind == "list":
        if not isinstance(value, list | tuple) or len(value) > _MAX_LIST:
            raise _invalid(variable, f"a list of at most {_MAX_LIST} values")
        return [str(item)[:_MAX_STRING] for item in value]
    if not isinstance(value, str) or len(value) > _MAX_STRING:
        raise _invalid(variable, f"a string of at most {_MAX_STRING} characters")
    if kind == "url":
        parts = urlsplit(value)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or any(c in value for c in "\r\n\t ")
        ):
            raise _invalid(variable, "an absolute http(s) URL")
    elif kind == "timestamp":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _invalid(variable, "an RFC 3339 timestamp") from None
    elif kind == "email":
        try:
            validate_email(value, check_deliverability=False)
        except EmailNotValidError as error:
            raise _invalid(variable, f"an email address ({error})") from None
    return value


class Catalog:
    def __init__(self, directory: Path = TEMPLATE_DIR) -> None:
        raw = tomllib.loads((directory / "catalog.toml").read_text())
        specs = []
        for template_id, entry in sorted(raw.items()):
            locales = tuple(
                sorted(p.name for p in (directory / template_id).iterdir() if p.is_dir())
            )
            if DEFAULT_LOCALE not in locales:
                raise ValueError(f"template {template_id} has no {DEFAULT_LOCALE} variant")
            variables = tuple(
                Variable(
                    name=v["name"],
                    type=v["type"],
                    required=bool(v.get("required", False)),
                    description=v.get("description", ""),
                )
                for v in entry["variables"]
            )
            for variable in variables:
                if variable.type not in TYPES:
                    raise ValueError(f"{template_id}.{variable.name}: unknown type {variable.type}")
            specs.append(
                TemplateSpec(
                    template_id,
                    entry["description"],
                    variables,
                    locales,
                    _sender_roles(template_id, entry.get("senders", [])),
                )
            )
        self.templates: dict[str, TemplateSpec] = {spec.id: spec for spec in specs}

    def get(self, template_id: str) -> TemplateSpec:
        spec = self.templates.get(template_id)
        if spec is None:
            raise NotFound(
                f"no template {template_id[:64]!r}; ListTemplates lists them",
                reason=errors_pb2.ERROR_REASON_TEMPLATE_NOT_FOUND,
            )
        return spec


def _sender_roles(template_id: str, senders: list[str]) -> frozenset[str]:
    """The roles of a template's declared senders; none declared is a catalog error (closed)."""
    unknown = sorted(set(senders) - set(SENDER_ROLES))
    if unknown:
        raise ValueError(
            f"template {template_id}: unknown sender {unknown[0]!r}; one of "
            + ", ".join(SENDER_ROLES)
        )
    if not senders:
        raise ValueError(f"template {template_id} names no senders")
    return frozenset(SENDER_ROLES[sender] for sender in senders)


def resolve_locale(spec: TemplateSpec, requested: str) -> str:
    """The best variant for a BCP 47 locale: exact, then its language, then English."""
    wanted = requested.strip().replace("_", "-").lower()
    if not wanted:
        return DEFAULT_LOCALE
    if len(wanted) > 35 or not all(part.isalnum() for part in wanted.split("-")):
        raise InvalidArgument(f"locale {requested[:40]!r} is not a BCP 47 tag", field="locale")
    available = {locale.lower(): locale for locale in spec.locales}
    for candidate in (wanted, wanted.split("-")[0]):
        if candidate in available:
            return available[candidate]
    return DEFAULT_LOCALE
