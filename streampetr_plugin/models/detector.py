"""The StreamPETR detector: image backbone + neck, 2D auxiliary head, StreamPETR head, streaming logic.

Submodule names equal the reference ``Petr3D``'s (``img_backbone``, ``img_neck``, ``img_roi_head``,
``pts_bbox_head``), so ``state_dict()`` keys are the reference's. One call of :meth:`forward` processes
one frame of each of B streams (the batch contract of :mod:`streampetr_plugin.data.batch`); the
detector's ``stream_state`` (:class:`~streampetr_plugin.models.stream_state.StreamState`: the memory
queue, the query ids and the scene continuity) carries every stream from one call to the next:

* training: ``prev_exists`` comes from the batch (0 at the first frame of a stream), the memory is
  written detached, so no gradient crosses iterations; :meth:`forward` returns the named losses
  (:class:`~streampetr_plugin.models.outputs.TrainingOutputs`);
* inference: ``prev_exists`` of row b is 0 when its ``scene_token`` differs from the previous call's
  (a new scene resets that row); :meth:`forward` returns the decoded boxes of every row
  (:class:`FrameOutputs`).

``stream_state.reset()`` forgets every stream. The backbone and neck run under whatever autocast the
caller enables (features are handed to the head in float32); the head runs in full precision unless
``head_autocast`` is set, and its geometry, poses and float64 timestamps never follow autocast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin.models.assigners.solver import solve_matchings
from streampetr_plugin.models.heads.streampetr_head import (
    StreamPETRHead,
    StreamPETRHeadOutputs,
    full_precision,
)
from streampetr_plugin.models.layers.grid_mask import GridMask, GridMaskParams
from streampetr_plugin.models.outputs import InferenceOutputs, TrainingOutputs
from streampetr_plugin.models.stream_state import StreamState


def token_locations(
    height: int, width: int, *, stride: int, pad_hw: Tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Normalised centres of the (height, width) feature cells: ``((stride j + stride // 2) / pad_w,
    (stride i + stride // 2) / pad_h)`` -> (height, width, 2), x first."""
    pad_h, pad_w = pad_hw
    def centres(count: int, pad: int) -> torch.Tensor:
        cells = torch.arange(0, stride * count, step=stride, dtype=torch.float32, device=device)
        return (cells + stride // 2) / pad

    shifts_x, shifts_y = centres(width, pad_w), centres(height, pad_h)
    grid_y, grid_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)


@dataclass
class FrameOutputs(InferenceOutputs):
    """Everything one inference call produces.

    Fields:
        detections: per row ``{"boxes_3d": (K, 9) bottom-centre z, "scores_3d": (K,), "labels_3d": (K,),
            "query_ids_3d": (K,)}``.
        all_cls_scores: (layers, B, Q, num_classes) logits of every decoder layer.
        all_bbox_preds: (layers, B, Q, 10) box codes of every decoder layer.
    """

    all_cls_scores: torch.Tensor
    all_bbox_preds: torch.Tensor


