"""Typed settings read from the environment, validated once at start.

Every problem is collected and reported together, naming the variable, the
value it had and what was expected, so a bad deployment fails with one clear
message instead of a traceback from deep inside a service.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class SettingsError(Exception):
    """The environment holds values a service cannot start with."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class EnvReader:
    """Reads typed values from an environment mapping, collecting every error.

    Call :meth:`check` after reading all values; it raises one
    :class:`SettingsError` listing each bad variable.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._problems: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def problem(self, message: str) -> None:
        """Records a problem found by a cross-field check."""
        self._problems.append(message)

    def string(self, name: str, default: str, *, choices: Iterable[str] | None = None) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if choices is not None:
            allowed = tuple(choices)
            if raw not in allowed:
                self._problems.append(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
                return default
        return raw

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            self._problems.append(f"{name}={raw!r}: expected an integer")
            return default
        if not minimum <= value <= maximum:
            self._problems.append(
                f"{name}={raw!r}: expected an integer from {minimum} to {maximum}"
            )
            return default
        return value

    def seconds(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        """A duration in seconds, as a plain number ("2.5") or with a unit ("250ms", "5m")."""
        raw = self._raw(name)
        if raw is None:
            return default
        value = _parse_seconds(raw)
        if value is None:
            self._problems.append(
                f"{name}={raw!r}: expected a duration such as 30, 2.5s, 250ms, 5m or 1h"
            )
            return default
        if not minimum <= value <= maximum:
            self._problems.append(
                f"{name}={raw!r}: expected a duration from {minimum:g}s to {maximum:g}s"
            )
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        self._problems.append(f"{name}={raw!r}: expected true or false")
        return default

    def check(self) -> None:
        if self._problems:
            raise SettingsError(self._problems)


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


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How a service's gRPC server listens, logs and shuts down."""

    host: str = "127.0.0.1"
    port: int
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    grace_period: float = 10.0
    """Seconds in-flight RPCs get to finish after SIGTERM."""
    drain_delay: float = 0.0
    """Seconds to report NOT_SERVING before refusing new RPCs, so load balancers notice."""
    log_level: str = "INFO"
    log_format: str = "json"
    access_log: bool = False
    max_message_bytes: int = 4 * 1024 * 1024

    @classmethod
    def from_env(
        cls, env: EnvReader, *, default_port: int, default_metrics_port: int = 0
    ) -> ServerSettings:
        return cls(
            host=env.string("OPSMESH_HOST", "127.0.0.1"),
            port=env.integer("OPSMESH_GRPC_PORT", default_port, minimum=0, maximum=65535),
            metrics_port=env.integer(
                "OPSMESH_METRICS_PORT", default_metrics_port, minimum=0, maximum=65535
            ),
            grace_period=env.seconds("OPSMESH_GRACE_PERIOD", 10.0, minimum=0, maximum=3600),
            drain_delay=env.seconds("OPSMESH_DRAIN_DELAY", 0.0, minimum=0, maximum=600),
            log_level=env.string(
                "OPSMESH_LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
            ),
            log_format=env.string("OPSMESH_LOG_FORMAT", "json", choices=("json", "text")),
            access_log=env.boolean("OPSMESH_ACCESS_LOG", False),
            max_message_bytes=env.integer(
                "OPSMESH_MAX_MESSAGE_BYTES", 4 * 1024 * 1024, minimum=1024, maximum=64 * 1024**2
            ),
        )
