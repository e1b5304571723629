"""Errors a user can act on.

Every failure caused by user input (a config key, a path, a checkpoint, a data file) raises a subclass of
:class:`ExploraError` whose message names the offending thing and says what was expected. The CLI prints the
message without a traceback and exits with a non-zero code.
"""

from __future__ import annotations


class ExploraError(Exception):
    """Base class for errors caused by user input; the message is meant to be read by a person."""

    exit_code = 2


class ConfigError(ExploraError):
    """A config key, value or override is wrong."""


class CheckpointError(ExploraError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class DataError(ExploraError):
    """A dataset, file or sample is missing, unreadable or inconsistent with the model."""


class DivergenceError(ExploraError):
    """Training produced non-finite losses or gradients too many steps in a row."""

    exit_code = 3
