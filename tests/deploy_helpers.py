"""One exported StreamPETR for the deploy tests, made once per test process.

The model is the demo recipe's (``recipes/demo_cpu.yaml``: VoVNet V-tiny, one decoder layer) on the tests'
tiny synthetic nuScenes at 64 x 160 (``trainer_helpers.demo_overrides``), with seeded weights saved as
a checkpoint. At its initialisation the decoder's outputs hardly depend on the query (logits differ by
1e-6 between queries), so scores tie and PyTorch and onnxruntime break the ties differently. The head's
linear and attention weights are therefore drawn at twice the usual scale (logits then differ by 0.3
between queries), except the ego-motion and time embeddings, whose initial scale keeps the model's
response to the float32 rounding of global poses (1e-4 m at 1.5 km) that of a trained one; the
classification bias of -2.5 leaves about 20 of the 100 decoded pairs per frame at or above 0.3.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
import torch

from streampetr_plugin import build_model, load_recipe
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.deploy.export import ExportResult, export_command
from tests import trainer_helpers

_CACHE: Dict[str, "ExportedDemo"] = {}
PARITY_FRAMES = 2
KEEP_INITIAL = ("ego_pose_pe", "ego_pose_memory", "time_embedding")


@dataclass(frozen=True)
class ExportedDemo:
    recipe: Recipe
    checkpoint: Path
    out_dir: Path
    result: ExportResult


def demo_recipe(synthetic_nuscenes, work_dir: Path) -> Recipe:
    overrides = trainer_helpers.demo_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version)
    return load_recipe(
        trainer_helpers.DEMO_RECIPE, overrides + ["data.num_workers=0", f"runtime.work_dir={work_dir}"]
    )


def exported_demo(synthetic_nuscenes, tmp_path_factory: pytest.TempPathFactory) -> ExportedDemo:
    """The demo model, its checkpoint and its export (``streampetr.onnx``, ``export.json``)."""
    if "demo" not in _CACHE:
        directory = tmp_path_factory.mktemp("exported_demo")
        recipe = demo_recipe(synthetic_nuscenes, directory / "work")
        torch.manual_seed(0)
        model = build_model(recipe)
        head = model.pts_bbox_head
        with torch.no_grad():
            weights = [
                module.weight
                for name, module in head.named_modules()
                if isinstance(module, torch.nn.Linear) and not name.startswith(KEEP_INITIAL)
            ]
            weights += [weight for name, weight in head.named_parameters() if name.endswith("in_proj_weight")]
            for weight in weights:
                weight.normal_(0.0, 2.0 / weight.shape[1] ** 0.5)  # std 2 / sqrt(fan_in)
            head.cls_branches[0][-1].bias.fill_(-2.5)
        checkpoint = directory / "demo.pth"
        torch.save(model.state_dict(), checkpoint)
        result = export_command(
            recipe, host=create_plugin_host(), checkpoint=checkpoint, out_dir=directory / "export",
            parity_frames=PARITY_FRAMES,
        )
        _CACHE["demo"] = ExportedDemo(
            recipe=recipe, checkpoint=checkpoint, out_dir=directory / "export", result=result
        )
    return _CACHE["demo"]
