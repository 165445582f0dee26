"""Typed settings read from the environment, validated once at start.

Each setting is declared once, as a dataclass field::

    @dataclass(frozen=True, kw_only=True)
    class SmtpSettings:
        port: int = integer("OPSMESH_SMTP_PORT", 2525, minimum=1, maximum=65535)

The field carries its variable, default and parser; :func:`load` reads every
field of a settings class (and of the settings classes it nests) from an
environment mapping. Every problem is collected and reported together, naming
the variable, the value it had and what was expected, so a bad deployment fails
with one clear :class:`SettingsError` instead of a traceback from deep inside a
service.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Protocol, TypeVar, cast

T = TypeVar("T")


class SettingsError(Exception):
    """The environment holds values a service cannot start with."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _parse_seconds(raw: str) -> float | None:
    text = raw.lower()
    factor = 1.0
    for unit in ("ms", "s", "m", "h", "d"):
        if text.endswith(unit):
            factor = _UNITS[unit]
            text = text[: -len(unit)]
            break
    try:
        value = float(text) * factor
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return value


def _parse_integer(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw, 10)
        except ValueError:
            raise ValueError("expected an integer") from None
        if not minimum <= value <= maximum:
            raise ValueError(f"expected an integer from {minimum} to {maximum}")
        return value

    return parse


def duration(raw: str, *, minimum: float, maximum: float) -> float:
    """Seconds from "30", "2.5s", "250ms", "5m", "1h" or "1d"; ValueError says what was wrong."""
    return _parse_duration(minimum, maximum)(raw.strip())


