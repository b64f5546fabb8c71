"""Ending a worker or engine core process once its work is done and its resources released."""

from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int = 0) -> None:
    """Flush the logs and standard streams and end this process without interpreter teardown.

    Tearing down torch's modules collects a huge object graph: seconds on a busy host, more than
    the parent's grace before it kills the process, and nothing left to release needs it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone: nothing more can be written
            pass
    os._exit(code)