class StreamPETRDetector(nn.Module):
    """StreamPETR (see the module docstring).

    Args:
        params: the user settings (read from ``self.params`` afterwards; ``use_grid_mask`` and
            ``head_autocast`` become attributes, which training switches at run time).
        img_backbone: image backbone, ``forward(images) -> dict`` of feature maps, fine to coarse.
        img_neck: neck, ``forward(features) -> list`` of levels.
        pts_bbox_head: the StreamPETR head.
        stride: input pixels per cell of the neck level used by the heads (the model builder takes it from
            the neck's ``output_shape()``).
        img_roi_head: the 2D auxiliary head (FocalHead) or None.
    """

    def __init__(
        self,
        params: StreamPETRDetectorParams,
        *,
        img_backbone: nn.Module,
        img_neck: nn.Module,
        pts_bbox_head: StreamPETRHead,
        stride: int,
        img_roi_head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.params = params
        self.img_backbone = img_backbone
        self.img_neck = img_neck
        self.img_roi_head = img_roi_head
        self.pts_bbox_head = pts_bbox_head
        self.grid_mask = GridMask(params.grid_mask)
        self.use_grid_mask = params.use_grid_mask
        self.head_autocast = params.head_autocast
        self.stride = stride
        # Not a module: what carries the streams from one call to the next stays out of the state dict.
        self.stream_state = pts_bbox_head.new_stream_state()

    def extract_img_feats(self, img: torch.Tensor) -> torch.Tensor:
        """``img`` (B, N, 3, H, W) -> the neck level the heads use, (B, N, C, h, w) float32."""
        batch, num_cams = img.shape[:2]
        images = img.flatten(0, 1)  # (B N, 3, H, W)
        if self.use_grid_mask and self.training:
            images = self.grid_mask(images)
        levels = self.img_neck(self.img_backbone(images))
        features = levels[self.params.position_level].float()
        return features.view(batch, num_cams, *features.shape[1:])

    def _head_precision(self, device: torch.device) -> ContextManager[None]:
        return contextlib.nullcontext() if self.head_autocast else full_precision(device)

    def _run_heads(
        self, batch: Dict[str, Any], prev_exists: torch.Tensor, stream: StreamState, with_targets: bool
    ) -> Tuple[StreamPETRHeadOutputs, Optional[Dict[str, torch.Tensor]], Tuple[int, int]]:
        img = batch["img"]
        pad_hw = (int(img.shape[-2]), int(img.shape[-1]))
        img_feats = self.extract_img_feats(img)
        batch_size, num_cams, _, height, width = img_feats.shape
        prev_exists = stream.fit_streams(prev_exists)
        location = token_locations(height, width, stride=self.stride, pad_hw=pad_hw, device=img.device)
        location = location.unsqueeze(0).expand(batch_size * num_cams, -1, -1, -1)  # (B N, h, w, 2)
        with self._head_precision(img.device):
            outs_roi = None
            if self.img_roi_head is not None and (self.training or not self.params.aux_2d_only):
                outs_roi = self.img_roi_head(location, img_feats)
            outs = self.pts_bbox_head(
                img_feats=img_feats,
                location=location,
                pad_shape=pad_hw,
                intrinsics=batch["intrinsics"],
                lidar2img=batch["lidar2img"],
                timestamp=batch["timestamp"],
                ego_pose=batch["ego_pose"],
                ego_pose_inv=batch["ego_pose_inv"],
                prev_exists=prev_exists,
                stream=stream,
                gt_bboxes_3d=batch.get("gt_bboxes_3d") if with_targets else None,
                gt_labels_3d=batch.get("gt_labels_3d") if with_targets else None,
                topk_indexes=None if outs_roi is None else outs_roi.get("topk_indexes"),
            )
        return outs, outs_roi, pad_hw

    def forward(self, batch: Dict[str, Any]) -> Union[TrainingOutputs, FrameOutputs]:
        """Training: :meth:`forward_train`. Inference: :meth:`infer`, each row's detections ``{"boxes_3d"
        (K, 9) (x, y, z_bottom, dx, dy, dz, yaw, vx, vy), "scores_3d" (K,), "labels_3d" (K,),
        "query_ids_3d" (K,)}``."""
        if self.training:
            return self.forward_train(batch)
        return self.infer(batch)

    def forward_train(self, batch: Dict[str, Any]) -> TrainingOutputs:
        """Losses of one training frame per stream: ``loss_cls``, ``loss_bbox``, ``d0..d4.loss_*``,
        ``dn_loss_*`` / ``d*.dn_loss_*`` and, with the 2D head, ``enc_loss_cls``, ``enc_loss_bbox``,
        ``enc_loss_iou``, ``centers2d_losses``, ``centerness_losses``."""
        stream = self.stream_state
        stream.begin_training()
        prev_exists = batch["prev_exists"].to(batch["img"].device)
        outs, outs_roi, pad_hw = self._run_heads(batch, prev_exists, stream, with_targets=True)
        targets_3d = (batch["gt_bboxes_3d"], batch["gt_labels_3d"])
        targets_2d = (batch["gt_bboxes_2d"], batch["gt_labels_2d"], batch["centers_2d"], pad_hw)
        # Both heads' matchings go to the host together: one device -> host copy per step.
        problems = [self.pts_bbox_head.matching_problem(*targets_3d, outs)]
        if outs_roi is not None:
            problems.append(self.img_roi_head.matching_problem(outs_roi, *targets_2d))
        assignments = solve_matchings(problems)
        losses = self.pts_bbox_head.loss(*targets_3d, outs, assignments=assignments[0])
        if outs_roi is not None:
            losses.update(self.img_roi_head.loss(outs_roi, *targets_2d, assignments=assignments[1]))
        return TrainingOutputs(losses=losses)

    @torch.no_grad()
    def infer(self, batch: Dict[str, Any], prev_exists: Optional[torch.Tensor] = None) -> FrameOutputs:
        """One inference frame per stream. ``prev_exists`` (B,) overrides the scene-token rule."""
        device = batch["img"].device
        if prev_exists is None:
            prev_exists = self.stream_state.scenes.update(batch["scene_token"], device)
        outs = self.head_outputs(batch, prev_exists.to(device))
        return FrameOutputs(
            detections=self.pts_bbox_head.get_bboxes(outs),
            all_cls_scores=outs.all_cls_scores,
            all_bbox_preds=outs.all_bbox_preds,
        )

    def head_outputs(
        self, batch: Dict[str, Any], prev_exists: torch.Tensor, stream: Optional[StreamState] = None
    ) -> StreamPETRHeadOutputs:
        """The 3D head's outputs of one inference frame per stream with an explicit ``prev_exists`` (B,),
        on ``stream`` (default: the detector's own ``stream_state``): what :meth:`infer` decodes, and what
        an exported graph decodes at a fixed size on a state of its own."""
        stream = self.stream_state if stream is None else stream
        stream.begin_inference()
        outs, _, _ = self._run_heads(batch, prev_exists, stream, with_targets=False)
        return outs


class StreamPETRDetectorParams(BaseModel):
    """User settings of :class:`StreamPETRDetector` (the submodules are configured on their own)."""

    model_config = ConfigDict(extra="forbid")

    use_grid_mask: bool = Field(default=True, description="GridMask the input images in training.")
    grid_mask: GridMaskParams = Field(
        default_factory=GridMaskParams, description="GridMask settings (the reference's by default)."
    )
    position_level: int = Field(default=0, ge=0, description="Neck level used by the heads.")
    aux_2d_only: bool = Field(
        default=True,
        description="Run the 2D auxiliary head only in training (at inference all tokens are used).",
    )
    head_autocast: bool = Field(
        default=False,
        description="Let the heads run under the trainer's autocast; off keeps them in float32 "
        "(the reference).",
    )
