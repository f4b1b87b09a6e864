"""The content checksum of a training checkpoint: SHA-256 over a canonical walk of what it holds.

The digest covers the saved structure (every key, number, string and tensor: dtype, shape and bytes),
not the file's bytes, so it can live inside the file it covers (``state["checksum"]``), written by the
same atomic rename, and be recomputed from what ``torch.load`` returns. Damage that still unpickles
(flipped bytes inside a tensor, e.g. an optimiser moment) changes the digest; damage elsewhere makes
the file unreadable. Hashing runs at about the speed of reading the file.
"""
from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from streampetr_plugin.errors import InputError, describe

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "checksum"
# Checkpoint format 1 is format 2 without the checksum; such files still load, unverified, with a warning.
UNCHECKED_FORMAT = 1
ALGORITHM = "sha256"


def _feed(hasher: Any, value: Any) -> None:
    """Add ``value`` to ``hasher`` with a type tag and length, so distinct structures never collide."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)  # (numel,)
        hasher.update(f"T{value.dtype}{tuple(value.shape)};".encode())
        hasher.update(flat.view(torch.uint8).numpy())  # (numel * element size,) raw bytes
    elif isinstance(value, Mapping):
        hasher.update(b"D%d;" % len(value))
        for key in sorted(value, key=lambda item: (type(item).__name__, repr(item))):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(b"L%d;" % len(value))
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        hasher.update(b"S%d;" % len(encoded) + encoded)
    elif isinstance(value, (bytes, bytearray)):
        hasher.update(b"B%d;" % len(value) + bytes(value))
    elif isinstance(value, bool) or value is None:
        hasher.update(repr(value).encode())
    elif isinstance(value, int):
        hasher.update(b"I%d;" % value)
    elif isinstance(value, float):
        hasher.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, (torch.dtype, torch.device)):
        hasher.update(f"O{value};".encode())
    else:
        raise TypeError(f"a checkpoint holds only plain data and tensors, not {type(value).__name__}")


def content_digest(state: Mapping) -> str:
    """``"sha256:<hex>"`` of every entry of ``state`` except the checksum itself."""
    hasher = hashlib.new(ALGORITHM)
    _feed(hasher, {key: value for key, value in state.items() if key != CHECKSUM_KEY})
    return f"{ALGORITHM}:{hasher.hexdigest()}"


class CheckpointError(InputError):
    """A file that is not a usable training checkpoint: unreadable, damaged, or not this run's shape."""


def verify_checksum(state: Mapping, path: Path) -> None:
    """Recompute the content checksum of a loaded checkpoint; :class:`CheckpointError` if it differs.

    A file of the unchecked format (written before checkpoints carried a checksum) passes with a warning.
    """
    if CHECKSUM_KEY not in state and state.get("format") == UNCHECKED_FORMAT:
        logger.warning("%s: written without a content checksum; its contents cannot be verified", path)
        return
    try:
        actual = content_digest(state)
    except TypeError as error:
        raise CheckpointError(describe(str(path), f"is not a training checkpoint ({error})")) from error
    if state.get(CHECKSUM_KEY) != actual:
        raise CheckpointError(describe(
            str(path), "content checksum mismatch: the file was damaged after it was written",
            "resume from an earlier checkpoint (runtime.resume=auto falls back by itself) or copy it again",
        ))
