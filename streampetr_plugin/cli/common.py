"""Helpers shared by the command-line entry points: logging, one-line errors and exit statuses.

Both entry points run their command through :func:`run_command`: a :class:`StreamPETRError` ends the
command with ``error: <file or key>: <what is wrong> (<how to fix>)`` on stderr and the error's exit
status (2 bad input, 1 a failed run); an :class:`OSError` naming a file is reported the same way; any
other exception with ``error: unexpected <Type>: <message> (...)`` and exit status 1. The traceback is
shown only with ``--debug`` or ``STREAMPETR_DEBUG=1``.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from typing import Callable, List, NoReturn, Tuple, TypeVar

from streampetr_plugin.version import __version__
from streampetr_plugin.config.loader import RecipeError
from streampetr_plugin.errors import EXIT_BAD_INPUT, EXIT_FAILURE, StreamPETRError, describe
from streampetr_plugin.training.metrics_log import ProgressAwareHandler

T = TypeVar("T")

DEBUG_VARIABLE = "STREAMPETR_DEBUG"
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT

# errno -> (exit status, how to fix) of file-system errors: a path that is wrong or not writable is bad
# input; a full or failing disk is a failed run.
_OS_ERRORS = {
    errno.ENOENT: (EXIT_BAD_INPUT, "check the path"),
    errno.ENOTDIR: (EXIT_BAD_INPUT, "a part of the path is a file, not a directory"),
    errno.EISDIR: (EXIT_BAD_INPUT, "give a file, not a directory"),
    errno.EACCES: (EXIT_BAD_INPUT, "check its permissions or choose another location"),
    errno.EPERM: (EXIT_BAD_INPUT, "check its permissions or choose another location"),
    errno.EROFS: (EXIT_BAD_INPUT, "the file system is read-only: choose another location"),
    errno.ENOSPC: (EXIT_FAILURE, "free some space or choose another location"),
}


# The metric report is logged bare, so that its lines start with "mAP:" / "NDS:" as Ascend training
# harnesses grep for them.
PLAIN_LOGGERS = ("streampetr_plugin.evaluation.nuscenes_metric",)


class _Formatter(logging.Formatter):
    """Timestamped lines, except the bare metric report."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name in PLAIN_LOGGERS:
            return record.getMessage()
        return super().format(record)


# The loggers ``-v`` turns to DEBUG; every other library (matplotlib, PIL, ...) stays at INFO.
PROJECT_LOGGERS = ("streampetr_plugin", "streampetr")


def setup_logging(verbose: bool = False) -> None:
    """Timestamped records on stderr, above the training progress bar; ``verbose``: this project's
    debug records too."""
    handler = ProgressAwareHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line (exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        _print_lines([describe(self.prog, message, f"see {self.prog} --help")])
        raise SystemExit(EXIT_BAD_INPUT)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe (a file or a shipped name) and its ``a.b=value`` overrides, as every command takes them."""
    parser.add_argument("recipe", help="recipe file or shipped recipe name (see `streampetr recipes`)")
    parser.add_argument("overrides", nargs="*", help="a.b=value to set, ~a.b to delete")


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_output_arguments(parser: argparse.ArgumentParser, *, default: object = False) -> None:
    """``-v/--verbose`` and ``--debug``. A sub-command repeats them with ``default=argparse.SUPPRESS``,
    so that they work before and after the command's name."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", default=default,
        help=f"show the traceback of an error (also: {DEBUG_VARIABLE}=1)",
    )


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _print_lines(messages: List[str]) -> None:
    for message in messages:
        print(f"error: {_one_line(message)}", file=sys.stderr)


def error_report(error: BaseException) -> Tuple[List[str], int]:
    """The messages (without the ``error:`` prefix) and the exit status that ``error`` ends a command with."""
    if isinstance(error, RecipeError):
        return list(error.errors), error.exit_status  # one line per problem
    if isinstance(error, StreamPETRError):
        return [str(error)], error.exit_status
    if isinstance(error, OSError) and error.filename is not None:
        status, fix = _OS_ERRORS.get(error.errno, (EXIT_FAILURE, None))
        problem = (error.strerror or type(error).__name__).lower()
        return [describe(os.fspath(error.filename), problem, fix)], status
    problem = f"unexpected {type(error).__name__}: {_one_line(str(error)) or '(no message)'}"
    return [f"{problem} (run with --debug for the traceback)"], EXIT_FAILURE


def debug_requested(flag: bool) -> bool:
    return flag or os.environ.get(DEBUG_VARIABLE, "").lower() in ("1", "true", "yes", "on")


def run_command(action: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command; an error ends it with one ``error:`` line per problem and its exit status."""
    try:
        return action()
    except KeyboardInterrupt:
        _print_lines(["interrupted"])
        return EXIT_INTERRUPTED
    except Exception as error:  # the entry point's last word: every failure ends in one line
        if debug_requested(debug):
            traceback.print_exc()
        messages, status = error_report(error)
        _print_lines(messages)
        return status


def exit_on_recipe_error(action: Callable[[], T]) -> T:
    """Run ``action``; a recipe problem prints its ``error:`` lines (no traceback) and exits 2."""
    try:
        return action()
    except RecipeError as error:
        messages, status = error_report(error)
        _print_lines(messages)
        raise SystemExit(status) from None

