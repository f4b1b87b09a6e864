"""Decoding and losses against the reference's stored outputs (fidelity README section 8, items 3 and 4)."""
from pathlib import Path

import pytest
import torch

from streampetr_plugin.models.coders.nms_free_coder import NMSFreeCoder
from streampetr_plugin.models.heads.focal_head import FocalHead, FocalHeadParams
from streampetr_plugin.models.losses.streampetr_criterion import (
    StreamPETRCriterion,
    StreamPETRCriterionParams,
)

FIXTURE = Path(__file__).parent / "fixtures" / "r50_128x352_3frames.pt"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("frame", [0, 1, 2])
def test_decoding_reproduces_reference_detections(fixture, frame):
    stored = fixture["frames"][frame]
    coder = NMSFreeCoder(
        pc_range=[-51.2, -51.2, -5.0, 51.2, 51.2, 3.0],
        post_center_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0],
    )
    decoded = coder.decode(stored["all_cls_scores"][-1][None], stored["all_bbox_preds"][-1][None])[0]
    boxes = decoded["bboxes"].clone()
    boxes[:, 2] -= boxes[:, 5] * 0.5  # the head's get_bboxes: gravity -> bottom centre
    assert boxes.shape == stored["det_boxes_3d"].shape == (300, 9)
    assert torch.allclose(decoded["scores"], stored["det_scores_3d"], rtol=0, atol=1e-6)
    # Pairs with exactly equal scores may come out in another order: match boxes by (query, label).
    pairs = zip(decoded["query_index"].tolist(), decoded["labels"].tolist())
    ours = {pair: i for i, pair in enumerate(pairs)}
    theirs = list(zip(stored["det_query_index"].tolist(), stored["det_labels_3d"].tolist()))
    assert set(ours) == set(theirs)
    order = torch.tensor([ours[pair] for pair in theirs])
    assert torch.allclose(boxes[order], stored["det_boxes_3d"], rtol=0, atol=1e-6)
    assert torch.allclose(decoded["scores"][order], stored["det_scores_3d"], rtol=0, atol=1e-6)


def test_3d_matches_and_losses_reproduce_reference(fixture):
    stored_loss, frame = fixture["loss"], fixture["frames"][2]
    code_weights = fixture["constants"]["pts_bbox_head.code_weights"]
    match_costs = fixture["constants"]["pts_bbox_head.match_costs"]
    criterion = StreamPETRCriterion(  # the reference's settings
        StreamPETRCriterionParams(), num_classes=10, match_with_velo=False, with_dn=True, dn_weight=1.0,
        split=0.75,
    )
    cls_scores = frame["all_cls_scores"][:, None]  # (6, B=1, 900, 10)
    bbox_preds = frame["all_bbox_preds"][:, None]
    gt_boxes, gt_labels = [stored_loss["gt_bboxes_3d_gravity"]], [stored_loss["gt_labels_3d"]]

    assignments = criterion.match(cls_scores, bbox_preds, gt_boxes, gt_labels, match_costs)
    stored_matches = stored_loss["matches_3d"]
    assert len(stored_matches) == 12  # layers 0..5 for the losses, then again for the duplicate dn branch
    for layer in range(6):
        result = assignments[layer][0]
        for stored in (stored_matches[layer], stored_matches[6 + layer]):
            assert torch.equal(result.pos_inds, stored["query"])
            assert torch.equal(result.pos_assigned_gt_inds, stored["gt"])

    losses = criterion(cls_scores, bbox_preds, None, gt_boxes, gt_labels, code_weights, match_costs)
    assert list(losses) == list(stored_loss["loss_3d"])
    for name, value in stored_loss["loss_3d"].items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5), name


def test_2d_matches_and_losses_reproduce_reference(fixture):
    stored_loss, roi = fixture["loss"], fixture["frames"][2]["roi"]
    gt = stored_loss["gt_2d"]
    pad_h, pad_w, _ = fixture["pad_shape"][0]
    head = FocalHead(FocalHeadParams(), in_channels=256, num_classes=10, stride=16)

    assignments = head.assigner.assign_batch(
        roi["enc_cls_scores"], roi["enc_bbox_preds"], roi["pred_centers2d"],
        gt["gt_bboxes"], gt["gt_labels"], gt["centers2d"], (pad_h, pad_w),
    )
    assert len(assignments) == len(stored_loss["matches_2d"]) == 6  # one per camera
    for result, stored in zip(assignments, stored_loss["matches_2d"]):
        assert torch.equal(result.pos_inds, stored["token"])
        assert torch.equal(result.pos_assigned_gt_inds, stored["gt"])

    losses = head.loss(dict(roi), [gt["gt_bboxes"]], [gt["gt_labels"]], [gt["centers2d"]], (pad_h, pad_w))
    assert list(losses) == list(stored_loss["loss_2d"])
    for name, value in stored_loss["loss_2d"].items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5), name
