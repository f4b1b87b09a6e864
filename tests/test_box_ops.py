"""Box encodings and 2D box geometry."""
import math

import pytest
import torch

from streampetr_plugin.models.box_ops import (
    bbox_cxcywh_to_xyxy,
    bbox_overlaps,
    bbox_xyxy_to_cxcywh,
    denormalize_bbox,
    normalize_bbox,
)


def test_normalize_bbox_keeps_metric_centres_and_encodes_size_and_yaw():
    box = torch.tensor([[10.0, -20.0, 1.5, 4.0, 2.0, 1.0, 0.5, 3.0, -1.0]], dtype=torch.float64)
    code = normalize_bbox(box)
    expected = [10.0, -20.0, 1.5, math.log(4.0), math.log(2.0), 0.0, math.sin(0.5), math.cos(0.5), 3.0, -1.0]
    assert code.shape == (1, 10)
    assert code[0].tolist() == pytest.approx(expected, abs=1e-15)
    assert normalize_bbox(box[:, :7]).shape == (1, 8)


def test_denormalize_inverts_normalize_with_wrapped_yaw():
    boxes = torch.tensor(
        [[1.0, 2.0, -1.0, 4.5, 1.9, 1.6, 3.0, 0.1, 0.2], [0.0, 0.0, 0.0, 0.5, 0.5, 1.8, -2.5, 0.0, 0.0]],
        dtype=torch.float64,
    )
    assert torch.allclose(denormalize_bbox(normalize_bbox(boxes)), boxes, atol=1e-12)
    assert torch.allclose(denormalize_bbox(normalize_bbox(boxes[:, :7])), boxes[:, :7], atol=1e-12)
    code = normalize_bbox(boxes)
    code[0, 6:8] = torch.tensor([0.0, -1.0], dtype=torch.float64)  # yaw = atan2(0, -1) = pi
    assert denormalize_bbox(code)[0, 6].item() == pytest.approx(math.pi)


def test_cxcywh_xyxy_round_trip():
    boxes = torch.tensor([[0.5, 0.25, 0.2, 0.1]], dtype=torch.float64)
    xyxy = bbox_cxcywh_to_xyxy(boxes)
    assert xyxy[0].tolist() == pytest.approx([0.4, 0.2, 0.6, 0.3])
    assert torch.allclose(bbox_xyxy_to_cxcywh(xyxy), boxes)


def test_bbox_overlaps_pairwise_aligned_and_batched_agree():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    iou = bbox_overlaps(a, b)
    assert iou.shape == (2, 3)
    assert iou[0].tolist() == pytest.approx([1 / 7, 0.0, 1.0])
    assert iou[1].tolist() == pytest.approx([0.0, 0.0, 0.25])
    giou = bbox_overlaps(a, b, mode="giou")
    assert giou[0, 0].item() == pytest.approx(1 / 7 - 2 / 9)
    assert giou[1, 1].item() == pytest.approx(-1 / 3)
    iof = bbox_overlaps(a, b, mode="iof")
    assert iof[1, 2].item() == pytest.approx(1.0)  # a[1] lies inside b[2]
    aligned = bbox_overlaps(a, b[:2], mode="giou", is_aligned=True)
    assert torch.allclose(aligned, torch.diagonal(giou[:, :2]))
    batched = bbox_overlaps(torch.stack([a, a]), torch.stack([b, b]), mode="giou")
    assert torch.equal(batched[1], giou)
    assert bbox_overlaps(a, b[:0]).shape == (2, 0)
