"""Reading serialized files that may come from anywhere, without running code from them.

Two kinds of serialized files reach the package:

* ``torch.save`` files (training checkpoints, ``load_from`` weights, reference ``.pth`` files):
  :func:`load_torch_file` reads them with ``torch.load(..., weights_only=True)``, torch's restricted
  unpickler (tensors, plain containers, numbers, strings), onto the CPU;
* plain pickles (reference info ``.pkl`` files, the ``.metadata`` of a distributed checkpoint):
  :class:`RestrictedUnpickler` resolves only the globals its caller allows.

A file that asks for anything else is refused with :class:`UnsafePickleError`, naming the file and
what it asked for; nothing it names is imported or called. A file that cannot be read at all
(missing, empty, truncated, random bytes) is an :class:`UnreadableFileError`. Both are one line.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import IO, Any, Callable, Union

import torch

from streampetr_plugin.errors import InputError, describe

PathLike = Union[str, "os.PathLike[str]"]
# torch's weights-only unpickler names a refused global as "GLOBAL module.name" in its message.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+[\w])")
_MAX_DETAIL = 160


class UnsafePickleError(InputError, pickle.UnpicklingError):
    """A file that needs a class or function outside its allow-list to be unpickled."""


class UnreadableFileError(InputError):
    """A file that is missing, empty, truncated or not of the expected kind."""


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message``, shortened: library messages run over many lines."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _unsafe_file_error(path: PathLike, needed: str, allowed: str, fix: str) -> UnsafePickleError:
    """The one-line error for ``path``, which asked for ``needed`` where only ``allowed`` may be loaded."""
    return UnsafePickleError(describe(
        os.fspath(path), f"refusing to unpickle {needed}: only {allowed} may be loaded, nothing was run", fix,
    ))


def unreadable_file_error(path: PathLike, error: BaseException, what: str) -> UnreadableFileError:
    """The one-line error for ``path`` that could not be read as ``what`` because of ``error``."""
    if isinstance(error, FileNotFoundError):
        return UnreadableFileError(describe(os.fspath(path), "does not exist", "check the path"))
    if isinstance(error, OSError):
        return UnreadableFileError(describe(
            os.fspath(path), f"cannot be opened ({error.strerror or _one_line(error)})",
            "check the path and its permissions",
        ))
    return UnreadableFileError(describe(
        os.fspath(path), f"is not a readable {what} ({_one_line(error)})",
        "the file is truncated, damaged or of another kind: copy it again or pick another one",
    ))


def load_torch_file(path: PathLike, *, what: str = "torch.save file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Raises :class:`UnsafePickleError` when the file needs code to be unpickled (naming the refused
    globals) and :class:`UnreadableFileError` (naming ``what`` was expected) otherwise.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused is None:
            raise unreadable_file_error(path, error, what) from error
        try:  # full names (torch's message drops "builtins."); scans the pickle without running it
            needed = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # a file in torch's legacy (non-zip) format: the message's name it is
            needed = ""
        raise _unsafe_file_error(
            path, needed or refused.group(1), "tensors, numbers, strings and plain containers",
            "re-save its tensors as a plain state dict in a trusted environment",
        ) from error
    except Exception as error:  # a damaged file fails in many ways (zip, pickle, EOF, index, key errors)
        raise unreadable_file_error(path, error, what) from error


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the globals ``allowed(module, name)`` accepts.

    Anything else raises :class:`UnsafePickleError` naming ``path``, what may be loaded
    (``allowed_description``, e.g. "NumPy arrays and builtin containers") and ``fix``.
    """

    def __init__(
        self,
        handle: IO[bytes],
        *,
        path: PathLike,
        allowed: Callable[[str, str], bool],
        allowed_description: str,
        fix: str,
    ) -> None:
        super().__init__(handle)
        self._path = path
        self._allowed = allowed
        self._allowed_description = allowed_description
        self._fix = fix

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles name the Python 2 module
            module = "builtins"
        if not self._allowed(module, name):
            raise _unsafe_file_error(self._path, f"{module}.{name}", self._allowed_description, self._fix)
        return super().find_class(module, name)

