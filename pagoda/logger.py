"""Pagoda's log lines when it is used as a library.

vLLM gives its `vllm` logger a handler at INFO unless VLLM_CONFIGURE_LOGGING=0; Pagoda does the
same for its `pagoda` logger when `LLM()` starts and nothing else has configured logging, so that
its start-up (model conversion, loading, KV sizing: 20-40 s the first time) says what it is doing.
PAGODA_CONFIGURE_LOGGING=0 turns this off. An application that configures logging, as
logging.basicConfig and the `pagoda` command do (a handler on the root logger), decides alone:
Pagoda's handler is silent while the root logger has one, so no line is printed twice.
"""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def log_to_stderr(level: int | str) -> None:
    """A process of Pagoda's own (the `pagoda` command, an engine core): every logger to stderr."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def configure_logging() -> None:
    """Give the `pagoda` logger a stderr handler at INFO, unless PAGODA_CONFIGURE_LOGGING=0 or
    logging is configured already (a handler on the root or `pagoda` logger)."""
    logger = logging.getLogger("pagoda")
    if os.environ.get("PAGODA_CONFIGURE_LOGGING", "1") == "0" or logging.getLogger().handlers or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_while_root_has_no_handler)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:  # a level the application set stays
        logger.setLevel(logging.INFO)


def _while_root_has_no_handler(record: logging.LogRecord) -> bool:
    # Configured later (logging.basicConfig after LLM()), the root's handlers print the line.
    return not logging.getLogger().handlers
