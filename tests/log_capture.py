"""Capture what explora logs, whatever handlers the CLI has installed on the package logger.

pytest's ``caplog`` listens on the root logger, which does not see records once the CLI's handler set-up
(``explora.core.logging.configure``) has stopped the ``explora`` logger from propagating; a handler on the package
logger itself sees every record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def explora_log(level: int = logging.INFO) -> Iterator[list[str]]:
    """``with explora_log() as messages:`` -- every message explora logs at ``level`` or above in the block."""
    logger = logging.getLogger("explora")
    handler, old_level = _Collect(), logger.level
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(min(level, old_level) if old_level else level)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
