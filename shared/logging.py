"""Logging set-up: plain or JSON lines on stderr, configured once per process.

Modules log through ``logging.getLogger(__name__)`` and pass context as ``extra={"request_id": ...,
"adapter": ..., "worker_id": ..., "latency_ms": ...}``; the JSON formatter emits those as fields.
Never log prompts, images or secrets.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.settings import Settings

# LogRecord attributes that are not user ``extra`` fields.
# uvicorn adds ``color_message`` (the message again, with ANSI colours) to its records.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}
_HANDLER_MARK = "_mole_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, extras, and ``exc`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """``time level logger: message key=value...`` with the record's extra fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={v}" for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")]
        if not extras:
            return line
        head, sep, tail = line.partition("\n")
        return f"{head} {' '.join(extras)}{sep}{tail}"


_QUIET_LOGGERS = ("httpx", "httpcore", "transformers", "peft", "huggingface_hub")


def configure_logging(settings: Settings) -> None:
    """Install one stderr handler on the root logger with the level and format from ``settings``.

    Idempotent: calling it again replaces the format/level of the handler it installed instead of
    adding a second one; handlers installed by others are left alone.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, _HANDLER_MARK, False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if settings.log_json else PlainFormatter())
    root.setLevel(settings.log_level)
    # Per-request client logs and library progress bars would drown the service's own lines.
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