def _parse_duration(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = _parse_seconds(raw)
        if value is None:
            raise ValueError("expected a duration such as 30, 2.5s, 250ms, 5m or 1h")
        if not minimum <= value <= maximum:
            raise ValueError(f"expected a duration from {minimum:g}s to {maximum:g}s")
        return value

    return parse


def _parse_boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return raw

    return parse


def _parse_url(schemes: tuple[str, ...], expected: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not raw.startswith(schemes):
            raise ValueError(f"expected {expected}")
        return raw

    return parse


def _unchanged(raw: str) -> str:
    return raw


def _words(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.replace(",", " ").split() if part.strip())


# ---------------------------------------------------------------------------------------------
# Declarations: one dataclass field per setting.

_SPEC = "opsmesh.setting"
_NESTED = "opsmesh.nested"
_FIXED = "opsmesh.fixed"


@dataclass(frozen=True)
class Spec:
    """What a settings field reads: its variable, how the text is parsed, what it is for."""

    variable: str
    parse: Callable[[str], Any]
    """Turns the variable's (stripped, non-empty) text into the value; ValueError says what
    was expected."""
    doc: str = ""
    secret: bool = False
    """A secret's value is never repeated in a problem report (it would reach the logs)."""


@dataclass(frozen=True)
class Nested:
    """A field holding another settings class, with the defaults this use site gives it."""

    settings: type[Any]
    defaults: Mapping[str, Any]


def setting(
    variable: str,
    default: T,
    parse: Callable[[str], T],
    *,
    doc: str = "",
    default_factory: Callable[[], T] | None = None,
    secret: bool = False,
) -> T:
    """A setting of any type: ``parse`` turns the variable's text into the value or raises
    ValueError("expected ..."). ``default_factory`` computes a default (``default`` is then
    ignored); a ``secret``'s value is left out of problem reports."""
    metadata = {_SPEC: Spec(variable=variable, parse=parse, doc=doc, secret=secret)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def required(variable: str, parse: Callable[[str], T], *, doc: str) -> T:
    """A setting without a default: unset, it is reported as "<variable> is required: <doc>"
    (unless the use site gives a default with :func:`nested`)."""
    field: T = dataclasses.field(metadata={_SPEC: Spec(variable=variable, parse=parse, doc=doc)})
    return field


def string(
    variable: str,
    default: str = "",
    *,
    doc: str = "",
    default_factory: Callable[[], str] | None = None,
) -> str:
    return setting(variable, default, _unchanged, doc=doc, default_factory=default_factory)


def choice(variable: str, default: str, choices: Iterable[str], *, doc: str = "") -> str:
    allowed = tuple(choices)
    assert default in allowed, f"{variable}: default {default!r} is no choice"
    return setting(variable, default, _parse_choice(allowed), doc=doc)


def url(
    variable: str, default: str, *, schemes: Iterable[str], expected: str, doc: str = ""
) -> str:
    """A URL whose scheme is one of ``schemes``; empty (when that is the default) means none."""
    return setting(variable, default, _parse_url(tuple(schemes), expected), doc=doc)


def words(variable: str, *, doc: str = "") -> tuple[str, ...]:
    """A list separated by commas or spaces; unset: empty."""
    return setting(variable, (), _words, doc=doc)


def integer(variable: str, default: int, *, minimum: int, maximum: int, doc: str = "") -> int:
    return setting(variable, default, _parse_integer(minimum, maximum), doc=doc)


def port_number(variable: str, default: int = 0, *, doc: str = "") -> int:
    return integer(variable, default, minimum=0, maximum=65535, doc=doc)


def seconds(
    variable: str, default: float, *, minimum: float, maximum: float, doc: str = ""
) -> float:
    """A duration in seconds, as a plain number ("2.5") or with a unit ("250ms", "5m")."""
    return setting(variable, default, _parse_duration(minimum, maximum), doc=doc)


def boolean(variable: str, default: bool, *, doc: str = "") -> bool:
    return setting(variable, default, _parse_boolean, doc=doc)


def fixed(default: T, *, why: str) -> T:
    """A field of a settings class that no variable sets (``why`` says why: tests tune it)."""
    field: T = dataclasses.field(default=default, metadata={_FIXED: why})
    return field


def nested(settings: type[T], **defaults: Any) -> T:
    """A field holding the settings class ``settings``, read by :func:`load` with the rest.

    ``defaults`` are this use site's defaults by field name (each service's own gRPC port):
    stated once, where the settings are used.
    """
    field: T = dataclasses.field(
        default_factory=functools.partial(settings, **defaults),
        metadata={_NESTED: Nested(settings=settings, defaults=defaults)},
    )
    return field


class Checked(Protocol):
    def check(self, problems: list[str]) -> None:
        """Appends what is wrong with the combination of the values read (cross-field rules,
        a file that must exist)."""


def load(settings: type[T], environ: Mapping[str, str], /, **defaults: Any) -> T:
    """Reads every field of ``settings`` (and of the settings it nests) from ``environ``.

    An unset or blank variable keeps the default. Raises one :class:`SettingsError` listing
    every bad or missing variable and every problem the classes' ``check`` methods report.
    """
    problems: list[str] = []
    loaded, _ = _load(settings, environ, defaults, problems)
    if problems:
        raise SettingsError(problems)
    return loaded


def _load(
    settings: type[T], environ: Mapping[str, str], defaults: Mapping[str, Any], problems: list[str]
) -> tuple[T, bool]:
    """The settings and whether every required value was there. A missing one is None, so
    that the cross-field checks still run and report what else is wrong."""
    values: dict[str, Any] = {}
    complete = True
    for field in dataclasses.fields(cast(Any, settings)):
        nested_spec = field.metadata.get(_NESTED)
        if isinstance(nested_spec, Nested):
            inner = {**nested_spec.defaults, **defaults.get(field.name, {})}
            values[field.name], whole = _load(nested_spec.settings, environ, inner, problems)
            complete = complete and whole
            continue
        if _FIXED in field.metadata:
            continue
        spec = field.metadata.get(_SPEC)
        if not isinstance(spec, Spec):
            raise TypeError(f"{settings.__name__}.{field.name} declares no setting")
        raw = (environ.get(spec.variable) or "").strip()
        if raw:
            try:
                values[field.name] = spec.parse(raw)
                continue
            except ValueError as error:
                shown = spec.variable if spec.secret else f"{spec.variable}={raw!r}"
                problems.append(f"{shown}: {error}")
        if field.name in defaults:
            values[field.name] = defaults[field.name]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if not raw:
                problems.append(f"{spec.variable} is required: {spec.doc}")
            values[field.name] = None
            complete = False
    loaded = settings(**values)
    if hasattr(loaded, "check"):
        try:
            cast(Checked, loaded).check(problems)
        except (TypeError, AttributeError):
            if complete:
                raise
            # A check that needs the missing value: "required" already says what is wrong.
    return loaded, complete


@dataclass(frozen=True)
class Declared:
    """A setting as ``--help`` shows it: its declaration and the default where it is used."""

    spec: Spec
    default: str
    """The default's repr; empty when it is computed or the setting is required."""
    required: bool = False


def _shown(default: object) -> str:
    """How ``--help`` spells a default: as it would be written, nothing for "none"."""
    if default in ("", None, ()):
        return ""
    if isinstance(default, PurePath):
        return repr(str(default))
    return repr(default)


def declared_settings(
    settings: type[Any], defaults: Mapping[str, Any] | None = None
) -> list[Declared]:
    """Every setting ``settings`` reads, nested ones included, in declaration order, with the
    defaults the use sites give (a service's own gRPC port)."""
    given = defaults or {}
    found: list[Declared] = []
    for field in dataclasses.fields(settings):
        nested_spec = field.metadata.get(_NESTED)
        if isinstance(nested_spec, Nested):
            inner = {**nested_spec.defaults, **given.get(field.name, {})}
            found.extend(declared_settings(nested_spec.settings, inner))
            continue
        if _FIXED in field.metadata:
            continue
        spec = field.metadata.get(_SPEC)
        if not isinstance(spec, Spec):
            raise TypeError(f"{settings.__name__}.{field.name} declares no setting")
        if field.name in given:
            found.append(Declared(spec, _shown(given[field.name])))
        elif field.default is not dataclasses.MISSING:
            found.append(Declared(spec, _shown(field.default)))
        else:
            missing = field.default_factory is dataclasses.MISSING
            found.append(Declared(spec, "", required=missing))
    return found


# ---------------------------------------------------------------------------------------------
# Settings every process shares.

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def host_setting() -> str:
    """The address a process listens on (its gRPC and HTTP servers alike)."""
    return string("OPSMESH_HOST", "127.0.0.1", doc="the address servers listen on")


def log_level_setting() -> str:
    return choice("OPSMESH_LOG_LEVEL", "INFO", LOG_LEVELS)


def log_format_setting() -> str:
    return choice("OPSMESH_LOG_FORMAT", "json", ("json", "text"))


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How a service's gRPC server listens, logs and shuts down.

    Services embed it with their own ports: ``nested(ServerSettings, port=50052, ...)``.
    """

    host: str = host_setting()
    port: int = required(
        "OPSMESH_GRPC_PORT", _parse_integer(0, 65535), doc="the gRPC port (0: any free port)"
    )
    metrics_port: int = port_number(
        "OPSMESH_METRICS_PORT", 0, doc="Prometheus /metrics; 0 disables it"
    )
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    grace_period: float = seconds("OPSMESH_GRACE_PERIOD", 10.0, minimum=0, maximum=3600)
    """Seconds in-flight RPCs get to finish after SIGTERM."""
    drain_delay: float = seconds("OPSMESH_DRAIN_DELAY", 0.0, minimum=0, maximum=600)
    """Seconds to report NOT_SERVING before refusing new RPCs, so load balancers notice."""
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()
    access_log: bool = boolean("OPSMESH_ACCESS_LOG", False)
    max_message_bytes: int = integer(
        "OPSMESH_MAX_MESSAGE_BYTES", 4 * 1024 * 1024, minimum=1024, maximum=64 * 1024**2
    )
    strict_error_reasons: bool = boolean(
        "OPSMESH_STRICT_ERROR_REASONS", False, doc="tests: an undeclared error reason raises"
    )
