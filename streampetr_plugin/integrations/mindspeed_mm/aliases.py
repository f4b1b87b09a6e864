"""Store shared (aliased) parameters once in the host's checkpoints.

StreamPETR shares one classification and one regression branch across the six decoder layers, so
``state_dict()`` lists the same tensors under ``pts_bbox_head.cls_branches.0`` ... ``.5``. The
``torch.distributed.checkpoint`` helpers MindSpeed-MM saves and loads with
(``get_model_state_dict`` / ``set_model_state_dict``) map only the first name of a shared tensor
to the DDP-wrapped name (``module.``), so resuming fails with "missing module.….cls_branches.1…,
unexpected ….cls_branches.1…". The host-facing model therefore leaves the alias names out of its
state dict and fills them in again from the first name when loading.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
from torch import nn


def alias_names(module: nn.Module) -> Dict[str, str]:
    """``{alias name: first name}`` of every parameter or buffer reachable under several names."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def store_aliases_once(module: nn.Module) -> Dict[str, str]:
    """Register the state-dict hooks on ``module``; returns the alias map they use."""
    aliases = alias_names(module)

    def drop_aliases(_module: nn.Module, state_dict: Dict[str, Any], prefix: str, _metadata: Any) -> None:
        for alias in aliases:
            state_dict.pop(prefix + alias, None)

    def restore_aliases(_module: nn.Module, state_dict: Dict[str, Any], prefix: str, *_: Any) -> None:
        for alias, canonical in aliases.items():
            if prefix + canonical in state_dict and prefix + alias not in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + canonical]

    module.register_state_dict_post_hook(drop_aliases)
    module.register_load_state_dict_pre_hook(restore_aliases)
    return aliases


def expand_aliases(state: Mapping[str, torch.Tensor], module: nn.Module) -> Dict[str, torch.Tensor]:
    """``state`` with every alias name of ``module`` added (the full reference layout)."""
    expanded = dict(state)
    for alias, canonical in alias_names(module).items():
        if canonical in expanded:
            expanded.setdefault(alias, expanded[canonical])
    return expanded
