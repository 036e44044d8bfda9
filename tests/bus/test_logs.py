"""Logging follows the current sys.stderr, so a swapped (or closed) earlier stream is never written to."""

from __future__ import annotations

import io
import sys

import structlog

from m2m.bus.logs import configure_logging


def test_logs_go_to_the_current_stderr(monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", json=True)
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger().info("after_swap", n=1)
    assert '"event": "after_swap"' in second.getvalue()
    structlog.reset_defaults()
