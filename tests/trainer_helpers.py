"""Stand-in components for the trainer tests, registered through the public plugin hooks.

This module is itself a streampetr plugin (module-level ``@hookimpl`` functions): in-process tests
use a plugin host with it registered (:func:`standin_host`); processes started by torchrun find it
through an entry point (:func:`install_as_distribution`).

The stand-in detector is tiny (a 4x4 strided convolution, mean pooling, a linear head with dropout)
but has what the trainer must handle: a streaming memory with ``save()`` / ``load()`` / ``reset()``
that changes the loss, dropout (RNG), several loss terms plus a non-loss entry, and NaN losses on
request. The stand-in dataset follows the batch contract (one camera, 8x8 images), has sequence
groups (``flag``) for the streaming sampler and its own ``evaluate``.

``streampetr_pre_train`` / ``streampetr_post_train`` record, per rank, the sample tokens each training
forward saw, the parameters before and after training and the buffers after, in
``<work_dir>/rank<r>.pt``.
"""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from streampetr_plugin import hookimpl
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.models.backbones.contract import ShapeSpec
from streampetr_plugin.models.outputs import InferenceOutputs, TrainingOutputs

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_NAME = "standin"


class TinyBackbone(nn.Module):
    def __init__(self, *, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.conv = nn.Conv2d(3, width, kernel_size=4, stride=4)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"c": self.conv(images)}  # (N, width, H/4, W/4)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"c": ShapeSpec(self.width, 4)}


class MeanPoolNeck(nn.Module):
    def __init__(self, *, input_shape: Dict[str, ShapeSpec]) -> None:
        super().__init__()
        self.spec = next(iter(input_shape.values()))
        self.scale = nn.Parameter(torch.ones(self.spec.channels))

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        feature = next(iter(features.values()))
        return [feature.mean(dim=(2, 3)) * self.scale]  # (N, C)

    def output_shape(self, input_shape: Optional[Dict[str, ShapeSpec]] = None) -> List[ShapeSpec]:
        return [self.spec]


class RegressionHead(nn.Module):
    def __init__(self, *, input_shape: ShapeSpec, num_classes: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(input_shape.channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features)).squeeze(-1)  # (B,)


class RunningMemory:
    """One vector per stream, carried across iterations (like the detector's stream state); saved under
    the module that reads it, the stand-in detector itself ("")."""

    def __init__(self) -> None:
        self.state: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.state = None

    def save(self) -> Dict[str, Dict[str, torch.Tensor]]:
        return {"": {} if self.state is None else {"state": self.state.clone()}}

    def load(self, saved: Dict[str, Dict[str, torch.Tensor]]) -> None:
        fields = saved.get("") or {}
        self.state = fields["state"].clone() if fields else None


class StandInDetector(nn.Module):
    """``forward(batch)``: training -> named losses; eval -> one prediction dict per row."""

    def __init__(
        self,
        *,
        img_backbone: nn.Module,
        img_neck: nn.Module,
        img_roi_head: Optional[nn.Module],
        pts_bbox_head: nn.Module,
        nan_calls: Optional[List[int]] = None,
    ) -> None:
        super().__init__()
        self.img_backbone = img_backbone
        self.img_neck = img_neck
        self.pts_bbox_head = pts_bbox_head
        self.stream_state = RunningMemory()
        self.nan_calls = set(nan_calls or [])
        self.train_calls = 0

    def forward(self, batch: Dict[str, Any]) -> Any:
        img = batch["img"]  # (B, N, 3, H, W)
        batch_size = img.shape[0]
        features = self.img_neck(self.img_backbone(img.flatten(0, 1)))[0]
        features = features.view(batch_size, -1, features.shape[-1]).mean(dim=1)  # (B, C)
        memory = self.stream_state
        carried = torch.zeros_like(features) if memory.state is None else memory.state
        carried = carried * batch["prev_exists"].view(-1, 1)
        prediction = self.pts_bbox_head(features + 0.5 * carried)  # (B,)
        memory.state = (0.5 * carried + features).detach()
        target = img.mean(dim=(1, 2, 3, 4)) * 3.0 + 1.0  # (B,)
        if not self.training:
            boxes, labels = torch.zeros(1, 9), torch.zeros(1)
            scores = prediction.detach().reshape(-1, 1)
            return InferenceOutputs(
                detections=[{"boxes_3d": boxes, "scores_3d": score, "labels_3d": labels} for score in scores]
            )
        self.train_calls += 1
        loss_main = ((prediction - target) ** 2).mean()
        if self.train_calls in self.nan_calls:
            loss_main = loss_main * float("nan")
        return TrainingOutputs(losses={
            "loss_main": loss_main,
            "d0.loss_aux": 0.1 * (prediction - target).abs().mean(),
            "num_rows": torch.tensor(float(batch_size)),
        })


class StandInDetectorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nan_calls: List[int] = Field(default_factory=list, description="training calls (from 1) with a NaN loss")


class FramesDataset(Dataset):
    """``num_frames`` single-camera frames in sequence groups of ``group_length``."""

    def __init__(
        self,
        *,
        num_frames: int = 24,
        group_length: int = 4,
        image_size: int = 8,
        training: bool,
        classes: List[str],
    ) -> None:
        self.classes = list(classes)
        self.num_frames = num_frames
        self.group_length = group_length
        self.image_size = image_size
        self.training = training
        self.flag = [index // group_length for index in range(num_frames)]

    def reseed(self, *entropy: int) -> None:
        """No augmentation here, nothing to seed."""

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, index: int) -> Dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        eye = torch.eye(4)
        return {
            "img": torch.rand(1, 3, self.image_size, self.image_size, generator=generator),
            "intrinsics": eye[None],
            "extrinsics": eye[None],
            "lidar2img": eye[None],
            "timestamp": torch.tensor(float(index), dtype=torch.float64),
            "ego_pose": eye,
            "ego_pose_inv": eye,
            "prev_exists": torch.tensor(float(index % self.group_length != 0)),
            "scene_token": f"scene{self.flag[index]}",
            "sample_token": f"sample{index:03d}",
        }

    def evaluate(self, predictions: Dict[str, Any], *, output_dir: Path) -> Dict[str, float]:
        scores = torch.cat([p["scores_3d"] for p in predictions.values()])
        return {"num_predictions": float(len(predictions)), "mean_score": float(scores.mean())}


class FramesParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_frames: int = Field(24, ge=1, description="frames")
    group_length: int = Field(4, ge=1, description="frames per sequence group")
    image_size: int = Field(8, ge=4, description="image side")


@hookimpl
def streampetr_register_backbones(register):
    register("tiny_conv4", TinyBackbone)


@hookimpl
def streampetr_register_necks(register):
    register("mean_pool", MeanPoolNeck)


@hookimpl
def streampetr_register_heads(register):
    register("regression", RegressionHead)


def _standin_detector(params: StandInDetectorParams, *, input_shape: ShapeSpec, **modules) -> StandInDetector:
    return StandInDetector(nan_calls=params.nan_calls, **modules)


@hookimpl
def streampetr_register_detectors(register):
    register("standin", _standin_detector, params=StandInDetectorParams)


def _frames(params: FramesParams, **context) -> FramesDataset:
    return FramesDataset(**dict(params), **context)


@hookimpl
def streampetr_register_datasets(register):
    register("frames", _frames, params=FramesParams)


_SEEN_TOKENS: List[str] = []
_INITIAL: Dict[str, torch.Tensor] = {}


def _record_tokens(module: nn.Module, args: tuple) -> None:
    if module.training:
        _SEEN_TOKENS.extend(args[0]["sample_token"])


def _parameters(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in model.named_parameters()}


