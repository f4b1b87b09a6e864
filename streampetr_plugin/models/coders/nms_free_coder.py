"""NMS-free decoding of the 3D head's last-layer outputs into scored boxes (reference ``NMSFreeCoder``),
with an optional class-wise suppression of duplicates by centre distance (off in the reference)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from streampetr_plugin.models.box_ops import denormalize_bbox, suppress_among_kept
from streampetr_plugin.models.layers.functional import device_constant


@dataclass
class DenseDecoding:
    """The top K (query, class) pairs of every sample, before any is dropped.

    Fields: ``bboxes`` (B, K, 9) (x, y, z_gravity, x_size, y_size, z_size, yaw, vx, vy), ``scores`` (B, K)
    descending, ``labels`` (B, K), ``query_index`` (B, K), ``keep`` (B, K) bool (inside
    ``post_center_range`` and at least ``score_threshold``).
    """

    bboxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    query_index: torch.Tensor
    keep: torch.Tensor


class NMSFreeCoder:
    """Top-k over sigmoid scores of all (query, class) pairs; no NMS unless ``nms_radius`` is set.

    ``pc_range`` is accepted for parity with the reference configuration; decoding does not need it because
    the head already outputs metric centres.
    """

    def __init__(
        self,
        pc_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
        post_center_range: Optional[Sequence[float]] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        max_num: int = 300,
        score_threshold: Optional[float] = None,
        num_classes: int = 10,
        nms_radius: Optional[float] = None,
    ) -> None:
        self.pc_range = list(pc_range)
        self.post_center_range = None if post_center_range is None else list(post_center_range)
        self.max_num = max_num
        self.score_threshold = score_threshold
        self.num_classes = num_classes
        self.nms_radius = nms_radius

    @torch.no_grad()
    def decode(self, cls_scores: torch.Tensor, bbox_preds: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """Decode a batch.

        Args:
            cls_scores: (B, Q, C) last-layer logits.
            bbox_preds: (B, Q, 10) last-layer codes (metric centre, gravity z; log sizes; sin, cos; vx, vy).

        Returns:
            Per sample a dict with ``bboxes`` (K, 9) (x, y, z_gravity, x_size, y_size, z_size, yaw, vx, vy),
            ``scores`` (K,) descending, ``labels`` (K,) and ``query_index`` (K,); K <= ``max_num``. The
            same query can appear once per class (suppression compares boxes of one class only).
        """
        dense = self.decode_dense(cls_scores, bbox_preds)
        dense.keep = self.suppress_duplicates(dense.bboxes, dense.labels, dense.keep)
        fields = {"bboxes": dense.bboxes, "scores": dense.scores, "labels": dense.labels,
                  "query_index": dense.query_index}
        # One read per sample (how many pairs it keeps), then plain indexing of every field.
        kept = [keep.nonzero().squeeze(1) for keep in dense.keep]
        return [{name: value[row][kept[row]] for name, value in fields.items()} for row in range(len(kept))]

    @torch.no_grad()
    def decode_dense(self, cls_scores: torch.Tensor, bbox_preds: torch.Tensor) -> DenseDecoding:
        """:meth:`decode` at a fixed size: K = ``min(max_num, Q C)`` pairs per sample, those it drops marked
        in ``keep`` (static shapes, as an exported graph needs)."""
        batch_size = cls_scores.size(0)
        flat_scores = cls_scores.sigmoid().reshape(batch_size, -1)  # (B, Q * C), index = query * C + class
        scores, pair_index = flat_scores.topk(min(self.max_num, flat_scores.size(1)), dim=1)  # (B, K)
        labels = pair_index % self.num_classes
        query_index = torch.div(pair_index, self.num_classes, rounding_mode="floor")
        codes = torch.gather(bbox_preds, 1, query_index[..., None].expand(-1, -1, bbox_preds.size(-1)))
        boxes = denormalize_bbox(codes)  # (B, K, 9)

        keep = torch.ones_like(scores, dtype=torch.bool)
        if self.score_threshold:
            keep &= scores >= self.score_threshold
        if self.post_center_range is not None:
            bounds = device_constant(self.post_center_range, boxes)
            keep &= (boxes[..., :3] >= bounds[:3]).all(-1) & (boxes[..., :3] <= bounds[3:]).all(-1)
        return DenseDecoding(bboxes=boxes, scores=scores, labels=labels, query_index=query_index, keep=keep)

    @torch.no_grad()
    def suppress_duplicates(
        self, boxes: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """``keep`` (B, K) without the boxes ``nms_radius`` suppresses (unchanged when it is None).

        ``boxes`` (B, K, >= 2) and ``labels`` (B, K) in descending order of score, as :meth:`decode_dense`
        returns them. Greedy and data-dependent, so it runs after the fixed-size decoding (an exported
        graph leaves it to its runner).
        """
        if self.nms_radius is None:
            return keep
        rows = [suppress_among_kept(boxes[row, :, :2], labels[row], keep[row], self.nms_radius)
                for row in range(keep.size(0))]
        return torch.stack(rows)
