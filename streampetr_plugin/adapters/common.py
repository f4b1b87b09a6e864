"""Adapters for every device kind.

* ``ddp_static_graph``: ``DistributedDataParallel(static_graph=True)``: StreamPETR uses the same
  parameters in every training step, so DDP may fix its gradient buckets after the first iteration
  (it also tolerates activation checkpointing and the decoder's branches shared by six layers);
* ``gradient_checkpointing``: a memory tweak (off by default; the recipes set ``with_cp`` per module):
  turns on ``with_cp`` (recompute in backward) on the backbone's blocks and the decoder's layers;
* ``fold_batchnorm`` (inference phase: evaluation, ``infer`` and ``export``): every eval-mode
  BatchNorm that directly follows a convolution is folded into it
  (:mod:`streampetr_plugin.models.batchnorm_folding`); the detections change by float32 rounding only.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin.adapters.base import Adapter, AdapterContext, AdapterResult, Phase


class DdpStaticGraph(Adapter):
    """Tell DDP the autograd graph is the same in every iteration."""

    name: ClassVar[str] = "ddp_static_graph"
    phase: ClassVar[Phase] = Phase.MODEL

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if context.world_size <= 1:
            return False, "single process, no DistributedDataParallel"
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        context.ddp_options["static_graph"] = True
        return AdapterResult.applied("DistributedDataParallel(static_graph=True)")


class GradientCheckpointingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: List[str] = Field(
        default_factory=lambda: ["img_backbone", "pts_bbox_head"],
        description="Module-name prefixes whose checkpointable blocks (`with_cp`) recompute in backward.",
    )


class GradientCheckpointing(Adapter):
    """Activation checkpointing of backbone blocks and decoder layers (memory for compute)."""

    name: ClassVar[str] = "gradient_checkpointing"
    phase: ClassVar[Phase] = Phase.MODEL
    enabled_by_default: ClassVar[bool] = False

    def __init__(self, *, targets: Optional[List[str]] = None) -> None:
        self.targets = list(targets if targets is not None else ["img_backbone", "pts_bbox_head"])

    def apply(self, context: AdapterContext) -> AdapterResult:
        switched: Dict[str, int] = {}
        already = 0
        for name, module in context.model.named_modules():
            target = next((t for t in self.targets if name == t or name.startswith(t + ".")), None)
            if target is None or not isinstance(getattr(module, "with_cp", None), bool):
                continue
            if module.with_cp:
                already += 1
                continue
            module.with_cp = True
            switched[target] = switched.get(target, 0) + 1
        if not switched and not already:
            return AdapterResult.skipped(f"no checkpointable module under {', '.join(self.targets)}")
        counts = ", ".join(f"{target}: {count}" for target, count in switched.items()) or "none"
        return AdapterResult.applied(f"with_cp turned on ({counts}; {already} were on already)")


class FoldBatchNorm(Adapter):
    """Fold eval-mode BatchNorms into the convolutions before them (inference only)."""

    name: ClassVar[str] = "fold_batchnorm"
    phase: ClassVar[Phase] = Phase.INFERENCE

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if context.model is None:
            return False, "no model in the context"
        if context.model.training:
            return False, "the model is in training mode"
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        from streampetr_plugin.models.batchnorm_folding import fold_batchnorm

        report = fold_batchnorm(context.model)
        if not report.folded:
            return AdapterResult.skipped(f"no BatchNorm directly follows a convolution ({report.left} kept)")
        folded = f"{report.folded} BatchNorms folded into convolutions"
        return AdapterResult.applied(f"{folded} ({report.left} kept)")
