"""Structured logging: one JSON object a line, with the RPC's request id."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

from mesh.context import principal_var, request_id_var
from mesh.settings import ServerSettings

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """Formats records as JSON with time, level, logger, message, request_id and extras.

    The caller's ``org_id`` and ``user_id`` (from the RPC's principal) go on every line, so a
    log reader can show an organization its own lines and nobody else's. An ``org_id`` or
    ``task_id`` passed through ``extra=`` (a worker acting for a task's org) wins.
    """

    def __init__(self, *, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        principal = principal_var.get()
        if principal is not None:
            entry["org_id"] = principal.org_id
            entry["user_id"] = principal.user_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        request_id = request_id_var.get()
        prefix = f"[{request_id}] " if request_id else ""
        record.msg = f"{prefix}{record.msg}"
        try:
            return super().format(record)
        finally:
            record.msg = record.msg[len(prefix) :]


def configure_logging(*, service: str, level: str, fmt: str) -> None:
    """Sends every log record to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service=service))
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def configure_service_logging(service: str, settings: ServerSettings) -> None:
    """Logging as a service's server settings ask (OPSMESH_LOG_LEVEL, OPSMESH_LOG_FORMAT)."""
    configure_logging(service=service, level=settings.log_level, fmt=settings.log_format)
