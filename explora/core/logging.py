"""explora's logging set-up: library modules log, the CLI decides what is shown.

Every module logs through ``logging.getLogger(__name__)`` (timm's convention), so a library user silences or
redirects explora like any other package (``logging.getLogger("explora").setLevel(logging.WARNING)``). The package
logger gets a ``NullHandler`` (the standard advice for libraries: no "no handler" noise, no output unless the
application configures logging). The CLI calls :func:`configure` once, which prints ``[explora] message`` lines on
stderr at the level chosen by ``--quiet`` / ``--verbose``; progress bars (tqdm) are unaffected.
"""

from __future__ import annotations

import logging
import sys

PACKAGE = "explora"

logging.getLogger(PACKAGE).addHandler(logging.NullHandler())


class CliHandler(logging.StreamHandler):
    """stderr handler of the command-line tool: ``[explora] message``, warnings and errors tagged with the level."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(_CliFormatter())


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return f"[explora] {text}"


def level_for(verbosity: int) -> int:
    """``--quiet`` (-1) shows warnings and errors, the default (0) progress messages, ``--verbose`` (1) debug."""
    return {-1: logging.WARNING, 0: logging.INFO}.get(max(-1, min(verbosity, 1)), logging.DEBUG)


def configure(verbosity: int = 0) -> logging.Logger:
    """Attach the CLI handler to the ``explora`` logger (idempotent) at the level for ``verbosity``."""
    logger = logging.getLogger(PACKAGE)
    for handler in [h for h in logger.handlers if isinstance(h, CliHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(CliHandler())
    logger.setLevel(level_for(verbosity))
    logger.propagate = False
    return logger
