"""The errors a user is meant to read, and the exit status each one ends a command with.

A command-line entry point catches :class:`StreamPETRError` and prints ``error: <message>`` as one
line, without a traceback (``--debug`` or ``STREAMPETR_DEBUG=1`` shows it), then exits with the
error's ``exit_status``. A message names the file or key it is about, what is wrong and, in
parentheses, how to fix it: ``<file or key>: <what is wrong> (<how to fix>)``.

Two kinds, by whose move it is:

- :class:`InputError` (exit 2): the input is unusable as given (a recipe key, a file that is missing,
  truncated or of the wrong kind, an argument); running again with the same input fails the same way.
- :class:`RunError` (exit 1): the input was fine but the run failed (non-finite training, a device or
  process group that would not start, a full disk).

Modules raise their own subclasses (``CheckpointError``, ``RecipeError``, ...) so callers can tell
them apart; the entry points only need these two bases.
"""
from __future__ import annotations

from typing import Optional

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def describe(subject: str, problem: str, fix: Optional[str] = None) -> str:
    """``<subject>: <problem> (<fix>)``: the one-line form every user-facing error takes."""
    return f"{subject}: {problem}" + (f" ({fix})" if fix else "")


class StreamPETRError(Exception):
    """An error whose message is written for the user (see the module docstring)."""

    exit_status = EXIT_FAILURE


class InputError(StreamPETRError):
    """Bad input: a file, key or argument that cannot be used as given (exit 2)."""

    exit_status = EXIT_BAD_INPUT


class RunError(StreamPETRError):
    """A run that failed although its input was valid (exit 1)."""

    exit_status = EXIT_FAILURE
