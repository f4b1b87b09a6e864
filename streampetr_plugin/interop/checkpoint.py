"""Loading reference StreamPETR checkpoints (and backbone-only weights) into our modules.

Our modules reproduce the reference's ``state_dict`` key names, so loading is a matter of reading
the file safely, unwrapping its layout and reporting what did not match:

* mmcv layout ``{'state_dict': ..., 'meta': ..., 'optimizer': ...}`` (the reference's own
  checkpoints, e.g. ``stream_petr_vov_flash_800_bs2_seq_24e.pth``), or a plain state dict;
* keys of a ``DistributedDataParallel`` model (``module.`` prefix) are stripped;
* backbone-only files: ``fcos3d_vovnet_imgbackbone-remapped.pth`` (the V2-99 recipe's ``load_from``)
  is a plain dict whose keys are already ``img_backbone.*`` (626 entries) plus the FCOS3D head's own
  ``bbox_head.*`` entries, which are reported as unexpected. A file whose keys are bare backbone
  names (torchvision's ``resnet50``: ``conv1.weight``, ``layer1.0.conv1.weight``, ..., ``fc.*``) is
  mapped under ``img_backbone.`` automatically when none of its keys match the model as they are.

Files are always read with ``torch.load(..., weights_only=True)``: a file that needs arbitrary
classes to be unpickled is refused (:class:`UnsafeCheckpointError`) rather than executed; one that
is empty, truncated or not a checkpoint at all is ``safe_loading.UnreadableFileError``, one that holds
no state dict :class:`UnusableCheckpointError`. A training checkpoint of this package (it carries a
content checksum) is verified first, so ``load_from`` and ``streampetr eval`` refuse a damaged one;
every refusal is one line naming the file.

The reference shares one classification and one regression branch across the six decoder layers,
so its checkpoints hold six identical copies (``pts_bbox_head.cls_branches.0-5.*``). They load into
a model that shares the module the same way (every copy lands on the one tensor) or into six
separate modules; copies that disagree while landing on one shared tensor are reported.
"""
from __future__ import annotations

import os
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from streampetr_plugin.checksum import CHECKSUM_KEY, verify_checksum
from streampetr_plugin.errors import InputError, describe
from streampetr_plugin.safe_loading import UnsafePickleError, load_torch_file

BACKBONE_PREFIX = "img_backbone."
_DDP_PREFIX = "module."

PathLike = Union[str, "os.PathLike[str]"]


# The file needs classes outside torch's weights-only allowlist to be unpickled.
UnsafeCheckpointError = UnsafePickleError


class UnusableCheckpointError(InputError, ValueError):
    """The file loads but holds no state dict of tensors."""


class CheckpointMismatchError(RuntimeError):
    """Raised by a strict load when keys are missing, unexpected or of another shape."""

    def __init__(self, report: "LoadReport") -> None:
        super().__init__(report.summary())
        self.report = report


