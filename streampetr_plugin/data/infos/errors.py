"""Errors of missing or unusable info files; their messages name the file and the command that re-creates
it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from streampetr_plugin.errors import InputError, describe


class InfoFileNotFoundError(InputError, FileNotFoundError):
    """An info file is missing; the message names the path and the command that creates it."""


class InfoFileError(InputError, ValueError):
    """An info file (or its arrays file) that exists but cannot be used: not JSON, truncated, of another
    format or layout, or not matching its checksum; the message names the file."""


def create_data_command_line(root: Optional[Path], version: Optional[str]) -> str:
    """The ``streampetr create-data`` command that builds the infos of ``root`` (a placeholder if unknown)."""
    root_hint = str(root) if root is not None else "<nuscenes root>"
    return f"streampetr create-data --root {root_hint} --version {version or 'v1.0-trainval'}"


def missing_info_error(path: Path, root: Optional[Path], version: Optional[str]) -> InfoFileNotFoundError:
    """``path`` does not exist: the error names the command that creates it."""
    fix = f"create it with: {create_data_command_line(root, version)}"
    return InfoFileNotFoundError(describe(str(path), "nuScenes info file not found", fix))


def unusable_info_error(path: Path, problem: str, root: Optional[Path],
                        version: Optional[str]) -> InfoFileError:
    """``path`` exists but cannot be used (``problem``): the error names the command that re-creates it."""
    fix = f"re-create the infos: {create_data_command_line(root, version)}"
    return InfoFileError(describe(str(path), problem, fix))
