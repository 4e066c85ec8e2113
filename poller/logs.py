"""Logs are events with fixed keys on stderr: JSON lines when stderr is not a terminal,
readable text when it is. The run id is bound once, on every line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _RunFilter(logging.Filter):
    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = self.run_id
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "run_id": getattr(record, "run_id", None),
        }
        line.update(_fields(record))
        if record.exc_info and record.exc_info[1] is not None:
            line["exception"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            # The whole traceback, in the one JSON line: a crash must be diagnosable.
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{stamp} {record.levelname:<7} {record.getMessage()} {fields}".rstrip()
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time, so a progress bar that redirects
    stderr to print log lines above itself gets them."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str, fmt: str, run_id: str, stream: TextIO | None = None) -> None:
    target: Any = stream or _CurrentStderr()
    if fmt == "auto":
        fmt = "text" if (stream or sys.stderr).isatty() else "json"
    handler = logging.StreamHandler(target)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RunFilter(run_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter: mohawk logs header values at debug, botocore its internals.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # mohawk warns "seen_nonce was None" on every verified response: nonces are the
    # server's business (the vendor's example calls the warning harmless).
    logging.getLogger("mohawk").setLevel(logging.ERROR)
