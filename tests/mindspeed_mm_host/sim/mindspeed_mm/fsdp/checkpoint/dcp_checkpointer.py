"""SIMULATION of ``mindspeed_mm/fsdp/checkpoint/dcp_checkpointer.py`` (#23, #24).

``save``: ``<save>/iter_%07d/`` gets ``extra_state/extra_state_rank_<r>.pt`` first (``torch.save``,
per rank), then the model (``get_model_state_dict``: parameters and persistent buffers, no
``module.`` prefix) and optionally the optimiser through ``torch.distributed.checkpoint``; rank 0
then writes ``latest_checkpointed_iteration.txt``. ``load`` reads the tracker and restores model
(partial load unless ``load_strict``), optimiser and the extra state.
"""

import os
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


class DistributedCheckpointer:
    @staticmethod
    def save(path: str, state: Dict[str, Any], iteration: int) -> None:
        target = iteration_dir(path, iteration)
        rank = dist.get_rank()
        extra = target / "extra_state"
        extra.mkdir(parents=True, exist_ok=True)
        torch.save(state["extra_state"], extra / f"extra_state_rank_{rank}.pt")
        payload: Dict[str, Any] = {"model": get_model_state_dict(state["model"])}
        if "optimizer" in state:
            payload["optimizer"] = get_optimizer_state_dict(state["model"], state["optimizer"])
        dcp.save(payload, checkpoint_id=str(target))
        if rank == 0:
            (Path(path) / TRACKER).write_text(str(iteration))

    @staticmethod
    def load(path: str, state: Dict[str, Any], load_strict: bool = False) -> bool:
        tracked = (Path(path) / TRACKER).read_text().strip()
        release = tracked == "release"
        target = Path(path) / "release" if release else iteration_dir(path, int(tracked))
        payload: Dict[str, Any] = {"model": get_model_state_dict(state["model"])}
        if "optimizer" in state and not release:
            payload["optimizer"] = get_optimizer_state_dict(state["model"], state["optimizer"])
        dcp.load(
            payload, checkpoint_id=str(target), planner=DefaultLoadPlanner(allow_partial_load=not load_strict)
        )
        set_model_state_dict(state["model"], payload["model"])
        if "optimizer" in payload:
            set_optimizer_state_dict(state["model"], state["optimizer"], payload["optimizer"])
        if not release:
            rank_file = target / "extra_state" / f"extra_state_rank_{dist.get_rank()}.pt"
            state["extra_state"].update(torch.load(rank_file, weights_only=True))
        return release


def resolve_formats(training) -> None:
    """#24: DCP save unless ``no_save_optim`` and ``no_save_rng``; HF load needs ``no_load_*``."""
    looks_hf = bool(training.load) and any(
        os.path.exists(os.path.join(training.load, name))
        for name in ("model.safetensors", "model.safetensors.index.json")
    )
    auto = "hf" if looks_hf else "dcp"
    if training.load_format == "auto":
        training.load_format = auto
    if training.save_format == "auto":
        training.save_format = auto
    if not training.no_save_optim or not training.no_save_rng:
        training.save_format = "dcp"
    if training.load_format == "hf" and (not training.no_load_optim or not training.no_load_rng):
        raise ValueError(
            "HF checkpoint loading only restores model weights; set no_load_optim and no_load_rng."
        )