@hookimpl
def streampetr_pre_train(context):
    _SEEN_TOKENS.clear()
    _INITIAL.clear()
    _INITIAL.update(_parameters(context.model))
    context.model.register_forward_pre_hook(_record_tokens)


@hookimpl
def streampetr_post_train(context):
    buffers = {name: value.detach().cpu().clone() for name, value in context.model.named_buffers()}
    payload = {"seen": list(_SEEN_TOKENS), "initial": dict(_INITIAL), "final": _parameters(context.model),
               "buffers": buffers, "iteration": context.iteration}
    torch.save(payload, Path(context.work_dir) / f"rank{context.dist_env.rank}.pt")


RECIPE = """\
name: standin
model:
  type: standin
  backbone: {type: tiny_conv4}
  neck: {type: mean_pool}
  head: {type: regression}
data:
  class_names: [thing]
  train: {type: frames}
  val: {type: frames, num_frames: 8}
  batch_size_per_device: 2
  num_workers: 0
optimization:
  optimizer: {type: adamw, lr: 0.01}
  lr_scheduler: {type: cosine_warmup, warmup_iters: 2}
  grad_clip: {max_norm: 35.0}
runtime:
  max_iters: 6
  log_interval: 1
  evaluate_at_end: false
  progress_bar: "off"
accelerator:
  device: cpu
  adapters:
    cpu_threads: {num_threads: 1}
"""


DEMO_RECIPE = REPO_ROOT / "recipes" / "demo_cpu.yaml"


def demo_overrides(root: Path, version: str) -> List[str]:
    """``recipes/demo_cpu.yaml`` on the tests' tiny synthetic nuScenes (``tests/data_fixtures.py``):
    64 x 160 input (resize 0.8 maps the 200-pixel-wide images onto it), one frame per process and
    step, one thread, a geometric warm start of 2 steps on 2 frames (the recipe's takes seconds)."""
    overrides = []
    for split in ("train", "val"):
        overrides += [f"data.{split}.root={root}", f"data.{split}.version={version}",
                      f"~data.{split}.synthetic", f"data.{split}.final_dim=[64,160]",
                      f"data.{split}.resize_lim=[0.8,0.8]"]
    return overrides + ["data.batch_size_per_device=1", "accelerator.adapters.cpu_threads.num_threads=1",
                        "runtime.progress_bar='off'", "runtime.log_interval=1",
                        "optimization.geometric_warm_start.steps=2",
                        "optimization.geometric_warm_start.frames=2",
                        "optimization.geometric_warm_start.points=16"]


def crash_on_training_forward(model: nn.Module, number: int) -> None:
    """Make the ``number``-th training forward of ``model`` raise ``RuntimeError("simulated crash")``."""
    calls = []

    def crash(module: nn.Module, args: tuple) -> None:
        if module.training:
            calls.append(1)
            if len(calls) == number:
                raise RuntimeError("simulated crash")

    model.register_forward_pre_hook(crash)


def standin_host() -> PluginHost:
    """A plugin host (built-in plugin, installed entry points) with this module registered as well."""
    host = create_plugin_host()
    host.register_plugin(sys.modules[__name__], name=PLUGIN_NAME)
    return host


def write_recipe(directory: Path, text: str = RECIPE) -> Path:
    path = Path(directory) / "standin.yaml"
    path.write_text(text)
    return path


def install_as_distribution(root: Path) -> Path:
    """A dist-info under ``root`` whose ``streampetr`` entry point is this module (for subprocesses)."""
    info = Path(root) / "streampetr_standin-0.0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: streampetr-standin\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[streampetr]\n{PLUGIN_NAME} = tests.trainer_helpers\n")
    return Path(root)


def subprocess_env(extra_path: Optional[Path] = None) -> Dict[str, str]:
    """Environment for a child Python: this checkout and ``extra_path`` importable, one thread."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + ([str(extra_path)] if extra_path is not None else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def python_script(body: str) -> List[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]
