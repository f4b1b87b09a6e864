"""Read MindSpeed-MM checkpoints back into StreamPETR's own format.

The host saves with ``torch.distributed.checkpoint`` (DCP): ``<save>/iter_%07d/`` holds the
model under ``model.*`` (parameter names without DDP's ``module.``, persistent buffers included),
the optimiser and per-rank extra state; ``<save>/latest_checkpointed_iteration.txt`` names the
newest. The model part uses the reference's names (the host-facing model keeps the detector's)
with the shared decoder branches stored once (:mod:`.aliases`); given the model, they are filled
in again, which gives the reference's full state dict for ``build_model(recipe)`` or
``runtime.load_from``.

Nothing in a DCP checkpoint is unpickled freely. torch's own reader (``dcp_to_torch_save``) reads the
``.metadata`` file with plain ``pickle.load`` and any non-tensor entry with ``torch.load(...,
weights_only=False)``; here the metadata goes through a restricted unpickler that resolves only the
DCP metadata classes, ``torch.Size``, dtypes, layouts and paths, its data files must lie inside the
checkpoint directory, and only the model's tensors are read (with ``weights_only=True``); non-tensor
entries and the optimiser are never deserialized.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from streampetr_plugin.errors import describe
from streampetr_plugin.integrations.mindspeed_mm.aliases import expand_aliases
from streampetr_plugin.safe_loading import (
    RestrictedUnpickler,
    UnreadableFileError,
    UnsafePickleError,
    unreadable_file_error,
)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_PREFIX = "model."
DDP_PREFIX = "module."


def resolve_checkpoint_dir(path: Union[str, Path]) -> Path:
    """An ``iter_*``/``release`` directory as given, or the one the tracker file of a save root names."""
    path = Path(path)
    tracker = path / TRACKER
    if tracker.is_file():
        tracked = tracker.read_text().strip()
        return path / ("release" if tracked == "release" else f"iter_{int(tracked):07d}")
    if (path / ".metadata").is_file():
        return path
    raise FileNotFoundError(
        f"{path} is neither a MindSpeed-MM save directory (no {TRACKER}) nor a DCP checkpoint"
    )


# What torch's DCP writer pickles into ``.metadata`` (the checkpoint id is a path when saved with one).
_METADATA_CLASSES = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")]
)
_TRUSTED_SOURCE = "only load distributed checkpoints from a source you trust"


def _metadata_global_allowed(module: str, name: str) -> bool:
    """What a DCP ``.metadata`` pickle may name: the classes above, and dtypes (``torch.float32``),
    looked up in torch's namespace without triggering its lazy imports."""
    if (module, name) in _METADATA_CLASSES:
        return True
    return module == "torch" and isinstance(vars(torch).get(name), torch.dtype)


def read_dcp_metadata(directory: Union[str, Path], file_name: str = ".metadata") -> Any:
    """The ``Metadata`` of the DCP checkpoint in ``directory``, read through the restricted unpickler.

    Raises :class:`UnsafePickleError` when the file names anything else and
    :class:`UnreadableFileError` when it is damaged, not DCP metadata, or points at data files
    outside ``directory``; both name the file.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / file_name
    try:
        with open(path, "rb") as handle:
            metadata = RestrictedUnpickler(
                handle, path=path, allowed=_metadata_global_allowed,
                allowed_description="DCP metadata classes, torch.Size, dtypes, layouts and paths",
                fix=_TRUSTED_SOURCE,
            ).load()
    except UnsafePickleError:
        raise
    except Exception as error:  # truncated or random bytes fail in many ways inside pickle
        raise unreadable_file_error(path, error, "DCP metadata file") from error
    if not isinstance(metadata, Metadata):
        raise UnreadableFileError(describe(
            str(path), f"holds {type(metadata).__name__}, not DCP metadata", "point at a DCP checkpoint"
        ))
    root = Path(directory).resolve()
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or (root / relative).resolve().parent != root:
            raise UnreadableFileError(describe(
                str(path), f"names a data file outside its checkpoint directory ({relative!r})",
                _TRUSTED_SOURCE,
            ))
    return metadata


def _restricted_reader(directory: Path) -> Any:
    """A DCP ``FileSystemReader`` whose metadata comes from :func:`read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class RestrictedFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            metadata = read_dcp_metadata(directory, ".metadata" if rank is None else f"__{rank}.metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return RestrictedFileSystemReader(directory)


def _model_tensors(directory: Path) -> Dict[str, Any]:
    """The checkpoint's model tensors, in the nesting they were saved with (``{"model": {...}}`` or
    top-level ``model.*`` keys). Only tensor entries are requested, so the DCP reader never
    deserializes a non-tensor object, and the optimiser is not read at all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_dcp_metadata(directory)
    planner_data = metadata.planner_data or {}
    state: Dict[str, Any] = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not (fqn.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)):
            continue
        *parents, leaf = planner_data.get(fqn, (fqn,))
        node = state
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if state:
        with warnings.catch_warnings():  # no_dist=True is the point here, not an accident to warn about
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=_restricted_reader(directory), no_dist=True)
    return state


def load_host_checkpoint(
    path: Union[str, Path], model: Optional[nn.Module] = None
) -> Dict[str, torch.Tensor]:
    """The detector's state dict from a MindSpeed-MM DCP checkpoint; with ``model`` (e.g.
    ``build_model(recipe)``) the shared-branch aliases are added back (the reference layout)."""
    directory = resolve_checkpoint_dir(path)
    content = _model_tensors(directory)
    nested = content.get("model")
    stored = (
        nested
        if isinstance(nested, dict)
        else {
            key[len(MODEL_PREFIX) :]: value for key, value in content.items() if key.startswith(MODEL_PREFIX)
        }
    )
    if not stored:
        raise ValueError(f"{directory} holds no model tensors (no '{MODEL_PREFIX}*' entries)")
    state = {
        key[len(DDP_PREFIX) :] if key.startswith(DDP_PREFIX) else key: value for key, value in stored.items()
    }
    return expand_aliases(state, model) if model is not None else state


def export_host_checkpoint(path: Union[str, Path], output: Union[str, Path], model: nn.Module) -> Path:
    """Write the model of a host checkpoint, aliases filled in from ``model``, as a plain
    ``{'state_dict': ...}`` file (usable as a recipe's ``runtime.load_from``)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": load_host_checkpoint(path, model)}, output)
    return output