@dataclass
class LoadReport:
    """What a checkpoint load did.

    ``loaded``: model keys that received a value; ``missing``: model keys the file does not provide;
    ``unexpected``: file keys (after renaming) the model does not have; ``shape_mismatch``:
    ``(key, file shape, model shape)``, not loaded; ``alias_conflicts``: groups of keys that name one
    shared tensor of the model but carry different values in the file (the last copy won);
    ``prefix_map``: the ``{file prefix: model prefix}`` renaming that was applied.
    """

    path: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    alias_conflicts: List[Tuple[str, ...]] = field(default_factory=list)
    prefix_map: Dict[str, str] = field(default_factory=dict)

    @property
    def is_exact(self) -> bool:
        """True when every model key was loaded and every file key was used."""
        return not (self.missing or self.unexpected or self.shape_mismatch or self.alias_conflicts)

    def summary(self, max_names: int = 8) -> str:
        """Human-readable multi-line account of the load, naming up to ``max_names`` keys per list."""

        def names(items: List[str]) -> str:
            shown = ", ".join(items[:max_names])
            more = len(items) - max_names
            return shown + (f", ... (+{more} more)" if more > 0 else "")

        total = len(self.loaded) + len(self.missing) + len(self.shape_mismatch)
        lines = [f"checkpoint {self.path}: loaded {len(self.loaded)} of {total} model entries"]
        if self.prefix_map:
            lines[0] += f" (renamed {self.prefix_map})"
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {names(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {names(self.unexpected)}")
        if self.shape_mismatch:
            mismatches = [f"{k} file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatch]
            lines.append(f"shape mismatch, not loaded ({len(mismatches)}): {names(mismatches)}")
        if self.alias_conflicts:
            groups = [" = ".join(group) for group in self.alias_conflicts]
            lines.append(
                f"shared tensor given different values, last copy kept ({len(groups)}): {names(groups)}"
            )
        return "\n".join(lines)


def read_checkpoint_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The state dict held by a checkpoint file (mmcv layout or plain), ``module.`` prefixes removed.

    Raises :class:`UnsafeCheckpointError` if the file needs code to be unpickled (it is not read),
    ``safe_loading.UnreadableFileError`` if it cannot be read, ``CheckpointError`` if it is a training
    checkpoint whose checksum does not match and :class:`UnusableCheckpointError` if it holds no state
    dict.
    """
    name = os.fspath(path)
    content = load_torch_file(path, what="checkpoint")
    if isinstance(content, MappingABC) and CHECKSUM_KEY in content:
        verify_checksum(content, path)
    if isinstance(content, MappingABC) and isinstance(content.get("state_dict"), MappingABC):
        content = content["state_dict"]
    fix = "give a file that holds the model's weights"
    if not isinstance(content, MappingABC) or not content:
        problem = f"holds no state dict (found {type(content).__name__})"
        raise UnusableCheckpointError(describe(name, problem, fix))
    not_tensors = [key for key, value in content.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise UnusableCheckpointError(describe(
            name, f"holds no state dict: entries {not_tensors[:8]} are not tensors "
            f"(top-level keys: {list(content)[:8]})", fix,
        ))
    state: Dict[str, torch.Tensor] = {}
    for key, value in content.items():
        stripped = key[len(_DDP_PREFIX):] if key.startswith(_DDP_PREFIX) else key
        if stripped in state:
            raise UnusableCheckpointError(describe(
                name, f"key {stripped!r} appears with and without 'module.'", "keep one of the two copies"
            ))
        state[stripped] = value
    return state


def _rename(key: str, prefix_map: Mapping[str, str]) -> str:
    """Replace the longest matching file prefix by its model prefix; other keys are kept."""
    for source in sorted(prefix_map, key=len, reverse=True):
        if key.startswith(source):
            return prefix_map[source] + key[len(source):]
    return key


def _detect_prefix_map(file_keys: List[str], model_keys: set) -> Dict[str, str]:
    """``{"": "img_backbone."}`` for a bare backbone file, else no renaming."""
    if any(key in model_keys for key in file_keys):
        return {}
    if any(BACKBONE_PREFIX + key in model_keys for key in file_keys):
        return {"": BACKBONE_PREFIX}
    return {}


def load_reference_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    prefix_map: Optional[Mapping[str, str]] = None,
    strict: bool = False,
) -> LoadReport:
    """Load a reference checkpoint into ``model`` and report what matched.

    ``prefix_map`` renames file keys (``{file prefix: model prefix}``, longest prefix first, e.g.
    ``{"backbone.": "img_backbone."}``); ``None`` detects a bare backbone file (see module doc).
    With ``strict=True`` nothing is loaded and :class:`CheckpointMismatchError` is raised unless the
    load would be exact; otherwise every key present on both sides with equal shapes is loaded.
    """
    file_state = read_checkpoint_state_dict(path)
    model_state = model.state_dict(keep_vars=True)
    if prefix_map is None:
        prefix_map = _detect_prefix_map(list(file_state), set(model_state))
    renamed: Dict[str, torch.Tensor] = {}
    for key, value in file_state.items():
        name = _rename(key, prefix_map)
        if name in renamed:
            raise UnusableCheckpointError(describe(
                os.fspath(path), f"two keys map to {name!r} under {dict(prefix_map)}", "keep one of the two"
            ))
        renamed[name] = value

    report = LoadReport(path=os.fspath(path), prefix_map=dict(prefix_map))
    to_load: Dict[str, torch.Tensor] = {}
    for key, target in model_state.items():
        if key not in renamed:
            report.missing.append(key)
        elif tuple(renamed[key].shape) != tuple(target.shape):
            report.shape_mismatch.append((key, tuple(renamed[key].shape), tuple(target.shape)))
        else:
            to_load[key] = renamed[key]
            report.loaded.append(key)
    report.unexpected = [key for key in renamed if key not in model_state]

    # Keys naming one shared tensor (e.g. the decoder's shared branches) must not disagree.
    aliases: Dict[int, List[str]] = {}
    for key, target in model_state.items():
        aliases.setdefault(id(target), []).append(key)
    for group in aliases.values():
        given = [key for key in group if key in to_load]
        if any(not torch.equal(to_load[given[0]], to_load[key]) for key in given[1:]):
            report.alias_conflicts.append(tuple(given))

    if strict and not report.is_exact:
        raise CheckpointMismatchError(report)
    model.load_state_dict(to_load, strict=False)
    return report
