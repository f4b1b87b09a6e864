"""``python -m streampetr_plugin.integrations.mindspeed_mm.evaluate CONFIG.yaml CHECKPOINT [--output DIR]``

Scores a MindSpeed-MM checkpoint (a ``training.save`` directory or one ``iter_*`` directory of it)
with StreamPETR's nuScenes metric on the val set of the recipe the host YAML names, outside the
host (one process, or every process of a ``torchrun`` job, each taking a slice of the val set).
Use it for checkpoints of the stock entry; the custom entry evaluates after training by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from streampetr_plugin.integrations.mindspeed_mm.config import HostModelParams

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def resolve_device(name: Optional[str]) -> torch.device:
    """``name`` (default: cuda when available, else cpu), indexed by ``LOCAL_RANK`` when it has no index."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("npu"):
        import torch_npu  # noqa: F401  (registers the "npu" device type)
    if name in ("cuda", "npu"):
        name = f"{name}:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)


def evaluate_checkpoint(config: Path, checkpoint: Path, output: Path, device: torch.device) -> Dict[str, Any]:
    """Build the host YAML's model, load ``checkpoint`` into it, evaluate (collective under torchrun)."""
    from streampetr_plugin import build_model, load_recipe
    from streampetr_plugin.host import create_plugin_host
    from streampetr_plugin.integrations.mindspeed_mm.checkpoint import load_host_checkpoint
    from streampetr_plugin.integrations.mindspeed_mm.evaluation import evaluate_detector
    from streampetr_plugin.integrations.mindspeed_mm.model import StreamPETRForMindSpeedMM

    host = yaml.safe_load(config.read_text(encoding="utf-8"))
    params = HostModelParams.model_validate(host["model"]["streampetr"])
    plugins = create_plugin_host()
    recipe = load_recipe(params.recipe, params.recipe_overrides, plugins)
    detector = build_model(recipe, plugins)
    detector.load_state_dict(load_host_checkpoint(checkpoint, detector))
    model = StreamPETRForMindSpeedMM.adopt(
        detector, autocast_dtype=StreamPETRForMindSpeedMM.autocast_choice(params, recipe)
    )
    return evaluate_detector(model.to(device), recipe, plugins.registries, output)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m streampetr_plugin.integrations.mindspeed_mm.evaluate",
        description="Score a MindSpeed-MM checkpoint with StreamPETR's nuScenes metric.",
    )
    parser.add_argument("config", type=Path, help="the MindSpeed-MM YAML the checkpoint was trained with")
    parser.add_argument("checkpoint", type=Path, help="training.save directory or one iter_* directory")
    parser.add_argument(
        "--output", type=Path, default=Path("work_dirs/mindspeed_mm_eval"), help="results directory"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda:0, npu:0 ... (default: cuda if available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group(backend=BACKENDS[device.type])
    try:
        metrics = evaluate_checkpoint(args.config, args.checkpoint, args.output, device)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if metrics:  # rank 0: the headline numbers on stdout (the full results are in --output)
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=1))


if __name__ == "__main__":
    main()
