"""structlog set-up, done once by the CLI.

JSON lines on stderr for machines; a human console renderer when stderr is a
TTY. Loggers carry bound context (``app``, ``instance``, ``request_id``...).
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of writing (tests and embedders replace it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog for this process; ``json=None`` picks by whether stderr is a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line, so lines of processes sharing stderr never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        # Not cached: a logger cached on first use keeps the configuration of that moment
        # for ever, so a later configure() (an embedder's, a test's capture_logs) would
        # not reach it. The hot path does not log per request, so the saving is nil.
        cache_logger_on_first_use=False,
    )
