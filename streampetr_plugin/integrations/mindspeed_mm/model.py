"""The model MindSpeed-MM builds for ``model_id: streampetr``.

The host calls ``StreamPETRForMindSpeedMM.from_pretrained(model_args)`` with its whole
``ModelArguments`` (our settings are the ``model.streampetr`` block), then ``.float()``, wraps the
result in DDP or FSDP2 and calls ``model(**batch, use_cache=False)`` reading ``output.loss``.

``from_pretrained`` builds the recipe's detector with our own builder and returns *that object*,
re-classed to a subclass of its class and of this mixin (the trick ``torch.nn.utils.parametrize``
uses): parameter names stay exactly the reference's (``img_backbone.*``, ``pts_bbox_head.*``), so
``lr_scaling_plan``/``freeze``/``apply_modules`` patterns and host checkpoints use the names every
other StreamPETR tool uses. The mixin adds the host-facing ``forward`` and stores the decoder's
shared branches once in the state dict (:mod:`.aliases`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Any, ContextManager, Dict, List, Optional

import torch
from mindspeed_mm.fsdp.models.base_model import BaseModel
from torch import nn

from streampetr_plugin.integrations.mindspeed_mm.aliases import store_aliases_once
from streampetr_plugin.integrations.mindspeed_mm.codec import decode_batch
from streampetr_plugin.integrations.mindspeed_mm.config import HostModelParams, read_block
from streampetr_plugin.training.precision import AUTOCAST_DTYPES
from streampetr_plugin.training.step import total_loss

logger = logging.getLogger(__name__)


@dataclass
class StreamPETROutput:
    """What ``forward`` returns to the host.

    Fields:
        loss: training: the fp32 sum of every loss term (scalar, requires grad); inference: None.
        loss_terms: training: every named loss term, detached (``loss_cls``, ``d0.loss_bbox``, ...).
        detections: inference: per row ``{"boxes_3d" (K, 9), "scores_3d" (K,), "labels_3d" (K,)}``.
    """

    loss: Optional[torch.Tensor]
    loss_terms: Dict[str, torch.Tensor] = field(default_factory=dict)
    detections: Optional[List[Dict[str, torch.Tensor]]] = None


@functools.lru_cache(maxsize=None)
def _host_class(mixin: type, detector_class: type) -> type:
    return types.new_class(f"{detector_class.__name__}ForMindSpeedMM", (mixin, detector_class))


class StreamPETRForMindSpeedMM(nn.Module, BaseModel):
    """Host-facing StreamPETR (see the module docstring). Instances are made by :meth:`from_pretrained`."""

    @classmethod
    def from_pretrained(cls, model_args: Any, *args: Any, **kwargs: Any) -> "StreamPETRForMindSpeedMM":
        """Build the detector named by ``model_args.streampetr`` and load its starting weights.

        ``model_args`` is MindSpeed-MM's ``ModelArguments``. A path (with HF keywords such as
        ``config=``) means the host found a HuggingFace config at ``model.model_name_or_path``.
        """
        if isinstance(model_args, (str, os.PathLike)):
            raise ValueError(
                f"MindSpeed-MM loaded {os.fspath(model_args)!r} as a HuggingFace config and passed a "
                "path: set model.model_name_or_path: null so that it builds StreamPETR from model.streampetr"
            )
        from streampetr_plugin import build_model, load_recipe
        from streampetr_plugin.host import create_plugin_host
        from streampetr_plugin.interop.checkpoint import load_reference_checkpoint

        params = read_block(model_args, HostModelParams)
        plugins = create_plugin_host()  # MindSpeed-MM calls this entry by itself: the plugins start here
        recipe = load_recipe(params.recipe, params.recipe_overrides, plugins)
        detector = build_model(recipe, plugins)
        weights = params.load_from or recipe.runtime.load_from
        if weights:
            report = load_reference_checkpoint(detector, weights)
            logger.info("streampetr: %s", report.summary())
        return cls.adopt(detector, autocast_dtype=cls.autocast_choice(params, recipe))

    @classmethod
    def _from_config(cls, model_args: Any) -> "StreamPETRForMindSpeedMM":
        raise NotImplementedError(
            "StreamPETR does not build on the meta device: set training.init_model_with_meta_device: false "
            "(the detector is small enough to build on every rank)"
        )

    @staticmethod
    def autocast_choice(params: HostModelParams, recipe: Any) -> Optional[torch.dtype]:
        """The autocast dtype ``model.streampetr.autocast`` asks for (None: no autocast)."""
        if params.autocast == "auto":
            return torch.bfloat16 if recipe.optimization.amp.enabled else None
        return AUTOCAST_DTYPES.get(params.autocast)

    @classmethod
    def adopt(
        cls, detector: nn.Module, *, autocast_dtype: Optional[torch.dtype] = None
    ) -> "StreamPETRForMindSpeedMM":
        """Turn a built detector into the host-facing model in place (same object, same parameters)."""
        detector.__class__ = _host_class(cls, type(detector))
        store_aliases_once(detector)
        detector.autocast_dtype = autocast_dtype
        return detector

    def autocast(self, device: torch.device) -> ContextManager[Any]:
        """The model's own mixed precision (backbone and neck; the heads keep fp32 themselves)."""
        if self.autocast_dtype is None or device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def detector_forward(self, batch: Dict[str, Any]) -> Any:
        """The detector's own ``forward`` on a batch of the data contract (evaluation outside the host)."""
        return super().forward(batch)

    def forward(self, use_cache: Optional[bool] = None, **inputs: Any) -> StreamPETROutput:
        """One frame per stream from the encoded batch (:mod:`.codec`); unknown keys are ignored.

        ``use_cache`` is the host's language-model flag; StreamPETR has no such cache.
        """
        batch = decode_batch(inputs)
        continues = self.stream_state.frames.update(batch.pop("scene_idx"), batch.pop("frame_idx"))
        img = batch["img"]
        if self.training:
            batch["prev_exists"] = batch["prev_exists"].float() * continues.to(img.device)
            with self.autocast(img.device):
                losses = super().forward(batch).losses
            return StreamPETROutput(
                loss=total_loss(losses), loss_terms={name: value.detach() for name, value in losses.items()}
            )
        with self.autocast(img.device):
            frame = self.infer(batch, prev_exists=continues)
        return StreamPETROutput(loss=None, detections=frame.detections)
