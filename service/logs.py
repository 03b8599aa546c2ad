"""structlog set-up: one JSON line per event (or a console format for humans), and per-RPC log fields."""

import contextvars
import logging
import sys

import structlog

# The interceptor puts a dict here for each RPC; handlers add fields (session, tokens) with note().
_RPC_FIELDS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kvshard_rpc_fields", default=None)


def configure(log_format: str = "json", level: str = "info") -> None:
    if log_format not in ("json", "console"):
        raise ValueError(f"log format: must be json or console, got {log_format!r}")
    renderer = structlog.processors.JSONRenderer() if log_format == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def logger():
    return structlog.get_logger("kvshard")


def start_rpc(fields: dict) -> contextvars.Token:
    return _RPC_FIELDS.set(fields)


def note(**fields) -> None:
    """Add fields to the current RPC's log line."""
    current = _RPC_FIELDS.get()
    if current is not None:
        current.update(fields)
