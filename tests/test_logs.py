"""Log lines: fixed keys, one JSON object per line, and crashes that can be diagnosed."""

from __future__ import annotations

import io
import json
import logging

import pytest

from poller import logs


def crash_and_log(fmt: str) -> str:
    stream = io.StringIO()
    logs.configure("INFO", fmt, "run-1", stream)
    try:
        {}["missing"]  # the bug we log
    except KeyError:
        logging.getLogger("poller.test").exception("sync.crashed", extra={"fields": {"n": 1}})
    return stream.getvalue()


def test_an_unexpected_exception_is_logged_with_its_traceback_in_one_json_line():
    lines = crash_and_log("json").splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["event"] == "sync.crashed" and line["run_id"] == "run-1" and line["n"] == 1
    assert line["exception"] == "KeyError: 'missing'"
    assert line["traceback"].startswith("Traceback (most recent call last)")
    assert "crash_and_log" in line["traceback"]  # the frame where it happened


def test_text_logs_show_the_traceback_too():
    text = crash_and_log("text")
    assert "sync.crashed" in text and "Traceback (most recent call last)" in text


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
