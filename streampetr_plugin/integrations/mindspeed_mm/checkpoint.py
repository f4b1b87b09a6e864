"""Read MindSpeed-MM checkpoints back into StreamPETR's own format.

The host saves with ``torch.distributed.checkpoint`` (DCP): ``<save>/iter_%07d/`` holds the
model under ``model.*`` (parameter names without DDP's ``module.``, persistent buffers included),
the optimiser and per-rank extra state; ``<save>/latest_checkpointed_iteration.txt`` names the
newest. The model part uses the reference's names (the host-facing model keeps the detector's)
with the shared decoder branches stored once (:mod:`.aliases`); given the model, they are filled
in again, which gives the reference's full state dict for ``build_model(recipe)`` or
``runtime.load_from``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from streampetr_plugin.integrations.mindspeed_mm.aliases import expand_aliases

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


def load_host_checkpoint(
    path: Union[str, Path], model: Optional[nn.Module] = None
) -> Dict[str, torch.Tensor]:
    """The detector's state dict from a MindSpeed-MM DCP checkpoint; with ``model`` (e.g.
    ``build_model(recipe)``) the shared-branch aliases are added back (the reference layout)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = resolve_checkpoint_dir(path)
    with tempfile.TemporaryDirectory() as scratch:
        flat = Path(scratch) / "checkpoint.pt"
        dcp_to_torch_save(directory, flat)
        content = torch.load(flat, map_location="cpu", weights_only=True)
    nested = content.get("model")
    stored = (
        nested
        if isinstance(nested, dict)
        else {
            key[len(MODEL_PREFIX) :]: value for key, value in content.items() if key.startswith(MODEL_PREFIX)
        }
    )
    if not stored:
        raise ValueError(f"{directory} holds no model state (top-level keys: {sorted(content)[:8]})")
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
