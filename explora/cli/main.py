"""``explora <command>``: every area of the library registers its sub-commands here.

Errors caused by user input (:class:`explora.core.errors.ExploraError`) are printed as one paragraph without a traceback
and end the process with a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import textwrap
from collections.abc import Iterator

from explora.core.errors import ExploraError
from explora.core.logging import PACKAGE, configure

# Modules that define ``add_commands(subparsers)``; order is the order of ``explora --help``.
COMMAND_MODULES = (
    "explora.cli.demo",
    "explora.cli.pretrain",
    "explora.cli.evaluate",
    "explora.cli.segment",
    "explora.cli.export",
    "explora.cli.push",
    "explora.cli.data",
    "explora.cli.analyze",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="explora",
        description="ExPLoRA: adapt pre-trained vision transformers to new domains with parameter-efficient "
        "extended pre-training.",
    )
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                       help="show warnings and errors only (progress bars stay)")
    level.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       help="show debug messages too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or "func" not in vars(args):
        parser.print_help()
        return 1
    with _cli_logging(args.verbosity):
        return _run(args)


@contextlib.contextmanager
def _cli_logging(verbosity: int) -> Iterator[None]:
    """The CLI's stderr handler for one command; the ``explora`` logger is restored afterwards, so calling
    :func:`main` in-process (tests, notebooks) leaves the application's logging as it was."""
    logger = logging.getLogger(PACKAGE)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    configure(verbosity)
    try:
        yield
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


def _run(args: argparse.Namespace) -> int:
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a pipe closed by its reader shows here, in the handler below, not at interpreter exit
        return code
    except ExploraError as e:
        msg = textwrap.fill(str(e), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"explora {args.command}: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"explora {args.command}: interrupted; resume with --resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader closed the pipe (`explora presets | head`): it has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
