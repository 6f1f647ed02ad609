"""structlog set-up: JSON lines for journald, a readable console at a terminal.

- Under systemd (``$JOURNAL_STREAM`` set) each JSON line starts with its syslog
  priority (``<6>``), which journald strips and uses as the entry's priority.
- Every line from a session task carries ``session`` (bound with contextvars).
- Tracebacks are rendered without frame locals: locals hold secrets.
- Every configured secret value is replaced by ``***`` wherever it appears in a line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

LogFormat = Literal["auto", "json", "console"]

# RFC 5424 severities, as journald reads them from a "<N>" line prefix.
_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


#: Keys whose values wirekeep itself sets (names, states, levels): never secret, and
#: masking inside them would only make a line unreadable.
STRUCTURAL = frozenset(
    {"event", "level", "timestamp", "logger", "session", "source", "trigger", "dest", "version"}
)


class Redactor:
    """A processor that masks secret values in every string of the event dict."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        if self.secrets:
            for key, value in event.items():
                if key not in STRUCTURAL:
                    event[key] = self._mask(value)
        return event

    def _mask(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: self._mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._mask(v) for v in value)
        return value


def _journald_prefix(_logger: Any, method: str, event: str) -> str:
    return f"<{_PRIORITY.get(method, 6)}>{event}"


def configure(
    fmt: LogFormat = "auto",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    level: int = logging.INFO,
) -> None:
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors = [
            *shared,
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            Redactor(secrets),
            structlog.processors.JSONRenderer(),
        ]
        if os.environ.get("JOURNAL_STREAM"):
            processors.append(_journald_prefix)
    else:
        processors = [
            *shared,
            Redactor(secrets),
            # plain_traceback: the standard format, never frame locals.
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
